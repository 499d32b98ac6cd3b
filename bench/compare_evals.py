"""Several `vlm-chat eval --out DIR` results side by side, each against the first.

    python bench/compare_evals.py BASELINE_DIR OTHER_DIR... [--names A B ...]

Reads DIR/scores.json (and DIR/knowledge.json where the default-model build or a bench
wrote one: the general questions asked with an image attached) and prints one markdown
table: every measure per run, and each run's difference to the first. Accuracies and
the "yes" share also get the difference's standard error, and `*` where the difference
is over two of them: a change inside that is noise on this test set. Where both folders
hold predictions.jsonl for the same questions, an accuracy's error is paired ("pSE": from
the questions one run got right and the other wrong), else unpaired ("SE", larger).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.evaluate import comparison_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="eval output folders, the baseline first")
    parser.add_argument("--names", nargs="+", help="a column name per folder (default: the folder paths)")
    args = parser.parse_args(argv)
    names = args.names or args.dirs
    if len(args.dirs) < 2 or len(names) != len(args.dirs):
        parser.error("give two eval folders or more, and as many --names as folders")
    runs, predictions, knowledge = {}, {}, []
    for name, folder in zip(names, map(Path, args.dirs)):
        scores = folder / "scores.json"
        if not scores.is_file():
            print(f"{folder}: no scores.json; run `vlm-chat eval ... --out {folder}` first", file=sys.stderr)
            return 2
        runs[name] = json.loads(scores.read_text())
        answers = folder / "predictions.jsonl"
        if answers.is_file():
            predictions[name] = [json.loads(line) for line in answers.read_text().splitlines() if line.strip()]
        check = folder / "knowledge.json"
        hits = json.loads(check.read_text()).get("tuned_with_image") if check.is_file() else None
        knowledge.append(f"{hits['hits']}/{hits['n']}" if hits else "-")
    print(comparison_table(runs, predictions))
    if any(k != "-" for k in knowledge):
        print(f"| general questions, image attached | {' | '.join(knowledge)} |{' |' * (len(names) - 1)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
