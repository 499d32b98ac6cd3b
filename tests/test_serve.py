"""The server: OpenAI API through the official client, the Gradio chat function, bad input, load."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from PIL import Image

from tests.conftest import build_tiny_bundle
from tests.serve_helpers import RunningServer, free_port

openai = pytest.importorskip("openai")


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


RED = data_url(Image.new("RGB", (16, 16), (220, 30, 30)))
BLUE = data_url(Image.new("RGB", (16, 16), (20, 40, 220)))


def image_message(text: str, url: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def stack(tiny_parts, tmp_path_factory):
    """A tiny bundle, plus one LoRA adapter (random, so its answers differ from the base)."""
    from adapters.lora import LoraSettings, add_lora
    from serve.app import ServeConfig, create_app
    from serve.engine import Engine, EngineLimits, find_adapters
    from serve.images import ImageLimits
    from vlm_chat.model import VisionLanguageModel

    root = tmp_path_factory.mktemp("serve")
    build_tiny_bundle(tiny_parts, root / "bundle")
    model, _ = VisionLanguageModel.from_pretrained(root / "bundle", device="cpu")
    torch.manual_seed(1)
    lora = add_lora(model.language_model, LoraSettings(r=4, alpha=64))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    lora.save_pretrained(root / "adapters" / "shouty", save_embedding_layers=False)

    model, processor = VisionLanguageModel.from_pretrained(root / "bundle", device="cpu")
    engine = Engine(model, processor, "tiny", find_adapters(root / "adapters"), EngineLimits(queue_timeout=60))
    config = ServeConfig(model=str(root / "bundle"), images=ImageLimits(max_image_bytes=200_000, max_image_pixels=250_000, max_images=3),
                         max_body_bytes=1_000_000, default_max_tokens=16)
    server = RunningServer(create_app(engine, config), free_port())
    yield server, engine
    server.stop()


@pytest.fixture(scope="module")
def client(stack):
    server, _ = stack
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(stack, client):
    server, _ = stack
    assert [m.id for m in client.models.list().data] == ["tiny", "shouty"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_openai_client_plain(client):
    reply = client.chat.completions.create(model="tiny", messages=[image_message("what colour is this ?", RED)], max_tokens=6)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 16  # 16 image tokens + text
    assert 1 <= reply.usage.completion_tokens <= 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_openai_client_streaming_matches_plain(client):
    messages = [image_message("describe the picture", BLUE)]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10).choices[0].message.content
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_adapter_is_a_model_and_switching_works(client):
    messages = [image_message("what is in this image ?", RED)]
    base = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8).choices[0].message.content
    tuned = client.chat.completions.create(model="shouty", messages=messages, max_tokens=8).choices[0].message.content
    again = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8).choices[0].message.content
    assert base != tuned and base == again


def test_multi_turn_with_several_images(client):
    messages = [image_message("what colour is this ?", RED), {"role": "assistant", "content": "red"},
                image_message("and this one ?", BLUE)]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    assert reply.usage.prompt_tokens > 32


def post(server, body, raw: bytes | None = None, headers=None):
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server.url + "/v1/chat/completions", content=content, headers=headers or {}, timeout=30)


BAD_REQUESTS = [
    ("not json", None, b"{oops", 400, "invalid_json"),
    ("missing messages", {"model": "tiny"}, None, 400, "invalid_value"),
    ("empty messages", {"messages": []}, None, 400, "invalid_value"),
    ("wrong type", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, None, 400, "invalid_value"),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, None, 400, "invalid_value"),
    ("n > 1", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, None, 400, "invalid_value"),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, None, 404, "model_not_found"),
    ("bad base64", {"messages": [image_message("x", "data:image/png;base64,@@@not-base64@@@")]}, None, 400, "invalid_base64"),
    ("not an image", {"messages": [image_message("x", "data:image/png;base64," + base64.b64encode(b"hello").decode())]}, None, 400, "invalid_image"),
    ("svg", {"messages": [image_message("x", "data:image/svg+xml;base64,PHN2Zy8+")]}, None, 400, "unsupported_image_type"),
    ("remote url", {"messages": [image_message("x", "http://127.0.0.1:1/cat.png")]}, None, 400, "remote_images_disabled"),
    ("file url", {"messages": [image_message("x", "file:///etc/passwd")]}, None, 400, "invalid_image_url"),
    ("too many images", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": RED}}] * 4}]}, None, 400, "too_many_images"),
    ("decompression bomb", {"messages": [image_message("x", data_url(Image.new("L", (1000, 1000))))]}, None, 413, "image_too_large"),
    ("body too large", None, b"{" + b" " * 1_100_000 + b"}", 413, "request_too_large"),
    ("prompt over context", {"messages": [{"role": "user", "content": "what " * 400}]}, None, 400, "context_length_exceeded"),
    ("bad stop", {"messages": [{"role": "user", "content": "hi"}], "stop": ["", "x"]}, None, 400, "invalid_value"),
]


@pytest.mark.parametrize("name, body, raw, status, code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_a_clear_4xx_and_the_server_lives(stack, name, body, raw, status, code):
    server, _ = stack
    response = post(server, body, raw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_api_key(tiny_parts, tmp_path):
    from serve.app import ServeConfig, create_app
    from serve.engine import Engine

    model, processor = build_tiny_bundle(tiny_parts, tmp_path / "b")
    app = create_app(Engine(model, processor, "tiny"), ServeConfig(model=None, api_key="s3cret", ui=False))
    server = RunningServer(app, free_port())
    try:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert post(server, body).status_code == 401
        assert post(server, body, headers={"Authorization": "Bearer wrong"}).json()["error"]["code"] == "invalid_api_key"
        assert post(server, body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(server.url + "/v1/models").status_code == 401
        keyed = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert keyed.models.list().data[0].id == "tiny"
    finally:
        server.stop()


def test_client_disconnect_stops_generation(stack):
    server, engine = stack
    # Slow each decoding step down so the generation is surely still running when the client leaves.
    hook = engine.model.language_model.register_forward_hook(lambda *args: time.sleep(0.02))
    try:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
            for line in response.iter_lines():
                if line.startswith("data:") and '"content": "' in line and '"content": ""' not in line:
                    break
        start = time.monotonic()
        while engine._slot.locked() and time.monotonic() - start < 5:
            time.sleep(0.05)
        assert not engine._slot.locked()
        assert engine.last_stats.finish_reason == "cancelled"
        assert engine.last_stats.completion_tokens < 150
    finally:
        hook.remove()


def test_load_16_clients_no_errors_no_crosstalk(stack, client):
    server, _ = stack
    prompts = [(f"what colour is this ? {i}", RED if i % 2 else BLUE) for i in range(4)]
    expected = {
        i: client.chat.completions.create(model="tiny", messages=[image_message(t, u)], max_tokens=8).choices[0].message.content
        for i, (t, u) in enumerate(prompts)
    }

    def one_client(worker: int) -> list[tuple[int, int, str]]:
        results = []
        with httpx.Client(timeout=120) as http:
            for request in range(10):
                i = (worker + request) % 4
                text, url = prompts[i]
                stream = request % 2 == 0
                body = {"model": "tiny", "messages": [image_message(text, url)], "max_tokens": 8, "stream": stream}
                response = http.post(server.url + "/v1/chat/completions", json=body)
                if stream:
                    pieces = [json.loads(line[5:]) for line in response.text.splitlines()
                              if line.startswith("data:") and line != "data: [DONE]"]
                    content = "".join(p["choices"][0]["delta"].get("content") or "" for p in pieces if p["choices"])
                else:
                    content = response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else ""
                results.append((i, response.status_code, content))
        return results

    with ThreadPoolExecutor(16) as pool:
        results = [r for batch in pool.map(one_client, range(16)) for r in batch]
    assert len(results) == 160
    assert all(status == 200 for _, status, _ in results), {s for _, s, _ in results}
    assert all(content == expected[i] for i, _, content in results)


def test_gradio_chat_function(stack, tmp_path):
    from gradio_client import Client, handle_file

    server, _ = stack
    image = tmp_path / "red.png"
    Image.new("RGB", (16, 16), (220, 30, 30)).save(image)
    ui = Client(server.url + "/", verbose=False)
    answer, speed = ui.predict({"text": "what colour is this ?", "files": [handle_file(str(image))]}, 0.0, 1.0, 8, "tiny", api_name="/chat")
    assert isinstance(answer, str) and answer
    assert "tokens/s" in speed
    # The same question through the API gives the same greedy answer: one model behind both.
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    expected = api.chat.completions.create(model="tiny", messages=[image_message("what colour is this ?", data_url(Image.open(image)))], max_tokens=8)
    assert answer == expected.choices[0].message.content
    error, _ = ui.predict({"text": "what " * 400, "files": []}, 0.0, 1.0, 8, "tiny", api_name="/chat")
    assert "context holds" in error
