"""Offline image sources: Fashion-MNIST, Noto Color Emoji and OpenClipart.

Each loader checks its Debian package is installed and says which one to
install if not. Directory listings are sorted so the result never depends on
file-system order.
"""

from __future__ import annotations

import gzip
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlm_chat.errors import UserFacingError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
CLIPART_DIR = Path("/usr/share/openclipart/png")
WORD_FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")

# Noto Color Emoji only has a bitmap strike at 109 px; other sizes fail to load.
EMOJI_STRIKE = 109

# Official Fashion-MNIST class order (label index -> name), worded so that
# "a {name}" and "two {plural}" read naturally.
FASHION_CLASSES = (
    "t-shirt", "pair of trousers", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)

# OpenClipart folder -> label. Only folders whose files show one recognisable
# kind of object are kept: icon themes, patterns, "unsorted" and mixed folders
# ("recreation/sports", "office") would teach wrong captions. Only files
# directly inside each folder are taken. Penguins fold into "bird" so that no
# label is a kind of another (a yes/no "is there a bird?" must stay answerable).
CLIPART_FOLDERS = {
    "animals/birds": "bird",
    "animals/birds/penguin": "bird",
    "animals/bugs": "bug",
    "animals/dinosaurs": "dinosaur",
    "animals/fish": "fish",
    "animals/mammals/bears": "bear",
    "animals/mammals/big_cats": "big cat",
    "animals/mammals/dogs": "dog",
    "animals/mammals/horses": "horse",
    "animals/mammals/housecats": "cat",
    "buildings/furniture": "piece of furniture",
    "buildings/homes": "house",
    "education/books": "book",
    "electronics/battery": "battery",
    "electronics/bulb": "light bulb",
    "food/beverages": "drink",
    "food/breads_and_carbs": "loaf of bread",
    "food/desserts": "dessert",
    "food/fruit": "fruit",
    "food/vegetables": "vegetable",
    "office/telephone": "telephone",
    "people/clothing/hats": "hat",
    "people/smilies": "smiley face",
    "people/stickmen": "stick figure",
    "plants/flowers": "flower",
    "plants/trees": "tree",
    "plants/trees/evergreen": "tree",
    "recreation/games/cards/bordered": "playing card",
    "recreation/games/cards/simple": "playing card",
    "recreation/games/chess": "chess piece",
    "shapes/arrows": "arrow",
    "shapes/jigsaw": "jigsaw piece",
    "signs_and_symbols/clocks": "clock",
    "signs_and_symbols/flags/africa": "flag",
    "signs_and_symbols/flags/asia": "flag",
    "signs_and_symbols/flags/europe": "flag",
    "signs_and_symbols/weather": "weather symbol",
    "transportation/boating": "boat",
    "transportation/roadsigns": "road sign",
    "transportation/vehicles": "vehicle",
}

# A few posters are 13,000 px wide; decoding one takes seconds and ~700 MB, to
# end up 96 px wide. Skipping them loses a handful of files.
CLIPART_MAX_PIXELS = 16_000_000

# Codepoint ranges that hold single-codepoint pictographs in Noto Color Emoji.
# Digits, '#' and '*' (keycap bases) lie outside them on purpose.
EMOJI_RANGES = ((0x2000, 0x2BFF), (0x3000, 0x303F), (0x3290, 0x329F), (0x1F000, 0x1FAFF))
# Parts of sequences, not pictures on their own.
EMOJI_SKIP_WORDS = ("REGIONAL INDICATOR", "EMOJI MODIFIER", "VARIATION SELECTOR", "TAG ", "COMBINING")


class SourceMissingError(UserFacingError, FileNotFoundError):
    """A Debian-packaged image source is not installed."""


def require(path: Path, package: str) -> Path:
    """Return `path`, or raise an error naming the Debian package that ships it."""
    if not path.exists():
        raise SourceMissingError(
            f"corpus source not found: {path}; install it with "
            f"`apt-get install -y {package}`"
        )
    return path


@dataclass(frozen=True)
class SourcePaths:
    """Where the sources live; tests point these at missing paths."""

    fashion_dir: Path = FASHION_DIR
    emoji_font: Path = EMOJI_FONT
    clipart_dir: Path = CLIPART_DIR
    word_font: Path = WORD_FONT

    def check(self) -> None:
        require(self.fashion_dir / "train-images-idx3-ubyte.gz", "dataset-fashion-mnist")
        require(self.emoji_font, "fonts-noto-color-emoji")
        require(self.clipart_dir, "openclipart-png")
        require(self.word_font, "fonts-dejavu-core")


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (big-endian header: magic, then one uint32 per dim)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) of the official `train` or `test` split."""
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(require(root / f"{prefix}-images-idx3-ubyte.gz", "dataset-fashion-mnist"))
    labels = _read_idx(require(root / f"{prefix}-labels-idx1-ubyte.gz", "dataset-fashion-mnist"))
    return images, labels


def emoji_font(path: Path) -> ImageFont.FreeTypeFont:
    # Basic layout: one codepoint needs no shaping, and raqm fails on some
    # unassigned codepoints instead of reporting an empty glyph.
    return ImageFont.truetype(str(path), EMOJI_STRIKE, layout_engine=ImageFont.Layout.BASIC)


def list_emoji(path: Path) -> list[tuple[int, str]]:
    """(codepoint, readable name) of every single-codepoint pictograph in the font."""
    font = emoji_font(require(path, "fonts-noto-color-emoji"))
    found = []
    for lo, hi in EMOJI_RANGES:
        for cp in range(lo, hi + 1):
            name = unicodedata.name(chr(cp), "")
            if not name or any(word in name for word in EMOJI_SKIP_WORDS):
                continue
            left, top, right, bottom = font.getbbox(chr(cp))
            if bottom - top <= 0:  # no glyph in the font: zero-height box
                continue
            found.append((cp, name.lower()))
    return found


def render_emoji(font: ImageFont.FreeTypeFont, codepoint: int) -> Image.Image:
    """The glyph as RGBA, cropped to its visible pixels."""
    image = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
    ImageDraw.Draw(image).text((0, 0), chr(codepoint), font=font, embedded_color=True)
    box = image.getbbox()
    return image.crop(box) if box else image


def _png_pixels(path: Path) -> int:
    """Width x height from the PNG header (IHDR: big-endian uint32s at bytes 16-24),
    without Pillow's decompression-bomb check, which raises on these posters."""
    with path.open("rb") as f:
        header = f.read(24)
    return int.from_bytes(header[16:20], "big") * int.from_bytes(header[20:24], "big")


def list_clipart(root: Path) -> list[tuple[str, str]]:
    """(relative path, label) of every kept clip-art file, sorted by path."""
    require(root, "openclipart-png")
    found = []
    for folder, label in sorted(CLIPART_FOLDERS.items()):
        directory = root / folder
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.png")):
            if _png_pixels(path) <= CLIPART_MAX_PIXELS:
                found.append((str(path.relative_to(root)), label))
    return found


def load_clipart(path: Path, size: int) -> Image.Image:
    """RGBA clip art cropped to its opaque pixels and shrunk to fit `size` x `size`."""
    with Image.open(path) as opened:
        image = opened.convert("RGBA")
    box = image.getchannel("A").getbbox()
    if box:
        image = image.crop(box)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return image
