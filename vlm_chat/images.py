"""Image -> RGB PIL image -> `pixel_values` (N, 3, S, S).

Reading is ours (formats, EXIF rotation, transparency, size limits); resizing,
padding to square with the mean colour and normalising are done by transformers'
Llava image processor, so an exported checkpoint preprocesses exactly like we do.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps, UnidentifiedImageError

from vlm_chat.config import ImageConfig
from vlm_chat.errors import ConfigError, ImageError

ImageInput = Union[str, Path, bytes, Image.Image]

# Decompression-bomb guard: 64 MP is larger than any phone photo and far below
# what would exhaust memory once decoded.
DEFAULT_MAX_PIXELS = 64_000_000
ASPECTS = ("pad", "resize")


def load_image(source: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open a path, raw bytes or PIL image and return an upright RGB image."""
    name = str(source) if isinstance(source, (str, Path)) else "image"
    if isinstance(source, Image.Image):
        return to_rgb(source)
    opened = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with Image.open(opened) as image:
            # Pillow's own bomb check only warns below 2x its limit; check ourselves
            # from the header, before the pixel data is decoded.
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{name}: {width}x{height} pixels is over the limit of {max_pixels:,}; "
                    "downscale the image first"
                )
            image.load()
            return to_rgb(image)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a folder, not an image file") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a readable image (unknown format); use PNG, JPEG, WebP, GIF or BMP") from None
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{name}: not a readable image ({err}); the file may be truncated or corrupt") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any mode (RGBA, P, L, CMYK, I;16...) to RGB.

    Transparent pixels become white: clip-art and emoji are drawn for a light
    background, and a plain `convert("RGB")` would show whatever colour happens to sit
    under the alpha channel (often black).
    """
    image = ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale to 8 bits instead of clipping at 255.
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def make_image_processor(
    image_size: int, image_mean: list[float], image_std: list[float], config: ImageConfig
):
    """The transformers Llava image processor set up for one vision tower."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    if config.aspect not in ASPECTS:
        raise ConfigError(f"image.aspect {config.aspect!r} is unknown; choose one of: {', '.join(ASPECTS)}")
    pad = config.aspect == "pad"
    return LlavaImageProcessorPil(
        do_pad=pad,
        # Padded images are square, so shortest-edge resize gives S x S and the crop
        # is a no-op; "resize" stretches straight to S x S.
        size={"shortest_edge": image_size} if pad else {"height": image_size, "width": image_size},
        do_center_crop=pad,
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(image_mean),
        image_std=list(image_std),
    )
