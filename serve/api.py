"""OpenAI-compatible API: POST /v1/chat/completions, GET /v1/models, GET /health.

Every error is a JSON body in OpenAI's shape, {"error": {"message", "type", "param",
"code"}}, with a 4xx status for the caller's mistakes; the server stays up.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve.engine import BusyError, Engine, UnknownModelError
from serve.images import ImageLimits, RequestImageError, image_from_url
from vlm_chat.errors import ConfigError, ContextOverflowError, ImageTokenMismatchError
from vlm_chat.generation import GenerationSettings


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# -- request shape (OpenAI's, the parts this server honours) -------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Strict):
    url: str
    detail: str | None = None


class ContentPart(_Strict):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)


# -- conversion -------------------------------------------------------------------------------


def to_messages(request: ChatRequest, limits: ImageLimits) -> list[dict[str, Any]]:
    messages, image_count = [], 0
    for index, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role
        content = message.content
        if content is None or isinstance(content, str):
            messages.append({"role": role, "content": content or ""})
            continue
        parts = []
        for part_index, part in enumerate(content):
            where = f"messages[{index}].content[{part_index}]"
            if part.type == "text":
                if part.text is None:
                    raise ApiError(400, f"{where}: a text part needs 'text'", "invalid_value", where)
                parts.append({"type": "text", "text": part.text})
                continue
            if role != "user":
                raise ApiError(400, f"{where}: images are accepted in user messages only", "invalid_value", where)
            image_count += 1
            if image_count > limits.max_images:
                raise ApiError(400, f"too many images: at most {limits.max_images} per request", "too_many_images", where)
            url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
            if not url:
                raise ApiError(400, f"{where}: an image_url part needs image_url.url", "invalid_value", where)
            try:
                image = image_from_url(url, limits, where)
            except RequestImageError as err:
                status = 413 if err.code == "image_too_large" else 400
                raise ApiError(status, str(err), err.code, where) from None
            parts.append({"type": "image", "image": image})
        messages.append({"role": role, "content": parts})
    return messages


def to_settings(request: ChatRequest, default_max_tokens: int) -> GenerationSettings:
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop: up to 4 non-empty strings", "invalid_value", "stop")
    return GenerationSettings(
        max_new_tokens=request.max_completion_tokens or request.max_tokens or default_max_tokens,
        # OpenAI's default temperature is 1; ours is greedy unless the caller asks to sample.
        temperature=request.temperature if request.temperature is not None else 0.0,
        top_p=request.top_p if request.top_p is not None else 1.0,
        top_k=request.top_k or 0,
        repetition_penalty=request.repetition_penalty or 1.0,
        stop=stops,
        seed=request.seed,
    )


# -- the router ---------------------------------------------------------------------------------


def create_api(engine: Engine, image_limits: ImageLimits, api_key: str | None = None,
               max_body_bytes: int = 64 * 1024 * 1024, default_max_tokens: int = 512) -> APIRouter:
    router = APIRouter()
    created = int(time.time())

    def check_auth(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'", "invalid_api_key",
                           kind="authentication_error")

    async def read_body(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            raise ApiError(413, f"request body over the limit of {max_body_bytes:,} bytes", "request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise ApiError(413, f"request body over the limit of {max_body_bytes:,} bytes", "request_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the body is not valid JSON ({err})", "invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object", "invalid_json")
        return data

    @router.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, "adapters": engine.adapters}

    @router.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "vlm-chat"} for name in engine.model_names
        ]}

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        data = await read_body(request)
        try:
            chat = ChatRequest.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            raise ApiError(400, f"{param}: {first['msg']}", "invalid_value", param) from None
        try:
            target = engine.check_model(chat.model)
        except UnknownModelError as err:
            raise ApiError(404, str(err), "model_not_found", "model") from None
        messages = await asyncio.to_thread(to_messages, chat, image_limits)
        settings = to_settings(chat, default_max_tokens)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        model_name = chat.model or engine.name
        try:
            inputs, settings = await asyncio.to_thread(engine.prepare, messages, settings)
        except (ContextOverflowError, ImageTokenMismatchError, ConfigError) as err:
            code = "context_length_exceeded" if isinstance(err, ContextOverflowError) else "invalid_value"
            raise ApiError(400, str(err), code, "messages") from None
        try:
            await engine.acquire_async()
        except BusyError as err:
            raise ApiError(503, str(err), "server_busy", kind="server_error") from None
        generation = engine.start(target, inputs, settings)
        stream = generation.stream

        def finish() -> None:
            # On a plain thread: a cancelled request (client gone) cannot await anything
            # any more, and the slot must be released all the same.
            threading.Thread(target=generation.close, daemon=True).start()

        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return StreamingResponse(
                _sse(engine, stream, finish, request, completion_id, model_name, include_usage),
                media_type="text/event-stream",
            )
        try:
            pieces = []
            async for piece in _pieces(engine, stream):
                pieces.append(piece)
                if await request.is_disconnected():
                    stream.cancel()
                    break
        finally:
            finish()
        stats = stream.stats  # complete: the stream ended before the loop did
        return {
            "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                         "finish_reason": _finish(stats.finish_reason)}],
            "usage": _usage(stats),
        }

    return router


def _finish(reason: str | None) -> str:
    return "length" if reason in ("length", "cancelled") else "stop"


def _usage(stats) -> dict[str, int]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens}


async def _pieces(engine: Engine, stream):
    """Text pieces of a stream, each computed on the engine's model thread."""
    pieces = iter(stream)
    while (piece := await asyncio.wrap_future(engine.next_piece(pieces))) is not None:
        yield piece


async def _sse(engine: Engine, stream, finish, request: Request, completion_id: str, model: str, include_usage: bool):
    """Server-sent events in OpenAI's chunk format, ending with data: [DONE]."""
    created = int(time.time())

    def chunk(delta: dict, finish_reason: str | None = None, usage: dict | None = None, choices: bool = True) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}] if choices else []}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for piece in _pieces(engine, stream):
            yield chunk({"content": piece})
            if await request.is_disconnected():
                stream.cancel()
                return
        yield chunk({}, _finish(stream.stats.finish_reason))
        if include_usage:
            yield chunk({}, usage=_usage(stream.stats), choices=False)
        yield "data: [DONE]\n\n"
    finally:
        # Also runs when the client goes away mid-stream (the generator is closed):
        # the generation stops at its next token and the slot is freed.
        stream.cancel()
        finish()


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return err.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        # Last line of defence: a bug in one request answers 500 and the server lives on.
        return ApiError(500, f"internal error: {type(err).__name__}", "internal_error", kind="server_error").response()
