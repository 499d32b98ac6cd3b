"""Can a CLIP tell the corpus's shapes apart? Zero-shot on its single-shape images.

    python bench/clip_shapes.py --corpus DIR [--clip PATH_OR_HUB_ID] [--images 800] [--probe 3000]

The corpus draws 8 shapes in 8 colours; its `images/<split>/shape/` images hold one
shape each, and their captions name both ("a drawing of an orange hexagon"). For the
first `--images` test images, this prints zero-shot top-1 (the default prompt ensemble
of `vlm-chat classify`) for the shape among the 8 shapes, the colour among the 8
colours, the shape when the labels carry the true colour ("orange circle", "orange
square", ...), and the full name among all 64, each next to chance. A vision tower that
names colours but not shapes here cannot give the VLM the difference between a red
circle and a red square, however the VLM is trained on top of it.

Zero-shot asks the text tower too. `--probe N` asks the image features alone: a linear
probe (L2-regularised logistic regression, fit with L-BFGS) on the pooled output and
the mean patch feature of N training-split shape images, scored on the same test images.
Far above zero-shot means the shape is in the features but not tied to its word; near
it means the features hold little of it.
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


def zero_shot(model, processor, items: list[tuple[Path, str, str]]) -> dict[str, float]:
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


def image_features(model, processor, items: list[tuple[Path, str, str]], batch_size: int = 256) -> torch.Tensor:
    """(N, 2D): the vision tower's pooled output next to its mean patch feature."""
    chunks = []
    for start in range(0, len(items), batch_size):
        images = [load_image(path) for path, _, _ in items[start:start + batch_size]]
        with torch.no_grad():
            out = model.vision_model(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
        chunks.append(torch.cat([out.pooler_output, out.last_hidden_state[:, 1:].mean(dim=1)], dim=-1))
    return torch.cat(chunks)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 classes: int, l2: float = 1e-3) -> tuple[float, float]:
    """Train and test accuracy of a logistic regression on standardised features."""
    mean, std = train_x.mean(dim=0), train_x.std(dim=0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(train_x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300)

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(train_x @ weight + bias, train_y) + l2 * weight.pow(2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    with torch.no_grad():
        return tuple(((x @ weight + bias).argmax(dim=-1) == y).float().mean().item()
                     for x, y in ((train_x, train_y), (test_x, test_y)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="corpus dir (`vlm-chat corpus build --out DIR`)")
    parser.add_argument("--clip", default=None, help="CLIP dir or hub id (default: the shipped CLIP)")
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--split", default="test")
    parser.add_argument("--probe", type=int, default=0, help="also fit a linear probe on this many training images")
    args = parser.parse_args()
    items = shape_images(Path(args.corpus), args.split, args.images)
    if not items:
        parser.error(f"{args.corpus}/captions_{args.split}.jsonl names no single-shape image")
    print(f"zero-shot on {len(items)} single-shape {args.split} images, CLIP {args.clip or 'shipped'}")
    print("| task | top-1 | chance | vs chance |")
    print("|---|---|---|---|")
    model, processor = load_clip(args.clip)
    for task, accuracy in zero_shot(model, processor, items).items():
        chance = 1 / 64 if "64" in task else 1 / 8
        print(f"| {task} | {100 * accuracy:.1f} % | {100 * chance:.1f} % | {accuracy / chance:.1f}x |")
    if args.probe:
        fit = shape_images(Path(args.corpus), "train", args.probe)
        labels = [torch.tensor([SHAPES.index(shape) for _, _, shape in part]) for part in (fit, items)]
        train_acc, test_acc = linear_probe(image_features(model, processor, fit), labels[0],
                                           image_features(model, processor, items), labels[1], len(SHAPES))
        print(f"| shape (of 8), linear probe on image features ({len(fit)} train images) | {100 * test_acc:.1f} % "
              f"| 12.5 % | {test_acc / 0.125:.1f}x (train {100 * train_acc:.1f} %) |")


if __name__ == "__main__":
    main()
