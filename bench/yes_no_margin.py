"""How far a better yes/no threshold could take the model: its margin logit("yes") - logit("no").

    python bench/yes_no_margin.py --model BUNDLE --test WORK/eval_triples.jsonl \
        [--val CORPUS/triples_val.jsonl --val-questions 1140] [--seed 0]

The yes/no F1 bar counts "yes" as the positive class. Greedy decoding says "yes" when the
first answer token's logit for "yes" beats the one for "no", a threshold of 0 on their
difference. Would another threshold meet the bar, or does the model not tell the cases
apart well enough? For every question whose expected answer is "yes" or "no", one forward
pass over the prompt gives that margin. Printed, on the test questions:
- F1 and the "yes" share at margin 0, which should be the eval's own figures;
- ROC AUC of the margin: how well it ranks the true "yes" above the true "no";
- the best F1 over every threshold, a ceiling, since it picks the threshold by looking at
  the test answers;
- with --val, the threshold that gives the best F1 on validation questions, applied to
  the test questions. That is the figure a calibrated model could claim.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def yes_no_rows(path: Path, limit: int = 0, seed: int = 0) -> list[dict]:
    """The rows of a triples file whose answer is "yes" or "no" as the eval reads it (all, or
    a seeded sample of `limit`)."""
    from training.evaluate import normalize_answer

    rows = [row for row in map(json.loads, path.read_text().splitlines()) if normalize_answer(row["answer"]) in ("yes", "no")]
    if limit and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    return rows


def margins(bundle: str, rows: list[dict], image_root: Path) -> list[float]:
    """logit("yes") - logit("no") for the first answer token of each row's question."""
    from tqdm import tqdm

    from vlm_chat.model import VisionLanguageModel

    model, processor = VisionLanguageModel.from_pretrained(bundle, device="cpu", quantization="none")
    model.eval()
    yes, no = processor.encode_text("yes")[0], processor.encode_text("no")[0]
    out = []
    for row in tqdm(rows, desc="margins", unit="question"):
        image = row["image"] if Path(row["image"]).is_absolute() else str(image_root / row["image"])
        batch = processor([{"role": "user", "content": [{"type": "image", "image": image},
                                                         {"type": "text", "text": row["question"]}]}])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=batch["pixel_values"]).logits[0, -1].float()
        out.append((logits[yes] - logits[no]).item())
    return out


def f1_at(scores: list[float], truth: list[bool], threshold: float) -> tuple[float, float]:
    """(F1 of "yes", "yes" share) when every score above `threshold` is answered "yes",
    scored by the eval's own `yes_no_scores`."""
    from training.evaluate import VQAItem, yes_no_scores

    result = yes_no_scores([VQAItem("yes" if s > threshold else "no", "yes" if t else "no", None)
                            for s, t in zip(scores, truth)])
    return result["f1"], result["yes_share"]


def best_threshold(scores: list[float], truth: list[bool]) -> tuple[float, float]:
    """(threshold, F1): the threshold between two neighbouring scores that gives the best F1."""
    values = sorted(set(scores))
    candidates = [values[0] - 1.0] + [(a + b) / 2 for a, b in zip(values, values[1:])]
    best = max(candidates, key=lambda t: f1_at(scores, truth, t)[0])
    return best, f1_at(scores, truth, best)[0]


def roc_auc(scores: list[float], truth: list[bool]) -> float:
    """The chance that a true "yes" scores above a true "no" (ties count half)."""
    pos = [s for s, t in zip(scores, truth) if t]
    neg = [s for s, t in zip(scores, truth) if not t]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a bundle")
    parser.add_argument("--test", type=Path, required=True, help="the eval's triples (WORK/eval_triples.jsonl)")
    parser.add_argument("--val", type=Path, help="validation triples to pick the threshold on (CORPUS/triples_val.jsonl)")
    parser.add_argument("--val-questions", type=int, default=1140, help="a seeded sample of its yes/no rows (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from training.evaluate import normalize_answer

    test = yes_no_rows(args.test)
    truth = [normalize_answer(row["answer"]) == "yes" for row in test]
    scores = margins(args.model, test, args.test.parent)
    f1, share = f1_at(scores, truth, 0.0)
    top, top_f1 = best_threshold(scores, truth)
    top_share = f1_at(scores, truth, top)[1]
    print(f"\n{args.model}: {len(test)} test yes/no questions, true \"yes\" share {100 * sum(truth) / len(truth):.1f} %")
    print("| threshold on logit(yes) - logit(no) | F1 | \"yes\" share |\n|---|---|---|")
    print(f"| 0 (greedy) | {100 * f1:.1f} % | {100 * share:.1f} % |")
    print(f"| {top:+.2f}, best on the test answers (a ceiling) | {100 * top_f1:.1f} % | {100 * top_share:.1f} % |")
    if args.val:
        val = yes_no_rows(args.val, args.val_questions, args.seed)
        val_truth = [normalize_answer(row["answer"]) == "yes" for row in val]
        val_scores = margins(args.model, val, args.val.parent)
        picked, val_f1 = best_threshold(val_scores, val_truth)
        f1_val, share_val = f1_at(scores, truth, picked)
        print(f"| {picked:+.2f}, best on {len(val)} validation questions (F1 there {100 * val_f1:.1f} %) | "
              f"{100 * f1_val:.1f} % | {100 * share_val:.1f} % |")
    print(f"\nROC AUC of the margin on the test questions: {roc_auc(scores, truth):.3f}")


if __name__ == "__main__":
    main()
