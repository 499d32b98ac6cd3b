"""Can a CLIP tell the corpus's shapes apart? Zero-shot on its single-shape images.

    python bench/clip_shapes.py --corpus DIR [--clip PATH_OR_HUB_ID] [--images 800]

The corpus draws 8 shapes in 8 colours; its `images/<split>/shape/` images hold one
shape each, and their captions name both ("a drawing of an orange hexagon"). For the
first `--images` test images, this prints zero-shot top-1 (the default prompt ensemble
of `vlm-chat classify`) for the shape among the 8 shapes, the colour among the 8
colours, the shape when the labels carry the true colour ("orange circle", "orange
square", ...), and the full name among all 64, each next to chance. A vision tower that
names colours but not shapes here cannot give the VLM the difference between a red
circle and a red square, however the VLM is trained on top of it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from training.corpus.drawing import COLORS, SHAPES
from vlm_chat.images import load_image
from vlm_chat.zero_shot import class_embeddings, encode_images, load_clip


def shape_images(corpus: Path, split: str, limit: int) -> list[tuple[Path, str, str]]:
    """(image, colour, shape) of the first `limit` single-shape images of `split`, read off their captions."""
    found: dict[str, tuple[str, str]] = {}
    for line in (corpus / f"captions_{split}.jsonl").read_text().splitlines():
        row = json.loads(line)
        if f"/{split}/shape/" not in f"/{row['image']}" or row["image"] in found:
            continue
        words = row["caption"].replace("-", " ").split()
        colours, shapes = [w for w in words if w in COLORS], [w for w in words if w in SHAPES]
        if len(colours) == 1 and len(shapes) == 1:
            found[row["image"]] = (colours[0], shapes[0])
        if len(found) == limit:
            break
    return [(corpus / name, colour, shape) for name, (colour, shape) in found.items()]


def zero_shot(clip: str | None, items: list[tuple[Path, str, str]]) -> dict[str, float]:
    model, processor = load_clip(clip)
    with torch.no_grad():
        images = encode_images(model, processor, [load_image(path) for path, _, _ in items])  # (N, D)
        shapes = class_embeddings(model, processor, list(SHAPES))  # (8, D)
        colours = class_embeddings(model, processor, list(COLORS))
        names = [f"{c} {s}" for c in COLORS for s in SHAPES]
        full = class_embeddings(model, processor, names)  # (64, D)
    shape_of = [SHAPES[i] for i in (images @ shapes.T).argmax(-1).tolist()]
    colour_of = [COLORS[i] for i in (images @ colours.T).argmax(-1).tolist()]
    name_of = [names[i] for i in (images @ full.T).argmax(-1).tolist()]
    scores = (images @ full.T).view(len(items), len(COLORS), len(SHAPES))  # (N, colour, shape)
    given_colour = [SHAPES[scores[n, COLORS.index(c)].argmax().item()] for n, (_, c, _) in enumerate(items)]
    n = len(items)
    return {
        "shape (of 8)": sum(p == s for p, (_, _, s) in zip(shape_of, items)) / n,
        "colour (of 8)": sum(p == c for p, (_, c, _) in zip(colour_of, items)) / n,
        "shape, true colour given (of 8)": sum(p == s for p, (_, _, s) in zip(given_colour, items)) / n,
        "colour and shape (of 64)": sum(p == f"{c} {s}" for p, (_, c, s) in zip(name_of, items)) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="corpus dir (`vlm-chat corpus build --out DIR`)")
    parser.add_argument("--clip", default=None, help="CLIP dir or hub id (default: the shipped CLIP)")
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    items = shape_images(Path(args.corpus), args.split, args.images)
    if not items:
        parser.error(f"{args.corpus}/captions_{args.split}.jsonl names no single-shape image")
    print(f"zero-shot on {len(items)} single-shape {args.split} images, CLIP {args.clip or 'shipped'}")
    print("| task | top-1 | chance | vs chance |")
    print("|---|---|---|---|")
    for task, accuracy in zero_shot(args.clip, items).items():
        chance = 1 / 64 if "64" in task else 1 / 8
        print(f"| {task} | {100 * accuracy:.1f} % | {100 * chance:.1f} % | {accuracy / chance:.1f}x |")


if __name__ == "__main__":
    main()
