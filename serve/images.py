"""Images in API requests: data URLs always, http(s) URLs only when allowed, with limits."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from PIL import Image

from vlm_chat.errors import ImageError
from vlm_chat.images import load_image

DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.DOTALL)
SUPPORTED_MIME = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp"}


@dataclass
class ImageLimits:
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 25_000_000
    max_images: int = 8
    allow_remote: bool = False
    remote_timeout: float = 10.0


class RequestImageError(ImageError):
    def __init__(self, message: str, code: str = "invalid_image"):
        super().__init__(message)
        self.code = code


def image_from_url(url: str, limits: ImageLimits, where: str) -> Image.Image:
    if url.startswith("data:"):
        match = DATA_URL.match(url)
        if not match:
            raise RequestImageError(f"{where}: malformed data URL; expected data:image/png;base64,...", "invalid_image_url")
        mime = (match["mime"] or "").lower()
        if mime and mime not in SUPPORTED_MIME:
            raise RequestImageError(f"{where}: unsupported image type {mime}; use PNG, JPEG, WebP, GIF or BMP", "unsupported_image_type")
        payload = match["data"]
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise RequestImageError(f"{where}: image is over the limit of {limits.max_image_bytes:,} bytes", "image_too_large")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestImageError(f"{where}: the base64 data is malformed", "invalid_base64") from None
        return _decode(raw, limits, where)
    if url.startswith(("http://", "https://")):
        if not limits.allow_remote:
            raise RequestImageError(
                f"{where}: remote image URLs are disabled on this server (it does not fetch addresses for callers); "
                "send the image inline as a data: URL, or start the server with --allow-remote-images",
                "remote_images_disabled",
            )
        return _decode(_fetch(url, limits, where), limits, where)
    raise RequestImageError(f"{where}: image_url must be a data: URL (or http(s) when allowed)", "invalid_image_url")


def _fetch(url: str, limits: ImageLimits, where: str) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=limits.remote_timeout, follow_redirects=False) as response:
            if response.status_code != 200:
                raise RequestImageError(f"{where}: fetching the image gave HTTP {response.status_code}", "image_fetch_failed")
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > limits.max_image_bytes:
                    raise RequestImageError(f"{where}: remote image is over {limits.max_image_bytes:,} bytes", "image_too_large")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as err:
        raise RequestImageError(f"{where}: could not fetch the image ({type(err).__name__})", "image_fetch_failed") from None


def _decode(raw: bytes, limits: ImageLimits, where: str) -> Image.Image:
    if len(raw) > limits.max_image_bytes:
        raise RequestImageError(f"{where}: image is over the limit of {limits.max_image_bytes:,} bytes", "image_too_large")
    try:
        return load_image(raw, max_pixels=limits.max_image_pixels)
    except ImageError as err:
        message = str(err).removeprefix("image: ")
        code = "image_too_large" if "over the limit" in message else "invalid_image"
        raise RequestImageError(f"{where}: {message}", code) from None
