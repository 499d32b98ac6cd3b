"""Image reading: every mode becomes upright RGB; bad files give clear errors."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from vlm_chat.errors import ImageError
from vlm_chat.images import load_image


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P", "CMYK", "I;16", "1"])
def test_every_mode_becomes_rgb(mode):
    image = Image.new("RGB", (10, 6), (200, 100, 50)).convert(mode)
    assert load_image(image).mode == "RGB"
    assert load_image(image).size == (10, 6)


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    rgb = load_image(image)
    assert rgb.getpixel((1, 1)) == (255, 255, 255)
    assert rgb.getpixel((0, 0)) == (255, 0, 0)


def test_palette_transparency_becomes_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 0
    assert load_image(image).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (30, 10), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert load_image(path).size == (10, 30)


def test_bytes_and_paths(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (5, 5)).save(buffer, format="PNG")
    assert load_image(buffer.getvalue()).size == (5, 5)
    path = tmp_path / "x.png"
    path.write_bytes(buffer.getvalue())
    assert load_image(str(path)).size == (5, 5)


def test_clear_errors(tmp_path):
    with pytest.raises(ImageError, match="missing.png: no such file"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    with pytest.raises(ImageError, match="notes.png: not a readable image"):
        load_image(bad)
    buffer = io.BytesIO()
    Image.new("L", (300, 300)).save(buffer, format="PNG")
    with pytest.raises(ImageError, match=r"^image: 300x300 pixels is over the limit of 10,000; downscale"):
        load_image(buffer.getvalue(), max_pixels=10_000)
