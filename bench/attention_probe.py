"""Does the LLM look at the part of the image a question is about?

    python bench/attention_probe.py --corpus DIR [--model BUNDLE] [--per-kind 150]

For corpus test questions whose answer depends on one grid cell, it runs the prompt
once (eager attention) and takes the attention from the position that produces the
first answer token to the image tokens. Of that attention, the share that falls on the
image tokens overlapping the cell, divided by those tokens' share of all image tokens,
is the lift: 1.0 is looking everywhere alike, 4.0 (for 4 of 16 tokens) is looking only
there. The same is measured from the question's own tokens (mean over them), since an
answer can also reach the image through them. Lift is averaged over questions and
heads, per group of layers; "best head" is the single (layer, head) with the highest
mean lift.

Question kinds (the cell comes from the answer, the question, or the scene layout):
  where      "Where is the pink square?"   -> the object's cell (the answer); needs a search by content
  what-at    "What is in the top left?"    -> the named cell; needs a look-up by position
  colour-of  "What colour is the diamond?" -> the one matching object's cell (layout)
If the lift is high for colour-of (which the default model gets right 78 % of the time)
and low for where, the LLM fails to find the object; if it is high for both, it finds
the object but cannot read the position off it.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from training.corpus.scenes import CELL_NAMES, GRID

CELLS = {name: cell for cell, name in CELL_NAMES.items()}  # "top left" -> (0, 0)


def cell_tokens(name: str, side: int) -> list[int]:
    """Token slots (row-major on a side x side grid) whose square overlaps the grid cell."""
    row, col = CELLS[name]
    lo, hi = row / GRID, (row + 1) / GRID
    rows = [r for r in range(side) if r / side < hi and (r + 1) / side > lo]
    lo, hi = col / GRID, (col + 1) / GRID
    cols = [c for c in range(side) if c / side < hi and (c + 1) / side > lo]
    return [r * side + c for r in rows for c in cols]


def named_cell(text: str) -> str | None:
    for name in sorted(CELLS, key=len, reverse=True):
        if name in text:
            return name
    return None


def questions(corpus: Path, per_kind: int, seed: int) -> dict[str, list[tuple[Path, str, str]]]:
    layouts = {}
    with (corpus / "layouts_test.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            layouts[row["image"]] = row["objects"]
    kinds: dict[str, list[tuple[Path, str, str]]] = {"where": [], "what-at": [], "colour-of": []}
    with (corpus / "triples_test.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            image, question, answer = corpus / row["image"], row["question"], row["answer"]
            if row["type"] == "position" and answer in CELLS:
                kinds["where"].append((image, question, answer))
            elif row["type"] == "object" and named_cell(question.lower()):
                kinds["what-at"].append((image, question, named_cell(question.lower())))
            elif row["type"] == "color":
                words = question.lower().rstrip("?").split()
                hits = [o for o in layouts.get(row["image"], [])
                        if o["key"] in words or o["key"] + "s" in words]
                if len(hits) == 1 and len(hits[0]["cells"]) == 1:
                    kinds["colour-of"].append((image, question, hits[0]["cells"][0]))
    rng = random.Random(seed)
    return {k: rng.sample(v, min(per_kind, len(v))) for k, v in kinds.items()}


@torch.no_grad()
def lifts(model, processor, items) -> torch.Tensor:
    """(questions, 2, layers, heads): lift of attention on the cell's image tokens, from the
    position that emits the answer and (mean) from the question's own tokens."""
    from vlm_chat.chat import user_message

    side = int(model.projector_tokens**0.5)
    out = []
    for image, question, cell in items:
        inputs = processor([user_message(question, [image])])
        attentions = model(**inputs, output_attentions=True).attentions
        slots = (inputs["input_ids"][0].to(model.device) == model.image_token_id).nonzero().flatten()
        target = slots[cell_tokens(cell, side)]
        after = slots[-1] + 1  # the question and the template's tokens follow the image
        per_layer = []
        for layer in attentions:  # (1, heads, T, T)
            rows = {"answer": layer[0, :, -1, :], "question": layer[0, :, after:-1, :]}  # (heads, [T'], T)
            lift = []
            for name, att in rows.items():
                share = att[..., target].sum(-1) / att[..., slots].sum(-1)
                lift.append((share / (len(target) / len(slots))).reshape(att.shape[0], -1).mean(-1))
            per_layer.append(torch.stack(lift))  # (2, heads)
        out.append(torch.stack(per_layer, 1))  # (2, layers, heads)
    return torch.stack(out)  # (questions, 2, layers, heads)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--model", default="default")
    parser.add_argument("--per-kind", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from vlm_chat.defaults import resolve_model
    from vlm_chat.model import VisionLanguageModel

    model, processor = VisionLanguageModel.from_pretrained(resolve_model(args.model), device="cpu", quantization="none")
    model.language_model.set_attn_implementation("eager")  # sdpa returns no attention weights
    kinds = questions(Path(args.corpus), args.per_kind, args.seed)
    results = {kind: lifts(model, processor, items) for kind, items in kinds.items() if items}
    layers = next(iter(results.values())).shape[2]
    groups = [range(s, min(s + 5, layers)) for s in range(0, layers, 5)]
    print(f"model {args.model}; lift of attention on the asked-about cell (1.0 = no preference)")
    print("| question kind | attention from | n | " + " | ".join(f"layers {g[0] + 1}-{g[-1] + 1}" for g in groups)
          + " | best head |")
    print("|---|---|---|" + "---|" * (len(groups) + 1))
    for kind, lift in results.items():
        for index, source in enumerate(("answer position", "question tokens")):
            mean = lift[:, index].mean(0)  # (layers, heads)
            cols = [f"{mean[list(g)].mean().item():.2f}" for g in groups]
            best = mean.flatten().argmax().item()
            layer, head = divmod(best, mean.shape[1])
            cols.append(f"{mean.flatten()[best].item():.2f} (layer {layer + 1}, head {head + 1})")
            print(f"| {kind} | {source} | {len(lift)} | " + " | ".join(cols) + " |")


if __name__ == "__main__":
    main()
