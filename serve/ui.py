"""The Gradio chat UI: upload (or paste, or drag) images, ask, watch the answer stream in.

Built on `gr.ChatInterface` (multimodal), which already gives streaming, Stop,
Retry (regenerate), Clear and examples; this file adds the model-specific parts:
image history, sampling sliders, the adapter choice and a tokens/s readout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serve.engine import Engine
from vlm_chat.errors import UserFacingError
from vlm_chat.generation import GenerationSettings

DESCRIBE = "Describe this image."
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"


def _file_path(item: Any) -> str | None:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        if "path" in item:
            return item["path"]
        if isinstance(item.get("file"), dict):
            return item["file"].get("path")
    path = getattr(item, "path", None) or getattr(getattr(item, "value", None), "path", None)
    return path


def history_to_messages(history: list[dict], message: dict) -> list[dict]:
    """Gradio's history (text and file messages) + the new message -> our chat messages.

    Gradio keeps an uploaded file as its own user message next to the text; consecutive
    user messages are folded into one turn with its images first.
    """
    turns: list[dict] = []

    def add(role: str, part: dict) -> None:
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].append(part)
        else:
            turns.append({"role": role, "content": [part]})

    for item in history:
        role = item.get("role")
        if role not in ("user", "assistant"):
            continue
        content = item.get("content")
        pieces = content if isinstance(content, list) else [content]
        for piece in pieces:
            if isinstance(piece, dict) and piece.get("type") == "text":
                piece = piece.get("text", "")
            if isinstance(piece, str):
                if piece:
                    add(role, {"type": "text", "text": piece})
            elif role == "user" and (path := _file_path(piece)):
                add(role, {"type": "image", "image": path})
    for path in message.get("files") or []:
        add("user", {"type": "image", "image": _file_path(path)})
    if message.get("text"):
        add("user", {"type": "text", "text": message["text"]})
    for turn in turns:
        # Images before text within a turn: the LLaVA layout the model was tuned on.
        turn["content"].sort(key=lambda part: part["type"] != "image")
    return turns


def build_ui(engine: Engine, default_max_tokens: int = 256):
    import gradio as gr

    def chat(message, history, temperature, top_p, max_tokens, model_name):
        if isinstance(message, str):
            message = {"text": message, "files": []}
        if not (message.get("text") or message.get("files")):
            yield "Type a question or attach an image."
            return
        messages = history_to_messages(history, message)
        settings = GenerationSettings(max_new_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p))
        text = ""
        try:
            with engine.generate(messages, settings, model_name) as stream:
                pieces = iter(stream)
                while (piece := engine.next_piece(pieces).result()) is not None:
                    text += piece
                    yield text, ""
                stats = stream.stats
            yield text, f"{stats.completion_tokens} tokens, {stats.tokens_per_second:.1f} tokens/s, first token after {stats.time_to_first_token or 0:.2f} s"
        except UserFacingError as err:
            yield (text + "\n\n" if text else "") + f"⚠️ {err}", ""

    examples = []
    for name, question in (("shapes.png", DESCRIBE), ("shapes.png", "How many red circles are there?")):
        if (EXAMPLES_DIR / name).is_file():
            examples.append([{"text": question, "files": [str(EXAMPLES_DIR / name)]}])
    # No telemetry: the server runs offline and talks to nobody but its users.
    with gr.Blocks(title="vlm-chat", analytics_enabled=False) as demo:
        gr.Markdown(f"## vlm-chat · talk with your images\nModel: `{engine.name}`. Attach images with the paperclip, by drag and drop or by pasting.")
        speed = gr.Markdown("", elem_id="speed")
        temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)", render=False)
        top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p", render=False)
        max_tokens = gr.Slider(1, 1024, value=default_max_tokens, step=1, label="Max new tokens", render=False)
        model_choice = gr.Dropdown(engine.model_names, value=engine.name, label="Model / LoRA adapter", render=False)
        textbox = gr.MultimodalTextbox(file_types=["image"], file_count="multiple", sources=["upload"],
                                       placeholder="Ask about your images…", render=False)
        interface = gr.ChatInterface(
            chat,
            multimodal=True,
            textbox=textbox,
            additional_inputs=[temperature, top_p, max_tokens, model_choice],
            additional_inputs_accordion="Settings",
            additional_outputs=[speed],
            examples=examples or None,
            api_name="chat",
            fill_height=True,
            analytics_enabled=False,
        )
        describe = gr.Button(DESCRIBE, size="sm")
        describe.click(lambda box: {"text": DESCRIBE, "files": (box or {}).get("files", [])}, inputs=textbox,
                       outputs=textbox, api_visibility="private")
    demo.queue(default_concurrency_limit=4)
    return demo, interface
