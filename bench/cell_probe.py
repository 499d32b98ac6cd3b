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
from bench.probe_vision import probe  # noqa: E402
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

    out: dict[str, list[torch.Tensor]] = {"in the scene": [], "crop, blocks": [], "crop, mean": []}
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
    return {name: torch.cat(parts) for name, parts in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--model", default="default")
    parser.add_argument("--train", type=int, default=3000, help="training-split scenes")
    parser.add_argument("--test", type=int, default=800, help="test-split scenes")
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()

    from vlm_chat.defaults import resolve_model
    from vlm_chat.model import VisionLanguageModel

    model, processor = VisionLanguageModel.from_pretrained(resolve_model(args.model), device="cpu", quantization="none")
    corpus = Path(args.corpus)
    train, test = cells(corpus, "train", args.train), cells(corpus, "test", args.test)
    labels = {name: n for n, name in enumerate(sorted({item[3] for item in train + test}))}
    train_y = torch.tensor([labels[item[3]] for item in train])
    test_y = torch.tensor([labels[item[3]] for item in test])
    start = time.perf_counter()
    train_x, test_x = features(model.vision_tower, processor, train), features(model.vision_tower, processor, test)
    kinds = sorted({item[2] for item in test})
    print(f"{len(train)} / {len(test)} cells of {args.train} / {args.test} scenes, {len(labels)} names, "
          f"features in {time.perf_counter() - start:.0f} s; linear probe, test accuracy")
    print("| features | all | " + " | ".join(kinds) + " |")
    print("|---|---|" + "---|" * len(kinds))
    for name in train_x:
        predicted = probe(train_x[name], train_y, test_x[name], test_y, len(labels), steps=args.steps, predict=True)
        right = predicted == test_y
        per_kind = [right[[k for k, item in enumerate(test) if item[2] == kind]].float().mean().item() for kind in kinds]
        print(f"| {name} | {100 * right.float().mean().item():.1f} % | "
              + " | ".join(f"{100 * acc:.1f} %" for acc in per_kind) + " |")


if __name__ == "__main__":
    main()
