"""The colour-and-shape pairs the corpus holds out of training: how the model and its tower do on them.

    python bench/held_pairs.py --corpus DIR --predictions EVAL/predictions.jsonl [--model BUNDLE ...]
        [--work WORK] [--test 3000]

The corpus's test split shows six colour-and-shape pairs that no training or validation
image shows (manifest.json `holdouts.shape_colors`: red circle, green diamond, ...).
Printed:
- from an eval's answers (`vlm-chat eval --out`), accuracy by question type, split by
  whether the question or the expected answer names a held-out pair;
- with `--model`, for each bundle, a linear head on each cell's own stacked patch tokens
  (the sharpen stage's object head, fit for 1,500 steps of 64 on the frozen tower's
  features of every training scene; needs WORK/sharpen.jsonl, which `vlm-chat default
  build --recipe sharpen` writes, or `training.default_model.write_sharpen`), scored on
  the shape cells of the first `--test` test scenes: held-out pairs against the rest;
- with `--rank BUNDLE`, for each object question of the eval whose answer is a held-out
  pair, where the right shape ranks among the 8 by the bundle's own likelihood of the
  answer "a <colour> <shape>" (1 = the one it would say).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def held_pairs(corpus: Path) -> list[str]:
    """The held-out pairs as the answers say them: "red circle"."""
    manifest = json.loads((corpus / "manifest.json").read_text())
    return [f"{colour} {shape}" for shape, colour in manifest["holdouts"]["shape_colors"]]


def names_a_pair(text: str, pairs: list[str]) -> bool:
    text = text.lower()
    return any(pair in text for pair in pairs)  # "red circles" too


def by_type(predictions: Path, pairs: list[str]) -> dict[str, dict[bool, tuple[int, int]]]:
    """type -> {names a held-out pair: (right, asked)}."""
    counts: dict[str, Counter] = {}
    for line in predictions.read_text().splitlines():
        row = json.loads(line)
        if "type" not in row:  # captions
            continue
        held = names_a_pair(row["question"] + " " + row["answer"], pairs)
        tally = counts.setdefault(row["type"], Counter())
        tally[(held, "asked")] += 1
        tally[(held, "right")] += bool(row["correct"])
    return {kind: {held: (tally[(held, "right")], tally[(held, "asked")]) for held in (True, False)}
            for kind, tally in sorted(counts.items())}


def tower_probe(bundle: str, train: Path, corpus: Path, pairs: list[str], test: int) -> dict[str, tuple[float, int]]:
    """A linear object head on the frozen tower's cell tokens: shape cells of held-out pairs against the rest."""
    from training.default_model import cell_labels
    from training.sharpen import IGNORE, _pixels, encode, fit_heads, read_cell_labels, stacked_cells
    from vlm_chat.model import VisionLanguageModel

    torch.manual_seed(0)
    model, processor = VisionLanguageModel.from_pretrained(bundle, device="cpu", quantization="none")
    tower = model.vision_tower.eval()
    train_paths, train_labels = read_cell_labels(train)
    layouts = [json.loads(line) for line in (corpus / "layouts_test.jsonl").read_text().splitlines()[:test]]
    names = sorted({n for row in train_labels["object"] for n in row if n is not None})
    ids = {n: i for i, n in enumerate(names)}
    targets = torch.tensor([[ids.get(n, IGNORE) for n in row] for row in train_labels["object"]])
    heads = fit_heads(encode(tower, _pixels(processor, train_paths)), {"object": targets}, {"object": len(names)}, 3,
                      steps=1500, batch_size=64, lr=1e-3, seed=0)
    with torch.no_grad():
        test_features = encode(tower, _pixels(processor, [corpus / r["image"] for r in layouts]))
        predicted = heads["object"](stacked_cells(test_features, 3)).argmax(-1)
    hits: Counter = Counter()
    for k, layout in enumerate(layouts):
        labels = cell_labels(layout)
        for cell, name in enumerate(labels["object"]):
            if name is None or not name.startswith("shape:"):
                continue
            group = "held-out pairs" if f"{labels['colour'][cell]} {name.removeprefix('shape:')}" in pairs else "the rest"
            hits[(group, "asked")] += 1
            hits[(group, "right")] += names[predicted[k, cell]] == name
    return {group: (hits[(group, "right")] / max(hits[(group, "asked")], 1), hits[(group, "asked")])
            for group in ("held-out pairs", "the rest")}


