"""Pixels: turn a job (one single-object image or one scene) into a PNG and its rows.

Runs in worker processes. Everything random comes from `random.Random(job.key)`,
so a job renders to the same bytes in any process, in any order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from training.corpus import sources
from training.corpus.drawing import COLORS, draw_shape, draw_word
from training.corpus.scenes import GRID, Item, Scene, Vocabulary, describe_scene
from training.corpus.templates import SINGLE_CAPTIONS, article

WHITE = (255, 255, 255)


@dataclass(frozen=True)
class Assets:
    """What workers need to draw; set once per process by `install`."""

    out: Path
    canvas: int
    captions_per_image: int
    fashion: dict[str, np.ndarray]  # official split -> (N, 28, 28) uint8
    clipart: tuple[Image.Image, ...]  # RGBA, at most canvas x canvas
    emoji_font: Path
    word_font: Path
    vocab: Vocabulary


@dataclass(frozen=True)
class Job:
    split: str
    path: str  # relative to the output dir
    kind: str  # "scene" or an Item kind or "word"
    key: str  # seeds this job's random choices
    item: Item | None = None
    word: str | None = None
    scene: Scene | None = None


_ASSETS: Assets | None = None


def install(assets: Assets) -> None:
    global _ASSETS
    _ASSETS = assets


@lru_cache(maxsize=None)
def _emoji_glyph(codepoint: int) -> Image.Image:
    return sources.render_emoji(sources.emoji_font(_ASSETS.emoji_font), codepoint)


def _fit(tile: Image.Image, size: int) -> Image.Image:
    """`tile` shrunk (or grown) to fit size x size, centred on a transparent square."""
    scale = size / max(tile.size)
    w, h = max(1, round(tile.width * scale)), max(1, round(tile.height * scale))
    square = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    square.paste(tile.resize((w, h), Image.Resampling.LANCZOS), ((size - w) // 2, (size - h) // 2))
    return square


def item_tile(item: Item, size: int) -> Image.Image:
    """The item as an RGBA size x size tile with a transparent background."""
    if item.kind == "shape":
        shape, color = item.ref.split("/")
        return draw_shape(shape, color, size)
    if item.kind == "emoji":
        return _fit(_emoji_glyph(int(item.ref)), size)
    if item.kind == "clipart":
        return _fit(_ASSETS.clipart[int(item.ref)], size)
    if item.kind == "fashion":
        split, index = item.ref.split(":")
        grey = _ASSETS.fashion[split][int(index)]
        # Fashion-MNIST is light-on-black; as a dark item on white it sits in a
        # scene like the other objects: ink colour black, opacity = brightness.
        rgba = np.zeros((28, 28, 4), dtype=np.uint8)
        rgba[..., 3] = grey
        return Image.fromarray(rgba, "RGBA").resize((size, size), Image.Resampling.LANCZOS)
    raise ValueError(f"unknown item kind {item.kind!r}")


def _paste(canvas: Image.Image, tile: Image.Image, x: int, y: int) -> None:
    canvas.paste(tile, (x, y), tile)


def _render_single(job: Job, rng: random.Random) -> tuple[Image.Image, dict[str, str]]:
    s = _ASSETS.canvas
    if job.kind == "fashion":
        split, index = job.item.ref.split(":")
        # Kept as the native 28x28 grey image, as in the official benchmark.
        image = Image.fromarray(_ASSETS.fashion[split][int(index)], "L")
        return image, {"name": job.item.name}
    image = Image.new("RGB", (s, s), WHITE)
    if job.kind == "word":
        color = rng.choice(COLORS)
        tile = draw_word(job.word, color, str(_ASSETS.word_font), s - 8, rng.randint(s // 5, s // 3))
        _paste(image, tile, rng.randint(0, s - tile.width), rng.randint(0, s - tile.height))
        return image, {"name": job.word, "color": color}
    size = rng.randint(int(s * 0.45), int(s * 0.9))
    _paste(image, item_tile(job.item, size), rng.randint(0, s - size), rng.randint(0, s - size))
    return image, {"name": job.item.name}


def _render_scene(scene: Scene) -> Image.Image:
    s = _ASSETS.canvas
    cell = s // GRID
    image = Image.new("RGB", (s, s), WHITE)
    for group in scene.groups:
        for p in group.placements:
            _paste(image, item_tile(group.item, p.size), p.col * cell + p.dx, p.row * cell + p.dy)
    if scene.word:
        tile = draw_word(scene.word, scene.word_color, str(_ASSETS.word_font), s - 6, cell - 4)
        _paste(image, tile, (s - tile.width) // 2, scene.word_row * cell + (cell - tile.height) // 2)
    return image


def render_job(job: Job) -> tuple[list[dict], list[dict], dict | None]:
    """Write the job's PNG; return its caption rows, triple rows and label row."""
    rng = random.Random(job.key)
    n = _ASSETS.captions_per_image
    triples: list[dict] = []
    label = None
    if job.scene is not None:
        image = _render_scene(job.scene)
        captions, triples = describe_scene(rng, job.scene, _ASSETS.vocab, n)
    else:
        image, fields = _render_single(job, rng)
        fields["a_name"] = article(fields["name"])
        templates = SINGLE_CAPTIONS[job.kind]
        captions = [t.format(**fields) for t in rng.sample(templates, k=min(n, len(templates)))]
        if job.kind in ("fashion", "emoji", "clipart"):
            label = {"image": job.path, "label": fields["name"]}
    path = _ASSETS.out / job.path
    path.parent.mkdir(parents=True, exist_ok=True)
    # optimize=False and no metadata: the bytes depend on the pixels only.
    image.save(path, format="PNG")
    caption_rows = [{"image": job.path, "caption": c} for c in captions]
    triple_rows = [{"image": job.path, **t} for t in triples]
    return caption_rows, triple_rows, label
