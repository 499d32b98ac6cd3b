"""One process: FastAPI app with the OpenAI API under /v1 and the Gradio UI at /."""

from __future__ import annotations

from dataclasses import dataclass, field

from serve.engine import Engine, EngineLimits, find_adapters, load_on_model_thread
from serve.images import ImageLimits


@dataclass
class ServeConfig:
    model: str | None
    adapters: str | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    api_key: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    quantization: str | None = None
    max_body_bytes: int = 64 * 1024 * 1024
    default_max_tokens: int = 512
    images: ImageLimits = field(default_factory=ImageLimits)
    limits: EngineLimits = field(default_factory=EngineLimits)
    ui: bool = True


def load_engine(config: ServeConfig) -> Engine:
    return load_on_model_thread(_build_engine, config)


def _build_engine(config: ServeConfig, executor) -> Engine:
    from pathlib import Path

    from vlm_chat.model import VisionLanguageModel

    adapters = find_adapters(config.adapters)
    # With no extra adapters to switch between, the bundle's own LoRA is folded in (faster decoding).
    model, processor = VisionLanguageModel.from_pretrained(
        config.model, config.device, config.dtype, config.quantization, merge_adapter=not adapters
    )
    name = Path(config.model).resolve().name
    return Engine(model, processor, name, adapters, config.limits, executor)


def create_app(engine: Engine, config: ServeConfig):
    import hmac

    from fastapi import FastAPI

    from serve.api import create_api, install_error_handlers

    app = FastAPI(title="vlm-chat", docs_url="/docs")
    install_error_handlers(app)
    app.include_router(create_api(engine, config.images, config.api_key, config.max_body_bytes, config.default_max_tokens))
    if config.ui:
        import gradio as gr

        from serve.ui import build_ui

        demo, _ = build_ui(engine, config.default_max_tokens)
        auth = None
        if config.api_key:
            # With a key set, the UI asks for it too (any user name, the key as password).
            auth = lambda user, password: hmac.compare_digest(password.encode(), config.api_key.encode())  # noqa: E731
        app = gr.mount_gradio_app(app, demo, path="/", auth=auth, max_file_size=config.images.max_image_bytes)
    return app


def serve(config: ServeConfig) -> None:
    import uvicorn

    engine = load_engine(config)
    app = create_app(engine, config)
    shown = "localhost" if config.host in ("127.0.0.1", "0.0.0.0") else config.host
    print(f"vlm-chat: chat UI at http://{shown}:{config.port}/  ·  OpenAI API at http://{shown}:{config.port}/v1"
          f"  ·  models: {', '.join(engine.model_names)}", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
