"""Do a cell's image tokens know what object it holds? Linear probes per grid cell.

    python bench/cell_probe.py --corpus DIR [--model BUNDLE] [--train 3000] [--test 800]

For every occupied cell of corpus scenes (shapes, Fashion-MNIST garments and clip art;
emoji are left out, with about a thousand names and a few pictures each), a linear
probe learns the object's name from features of the bundle's vision tower (the layer
the projector reads), trained on training-split scenes and scored on test-split ones:

  in the scene   the cell's own patch tokens from the whole scene, stacked (what a
                 pixel shuffle whose blocks are the cells gives the projector as one
                 token; with the default model's 96 px / 16 px grid, 2x2 patches)
  crop, blocks   the cell cut out and enlarged to the tower's input size, its patch grid
                 average-pooled to the same number of blocks and stacked
  crop, mean     the same crop, all patches averaged
  pixels         the cell's own RGB pixels as the corpus drew them (32x32x3 at 96 px), no
                 tower at all: the floor a tower's features should stand above

`--layers 0,2,4,6` instead probes the cell's own tokens in the scene from each of those
hidden states of the tower (0: the patch embeddings, 6: the last of six layers; the
default model's projector reads -2, the fifth), to see where in the tower an object's
identity is plainest; `2+5` probes the two concatenated, as a projector reading both
would (`vision.feature_layer` takes a list, as Llava's `vision_feature_layer` does).

`--epochs 1,4,16` fits the probe instead in minibatches of 8 at a fixed learning rate,
each training cell seen that many times: the build's stages see each scene once. Each
row then also scores the training cells themselves, next to how well the model names
objects in scenes it trained on.

Scored per kind of object, next to how often the model names that kind right in its
eval (`bench/confusions.py --naming`): a probe far above the model means the tower
holds what the LLM does not read out; near it means the tower is what limits naming.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.attention_probe import CELLS  # noqa: E402
from bench.probe_vision import probe, standardise  # noqa: E402
from training.corpus.scenes import GRID  # noqa: E402
from training.sharpen import cell_patches  # noqa: E402


def cells(corpus: Path, split: str, limit: int) -> list[tuple[Path, tuple[int, int], str, str]]:
    """(image, (row, col), kind, "kind:key") of every non-emoji object's cells in the first `limit` scenes."""
    items = []
    with (corpus / f"layouts_{split}.jsonl").open() as f:
        for index, line in enumerate(f):
            if index == limit:
                break
            row = json.loads(line)
            for obj in row["objects"]:
                if obj["kind"] == "emoji":
                    continue
                items.extend((corpus / row["image"], CELLS[cell], obj["kind"], f"{obj['kind']}:{obj['key']}")
                             for cell in obj["cells"])
    return items


@torch.no_grad()
def features(tower, processor, items, batch: int = 64) -> dict[str, torch.Tensor]:
    from PIL import Image

    from vlm_chat.images import load_image

    out: dict[str, list[torch.Tensor]] = {"in the scene": [], "crop, blocks": [], "crop, mean": [], "pixels": []}
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        images = [load_image(path) for path, *_ in chunk]
        scene = tower(processor.preprocess_images(images))  # (n, P, D) raster order
        side = math.isqrt(scene.shape[1])
        out["in the scene"].append(torch.stack([scene[k, cell_patches(side, *rc)].flatten()
                                                for k, (_, rc, *_rest) in enumerate(chunk)]))
        size = images[0].width // GRID
        crops = [image.crop((size * c, size * r, size * (c + 1), size * (r + 1))).resize(image.size, Image.BICUBIC)
                 for image, (_, (r, c), *_rest) in zip(images, chunk)]
        crop = tower(processor.preprocess_images(crops))
        grid = crop.transpose(1, 2).reshape(len(chunk), -1, side, side)  # (n, D, side, side)
        blocks = torch.nn.functional.adaptive_avg_pool2d(grid, side // GRID)
        out["crop, blocks"].append(blocks.flatten(2).transpose(1, 2).flatten(1))
        out["crop, mean"].append(crop.mean(1))
        out["pixels"].append(torch.stack([cell_pixels(image, rc) for image, (_, rc, *_rest) in zip(images, chunk)]))
    return {name: torch.cat(parts) for name, parts in out.items()}


@torch.no_grad()
def scene_features_by_layer(tower, processor, items, specs: list[tuple[int, ...]], batch: int = 64) -> dict[str, torch.Tensor]:
    """The cell's own patch tokens in the scene, stacked, from each spec's hidden states
    (several in one spec are concatenated per token, as a list `feature_layer` does)."""
    from vlm_chat.images import load_image

    layers = sorted({layer for spec in specs for layer in spec})
    kept, width = tower.feature_layer, tower.model.config.hidden_size
    tower.feature_layer = layers
    try:
        parts: list[torch.Tensor] = []
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            scene = tower(processor.preprocess_images([load_image(path) for path, *_ in chunk]))  # (n, P, D x layers)
            side = math.isqrt(scene.shape[1])
            parts.append(torch.stack([scene[k, cell_patches(side, *rc)] for k, (_, rc, *_rest) in enumerate(chunk)]))
    finally:
        tower.feature_layer = kept
    stacked = torch.cat(parts)  # (cells, patches of a cell, D x layers)
    by_layer = {layer: stacked[..., i * width:(i + 1) * width] for i, layer in enumerate(layers)}
    return {f"in the scene, hidden state {'+'.join(map(str, spec))}":
            torch.cat([by_layer[layer] for layer in spec], dim=-1).flatten(1) for spec in specs}


def layer_specs(text: str) -> list[tuple[int, ...]]:
    """"2,5,2+5" -> [(2,), (5,), (2, 5)]."""
    return [tuple(int(layer) for layer in spec.split("+")) for spec in text.split(",")]


def cell_pixels(image, cell: tuple[int, int]) -> torch.Tensor:
    """The RGB values (0-1) of one grid cell of a scene, flattened."""
    import numpy as np

    size = image.width // GRID
    r, c = cell
    crop = image.convert("RGB").crop((size * c, size * r, size * (c + 1), size * (r + 1)))
    return torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).flatten()


