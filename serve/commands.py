"""`vlm-chat serve`: the chat UI and the OpenAI-compatible API in one process."""

from __future__ import annotations

import argparse
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="start the chat UI (/) and the OpenAI-compatible API (/v1) on one model",
        description="One model instance serves both the Gradio UI and the API. Binds to 127.0.0.1 unless --host says otherwise.",
    )
    p.add_argument("--model", default=None,
                   help="bundle directory (default: the offline default model, or $VLM_CHAT_DEFAULT_MODEL)")
    p.add_argument("--adapters", default=None, help="folder searched for LoRA adapters (each becomes a model name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-key", default=os.environ.get("VLM_CHAT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $VLM_CHAT_API_KEY)")
    p.add_argument("--allow-remote-images", action="store_true", help="let the API fetch http(s) image URLs")
    p.add_argument("--max-image-mb", type=float, default=10.0, help="largest image accepted, in MB")
    p.add_argument("--max-image-pixels", type=int, default=25_000_000)
    p.add_argument("--max-images", type=int, default=8, help="images per request")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body, in MB")
    p.add_argument("--queue-timeout", type=float, default=120.0, help="seconds a request may wait for the model")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds one generation may run")
    p.add_argument("--no-ui", action="store_true", help="serve the API only")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default=None, choices=["auto", "none", "4bit", "8bit"])
    p.set_defaults(func=_serve)


def config_from_args(args):
    from serve.app import ServeConfig
    from serve.engine import EngineLimits
    from serve.images import ImageLimits
    from vlm_chat.defaults import resolve_model

    return ServeConfig(
        model=resolve_model(args.model), adapters=args.adapters, host=args.host, port=args.port, api_key=args.api_key,
        device=args.device, dtype=args.dtype, quantization=args.quantization,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024), ui=not args.no_ui,
        images=ImageLimits(max_image_bytes=int(args.max_image_mb * 1024 * 1024), max_image_pixels=args.max_image_pixels,
                           max_images=args.max_images, allow_remote=args.allow_remote_images),
        limits=EngineLimits(queue_timeout=args.queue_timeout, request_timeout=args.request_timeout),
    )


def _serve(args) -> int:
    from serve.app import serve

    serve(config_from_args(args))
    return 0
