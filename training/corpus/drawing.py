"""Plain coloured shapes and rendered words, drawn with Pillow."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

# Named colours chosen to be far apart in RGB, so a colour name is never a
# judgement call. Grey and black are left out: Fashion-MNIST items are grey.
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "orange": (245, 130, 20),
    "purple": (140, 50, 180),
    "pink": (240, 120, 190),
    "brown": (130, 80, 30),
}
COLORS = tuple(PALETTE)

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "pentagon", "cross")

# Short words to read: common, 2-5 letters, so they fit a 96 px row in bold.
WORDS = (
    "cat", "dog", "sun", "moon", "star", "tree", "fish", "bird", "book", "cake",
    "milk", "rain", "snow", "fire", "king", "ball", "door", "hat", "key", "map",
    "pen", "cup", "box", "bee", "egg", "owl", "fox", "zoo", "yes", "no",
    "stop", "go", "hello", "apple", "music", "car", "ship", "home", "red", "blue",
)

# Shapes are drawn this many times larger, then shrunk: cheap anti-aliasing.
SUPERSAMPLE = 4


def _regular_polygon(n: int, cx: float, cy: float, r: float, start: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(start + 2 * math.pi * k / n), cy + r * math.sin(start + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _outline(shape: str, s: float) -> list[tuple[float, float]] | None:
    """Polygon of `shape` inside an s x s box; None means an ellipse."""
    c, r = s / 2, s / 2 * 0.95
    up = -math.pi / 2  # first vertex straight up
    if shape == "circle":
        return None
    if shape == "square":
        m = s * 0.1
        return [(m, m), (s - m, m), (s - m, s - m), (m, s - m)]
    if shape == "triangle":
        return [(c, s * 0.05), (s * 0.97, s * 0.92), (s * 0.03, s * 0.92)]
    if shape == "diamond":
        return [(c, s * 0.02), (s * 0.8, c), (c, s * 0.98), (s * 0.2, c)]
    if shape == "hexagon":
        return _regular_polygon(6, c, c, r, 0.0)
    if shape == "pentagon":
        return _regular_polygon(5, c, c * 1.05, r, up)
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.42
            angle = up + math.pi * k / 5
            points.append((c + radius * math.cos(angle), c * 1.05 + radius * math.sin(angle)))
        return points
    if shape == "cross":
        a, b = s * 0.35, s * 0.65
        m = s * 0.05
        return [(a, m), (b, m), (b, a), (s - m, a), (s - m, b), (b, b), (b, s - m),
                (a, s - m), (a, b), (m, b), (m, a), (a, a)]
    raise ValueError(f"unknown shape {shape!r}; choices: {', '.join(SHAPES)}")


def draw_shape(shape: str, color: str, size: int) -> Image.Image:
    """A `color` `shape` on a transparent size x size RGBA tile."""
    big = size * SUPERSAMPLE
    tile = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(tile)
    fill = PALETTE[color] + (255,)
    points = _outline(shape, big)
    if points is None:
        m = big * 0.05
        draw.ellipse((m, m, big - m, big - m), fill=fill)
    else:
        draw.polygon(points, fill=fill)
    return tile.resize((size, size), Image.Resampling.LANCZOS)


def draw_word(word: str, color: str, font_path: str, max_width: int, max_height: int) -> Image.Image:
    """`word` in bold `color` letters on a transparent tile, as large as fits the box."""
    size = max_height
    while True:
        font = ImageFont.truetype(font_path, size)
        left, top, right, bottom = font.getbbox(word)
        if (right - left <= max_width and bottom - top <= max_height) or size <= 8:
            break
        size -= 1
    tile = Image.new("RGBA", (right - left, bottom - top), (0, 0, 0, 0))
    ImageDraw.Draw(tile).text((-left, -top), word, font=font, fill=PALETTE[color] + (255,))
    return tile
