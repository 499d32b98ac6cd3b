"""Which answers does a model give when it is wrong? Per expected answer, from eval predictions.

    python bench/confusions.py EVAL_DIR/predictions.jsonl [--type position] [--min-n 10]

Reads the predictions.jsonl that `vlm-chat eval --out EVAL_DIR` writes and prints, for
each expected answer of the chosen question type: how often it was asked, how often it
was answered right, and the answers given most often. A model that has not learned a
type gives the same few answers whatever the truth is; that shows here and not in the
accuracy alone. Answers are compared after the same normalisation as the eval.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

from training.evaluate import normalize_answer


def confusions(rows: list[dict], kind: str | None) -> list[tuple[str, int, float, list[tuple[str, int]]]]:
    given: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        if "question" not in row or (kind and row.get("type") != kind):
            continue
        given[normalize_answer(row["answer"])][normalize_answer(row["prediction"])] += 1
    table = []
    for truth, answers in given.items():
        n = sum(answers.values())
        table.append((truth, n, answers[truth] / n, answers.most_common(3)))
    return sorted(table, key=lambda row: -row[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("predictions", help="predictions.jsonl from `vlm-chat eval --out DIR`")
    parser.add_argument("--type", default=None, help="question type to look at (default: all)")
    parser.add_argument("--min-n", type=int, default=10, help="leave out expected answers asked fewer times")
    args = parser.parse_args()
    path = Path(args.predictions)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    table = [row for row in confusions(rows, args.type) if row[1] >= args.min_n]
    print(f"{path}: {args.type or 'all types'}")
    print("| expected | n | right | answers given most |")
    print("|---|---|---|---|")
    for truth, n, right, common in table:
        shown = ", ".join(f"{answer or '(empty)'} {count}" for answer, count in common)
        print(f"| {truth} | {n} | {100 * right:.0f} % | {shown} |")


if __name__ == "__main__":
    main()