def minibatch_probe(train_x, train_y, test_x, classes: int, epochs: int, batch: int = 8,
                    lr: float = 3e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear probe on standardised features fit by AdamW in shuffled minibatches, each
    training row seen `epochs` times; returns its predictions on (the training rows, the
    test rows)."""
    train_x, test_x = standardise(train_x, test_x)
    torch.manual_seed(0)
    head = torch.nn.Linear(train_x.shape[1], classes)
    optim = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-2)
    for _ in range(epochs):
        for rows in torch.randperm(len(train_x)).split(batch):
            loss = torch.nn.functional.cross_entropy(head(train_x[rows]), train_y[rows])
            optim.zero_grad()
            loss.backward()
            optim.step()
    with torch.no_grad():
        return head(train_x).argmax(1), head(test_x).argmax(1)


def by_kind(right: torch.Tensor, items, kinds: list[str]) -> list[float]:
    """Share of `right` per kind of object (items' third field)."""
    return [right[[k for k, item in enumerate(items) if item[2] == kind]].float().mean().item() for kind in kinds]


def labelled_cells(corpus: Path, train_scenes: int, test_scenes: int):
    """(train cells, test cells, number of names, train labels, test labels) of the first
    scenes of each split, names numbered in sorted order."""
    train, test = cells(corpus, "train", train_scenes), cells(corpus, "test", test_scenes)
    labels = {name: n for n, name in enumerate(sorted({item[3] for item in train + test}))}
    return (train, test, len(labels), torch.tensor([labels[item[3]] for item in train]),
            torch.tensor([labels[item[3]] for item in test]))


def print_probe_table(train_x: dict, train_y, test_x: dict, test_y, test: list, classes: int, steps: int) -> None:
    """A markdown row per feature set: the full-batch linear probe's test accuracy, in all and by kind."""
    kinds = sorted({item[2] for item in test})
    print("| features | all | " + " | ".join(kinds) + " |")
    print("|---|---|" + "---|" * len(kinds))
    for name in train_x:
        right = probe(train_x[name], train_y, test_x[name], test_y, classes, steps=steps, predict=True) == test_y
        print(f"| {name} | {100 * right.float().mean().item():.1f} % | "
              + " | ".join(f"{100 * acc:.1f} %" for acc in by_kind(right, test, kinds)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--model", default="default")
    parser.add_argument("--train", type=int, default=3000, help="training-split scenes")
    parser.add_argument("--test", type=int, default=800, help="test-split scenes")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--layers", help="comma-separated hidden states of the tower to probe in the scene, "
                                         "instead of the default rows")
    parser.add_argument("--epochs", help="comma-separated: fit in minibatches, each cell seen this many times")
    args = parser.parse_args()

    from vlm_chat.defaults import resolve_model
    from vlm_chat.model import VisionLanguageModel

    model, processor = VisionLanguageModel.from_pretrained(resolve_model(args.model), device="cpu", quantization="none")
    train, test, classes, train_y, test_y = labelled_cells(Path(args.corpus), args.train, args.test)
    start = time.perf_counter()
    if args.layers:
        specs = layer_specs(args.layers)
        train_x, test_x = (scene_features_by_layer(model.vision_tower, processor, items, specs) for items in (train, test))
    else:
        train_x, test_x = features(model.vision_tower, processor, train), features(model.vision_tower, processor, test)
    print(f"{len(train)} / {len(test)} cells of {args.train} / {args.test} scenes, {classes} names, "
          f"features in {time.perf_counter() - start:.0f} s; linear probe, test accuracy")
    if args.epochs:
        kinds = sorted({item[2] for item in test})
        print("| features | epochs | test: all | " + " | ".join(kinds) + " | training cells: "
              + " | ".join(kinds) + " |")
        print("|---|---|---|" + "---|" * 2 * len(kinds))
        for name in train_x:
            for epochs in (int(e) for e in args.epochs.split(",")):
                on_train, on_test = minibatch_probe(train_x[name], train_y, test_x[name], classes, epochs)
                right = on_test == test_y
                print(f"| {name} | {epochs} | {100 * right.float().mean().item():.1f} % | "
                      + " | ".join(f"{100 * acc:.1f} %" for acc in by_kind(right, test, kinds)) + " | "
                      + " | ".join(f"{100 * acc:.1f} %" for acc in by_kind(on_train == train_y, train, kinds)) + " |")
        return
    print_probe_table(train_x, train_y, test_x, test_y, test, classes, args.steps)


if __name__ == "__main__":
    main()
