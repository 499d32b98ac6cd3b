"""Can an object be *found* in the image tokens? A small attention read-out, not the LLM.

    python bench/find_probe.py --corpus DIR [--model BUNDLE] [--train 4000] [--test 1000] [--steps 600]

The default model places a lone object almost always but picks the wrong one of two objects
about half the time (docs/experiments.md). Is that the LLM, or is the object's identity not in
the tokens where the object is? This probe answers with the mechanism an LLM would use:
one query built from the object's description (an embedding of its colour plus one of its
kind: "pink" + "star", or just "bug"), one attention over the image's tokens (keys from a
small MLP on each token), and the cell read off *where the attention lands* only (a linear
map from the attention weights to the 9 cells). So it can only be right by attending to
the right token; it cannot read the answer from the query.

Objects that appear once, in scenes of 2-6 objects. Run on:
  the image embeddings the LLM receives (the projector's output, 16 tokens here),
  the bundle's vision features before the projector (64 patches here),
  a randomly initialised tower's features (baseline: what the shape of the data gives),
and, for each, the same read-out with the query zeroed (it can only guess an object).
Test scenes hold colour-and-shape combinations training never had, as the corpus does.
If the read-out finds the object in the LLM's tokens far more often than the VLM answers
"Where is the X?" right, the information is there and the LLM side is the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.probe_vision import CELLS, encoded, random_tower  # noqa: E402


def objects(corpus: Path, split: str, limit: int) -> tuple[list[Path], list[tuple[int, str, str, int, int]]]:
    """Scene images and (scene index, colour, kind, cell index, objects in scene) for every
    object that appears once in a scene of at least two objects."""
    paths, found = [], []
    with (corpus / f"layouts_{split}.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            total = sum(obj["count"] for obj in row["objects"])
            if total < 2:
                continue
            for obj in row["objects"]:
                if obj["count"] == 1:
                    found.append((len(paths), obj["color"] or "-", obj["key"], CELLS.index(obj["cells"][0]), total))
            paths.append(corpus / row["image"])
            if len(paths) == limit:
                break
    return paths, found


class FindReadout(nn.Module):
    def __init__(self, width: int, slots: int, colours: int, kinds: int, dim: int = 64, linear_key: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        # A linear key is what an LLM's first attention layer has (W_k on the normed token).
        self.key = nn.Linear(width, dim) if linear_key else nn.Sequential(nn.Linear(width, 256), nn.GELU(), nn.Linear(256, dim))
        self.colour = nn.Embedding(colours, dim)
        self.kind = nn.Embedding(kinds, dim)
        self.cell = nn.Linear(slots, len(CELLS))
        self.scale = dim ** -0.5

    def forward(self, image_tokens, colour, kind, use_query: bool = True):
        keys = self.key(self.norm(image_tokens))  # (B, P, dim)
        query = self.colour(colour) + self.kind(kind)  # (B, dim)
        if not use_query:
            query = torch.ones_like(query)  # the same query for every object: none is named
        weights = torch.softmax((keys @ query.unsqueeze(-1)).squeeze(-1) * self.scale, dim=-1)  # (B, P)
        return self.cell(weights)


def fit_and_test(train_x, train_items, test_x, test_items, vocab, steps: int, use_query: bool,
                 linear_key: bool = False) -> dict:
    colours, kinds = vocab

    def tensors(items):
        scene = torch.tensor([i[0] for i in items])
        colour = torch.tensor([colours.get(i[1], 0) for i in items])
        kind = torch.tensor([kinds.get(i[2], 0) for i in items])
        cell = torch.tensor([i[3] for i in items])
        return scene, colour, kind, cell

    torch.manual_seed(0)
    readout = FindReadout(train_x.shape[-1], train_x.shape[1], len(colours) + 1, len(kinds) + 1, linear_key=linear_key)
    optim = torch.optim.AdamW(readout.parameters(), lr=2e-3, weight_decay=1e-2)
    scene, colour, kind, cell = tensors(train_items)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        pick = torch.randint(len(scene), (256,), generator=generator)
        logits = readout(train_x[scene[pick]], colour[pick], kind[pick], use_query)
        loss = nn.functional.cross_entropy(logits, cell[pick])
        optim.zero_grad()
        loss.backward()
        optim.step()
    scene, colour, kind, cell = tensors(test_items)
    with torch.no_grad():
        right = readout(test_x[scene], colour, kind, use_query).argmax(-1) == cell
    total = torch.tensor([i[4] for i in test_items])
    by_count = {n: right[total == n].float().mean().item() for n in sorted(set(total.tolist()))}
    return {"all": right.float().mean().item(), "by_objects": by_count, "n": len(test_items)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--model", default="default")
    parser.add_argument("--train", type=int, default=4000, help="training scenes of 2-6 objects")
    parser.add_argument("--test", type=int, default=1000, help="test scenes of 2-6 objects")
    parser.add_argument("--steps", type=int, default=600, help="read-out training steps of 256 objects")
    parser.add_argument("--linear-key", action="store_true", help="keys linear in the normed token, as in an LLM layer")
    parser.add_argument("--llm-tokens-only", action="store_true", help="probe only the image embeddings the LLM receives")
    args = parser.parse_args()

    from vlm_chat.defaults import resolve_model
    from vlm_chat.model import VisionLanguageModel

    model, processor = VisionLanguageModel.from_pretrained(resolve_model(args.model), device="cpu", quantization="none")
    model.eval()
    encoders = {"image embeddings the LLM receives": model.get_image_features}
    if not args.llm_tokens_only:
        encoders["the bundle's vision features (before the projector)"] = model.vision_tower
        encoders["random init tower (baseline)"] = random_tower(model)
    train_paths, train_items = objects(args.corpus, "train", args.train)
    test_paths, test_items = objects(args.corpus, "test", args.test)
    colours = {c: n + 1 for n, c in enumerate(sorted({i[1] for i in train_items}))}
    kinds = {k: n + 1 for n, k in enumerate(sorted({i[2] for i in train_items}))}
    seen = {(t[1], t[2]) for t in train_items}
    unseen = sum((i[1], i[2]) not in seen for i in test_items)
    print(f"{len(train_items)} objects in {len(train_paths)} training scenes, {len(test_items)} in {len(test_paths)} "
          f"test scenes ({unseen} of them a colour-and-kind pair training never had); {args.steps} steps x 256, "
          f"{'linear' if args.linear_key else 'MLP'} keys\n")
    print("| tokens | n tokens | found (cell right) | 2 objects | 3 | 4 | 5 | 6 | no query (guess an object) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, encode in encoders.items():
        start = time.perf_counter()
        train_x, test_x = encoded(encode, processor, train_paths), encoded(encode, processor, test_paths)
        found = fit_and_test(train_x, train_items, test_x, test_items, (colours, kinds), args.steps, True,
                             args.linear_key)
        blind = fit_and_test(train_x, train_items, test_x, test_items, (colours, kinds), args.steps, False,
                             args.linear_key)
        counts = " | ".join(f"{100 * found['by_objects'].get(n, float('nan')):.1f} %" for n in range(2, 7))
        print(f"| {name} | {train_x.shape[1]} | {100 * found['all']:.1f} % | {counts} | {100 * blind['all']:.1f} % |"
              f"  ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