def answer_ranks(bundle: str, predictions: Path, pairs: list[str]) -> Counter:
    """rank of the right shape -> how many held-out object answers, by the likelihood of "a <colour> <shape>"."""
    import re

    from training.corpus.drawing import SHAPES
    from vlm_chat.model import VisionLanguageModel

    model, processor = VisionLanguageModel.from_pretrained(bundle, device="cpu", quantization="none")
    model.eval()
    ranks: Counter = Counter()
    for line in predictions.read_text().splitlines():
        row = json.loads(line)
        answer = re.sub(r"^(a|an) ", "", row["answer"]) if row.get("type") == "object" else ""
        if answer not in pairs:
            continue
        colour, shape = answer.split()
        batch = processor([{"role": "user", "content": [{"type": "image", "image": row["image"]},
                                                         {"type": "text", "text": row["question"]}]}])
        prompt = batch["input_ids"][0].tolist()
        scores = {}
        for candidate in SHAPES:
            said = processor.encode_text(f"a {colour} {candidate}")
            ids = torch.tensor([prompt + said])
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=batch["pixel_values"]).logits
            logp = torch.log_softmax(logits[0, len(prompt) - 1 : -1].float(), -1)
            scores[candidate] = sum(logp[i, token].item() for i, token in enumerate(said))
        ranks[sorted(scores, key=scores.get, reverse=True).index(shape) + 1] += 1
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, help="an eval's predictions.jsonl")
    parser.add_argument("--model", nargs="*", default=[], help="bundles whose towers to probe")
    parser.add_argument("--work", type=Path, help="a build's work dir holding sharpen.jsonl (for --model)")
    parser.add_argument("--test", type=int, default=3000, help="test scenes the tower probe scores")
    parser.add_argument("--rank", help="a bundle: where the right shape ranks in its likelihood (with --predictions)")
    args = parser.parse_args()
    pairs = held_pairs(args.corpus)
    print("held-out pairs: " + ", ".join(pairs))
    if args.predictions:
        print(f"\n{args.predictions}: right, by type and whether the question or answer names a held-out pair")
        print("| type | names one | right | the rest | right |\n|---|---|---|---|---|")
        for kind, split in by_type(args.predictions, pairs).items():
            (r1, n1), (r0, n0) = split[True], split[False]
            print(f"| {kind} | {n1} | {100 * r1 / max(n1, 1):.1f} % | {n0} | {100 * r0 / max(n0, 1):.1f} % |")
    if args.rank:
        if not args.predictions:
            parser.error("--rank needs --predictions")
        ranks = answer_ranks(args.rank, args.predictions, pairs)
        ordered = sorted(ranks.elements())
        print(f"\n{args.rank}: rank of the right shape among the 8, held-out object answers: "
              + ", ".join(f"{rank}: {n}" for rank, n in sorted(ranks.items()))
              + (f" (median {ordered[(len(ordered) - 1) // 2]}, n {len(ordered)})" if ordered else ""), flush=True)
    for bundle in args.model:
        if not args.work:
            parser.error("--model needs --work (the folder holding sharpen.jsonl)")
        result = tower_probe(bundle, args.work / "sharpen.jsonl", args.corpus, pairs, args.test)
        print(f"\n{bundle}: a linear head on a cell's tokens names its shape: "
              + ", ".join(f"{group} {100 * acc:.1f} % (n {n})" for group, (acc, n) in result.items()), flush=True)


if __name__ == "__main__":
    main()
