"""Which answers does a model give when it is wrong? Per expected answer, from eval predictions.

    python bench/confusions.py EVAL_DIR/predictions.jsonl [--type position] [--min-n 10]
    python bench/confusions.py EVAL_DIR/predictions.jsonl --layouts CORPUS/layouts_test.jsonl

Reads the predictions.jsonl that `vlm-chat eval --out EVAL_DIR` writes and prints, for
each expected answer of the chosen question type: how often it was asked, how often it
was answered right, and the answers given most often. A model that has not learned a
type gives the same few answers whatever the truth is; that shows here and not in the
accuracy alone. Answers are compared after the same normalisation as the eval.

With --layouts (the corpus's layouts_*.jsonl for the split the predictions are from) it
prints accuracy per question type by the number of objects in the scene instead: a
type that fails even with one object fails at reading, not at searching.

    python bench/confusions.py EVAL_DIR/predictions.jsonl --layouts CORPUS/layouts_test.jsonl --naming

sorts the answers to "What is in the <cell>?" by the kind of object in that cell and
what went wrong: another object of the scene (found the wrong cell), the right colour
and the wrong shape (found the cell, could not tell the shape), the right shape in the
wrong colour, or a thing the scene does not hold.

    python bench/confusions.py EVAL_DIR/predictions.jsonl --layouts CORPUS/layouts_test.jsonl --counting

splits the count questions into "how many objects in all?" and "how many <things>?",
the latter by the kind of thing asked about ("absent" when the scene holds none), and
counts the wrong answers that gave the scene's total instead: a model that counts the
whole scene well but not one kind of thing in it fails at finding that kind.

    python bench/confusions.py EVAL_DIR/predictions.jsonl --layouts CORPUS/layouts_test.jsonl --named

gives accuracy per question type by the kind of the scene's objects the question names
(shape, fashion, clipart, emoji, several joined by "+"), and "none of the scene's" for
questions that name nothing the scene holds: "is there a coat?" about a scene without
one, "how many objects?". A type that is right about shapes and wrong about garments
fails at telling what a thing is, not at the skill the type names.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

from training.corpus.scenes import CELL_NAMES
from training.corpus.templates import QUESTIONS, plural
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


def _tally(rows: list[dict], layouts: dict[str, dict], group) -> dict[str, dict]:
    """type -> group(row, layout) -> (right, asked), for the questions on scenes in `layouts`
    (keyed by the image path relative to the corpus, as the corpus writes it)."""
    table: dict[str, dict] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for row in rows:
        if "question" not in row:
            continue
        layout = _layout_of(row, layouts)
        if layout is None:
            continue
        cell = table[row["type"]][group(row, layout)]
        cell[0] += bool(row["correct"])
        cell[1] += 1
    return {kind: {key: (right, asked) for key, (right, asked) in sorted(counts.items())} for kind, counts in table.items()}


def by_objects(rows: list[dict], layouts: dict[str, dict]) -> dict[str, dict[int, tuple[int, int]]]:
    """type -> objects in the scene -> (right, asked)."""
    return _tally(rows, layouts, lambda row, layout: sum(obj["count"] for obj in layout["objects"]))


def _named_kinds(row: dict, layout: dict) -> str:
    """The kinds of the scene's objects the question names, by name or plural ("shape+fashion")."""
    question = row["question"].lower()
    kinds = sorted({obj["kind"] for obj in layout["objects"]
                    if any(re.search(rf"\b{re.escape(name)}\b", question)
                           for name in (obj["name"].lower(), plural(obj["name"].lower())))})
    return "+".join(kinds) or "none of the scene's"


def by_named_kind(rows: list[dict], layouts: dict[str, dict]) -> dict[str, dict[str, tuple[int, int]]]:
    """type -> kinds of the scene's objects the question names -> (right, asked)."""
    return _tally(rows, layouts, _named_kinds)


OUTCOMES = ("right", "another object of the scene", "right colour, wrong shape", "right shape, wrong colour",
            "another of its kind", "not in the scene")


def naming_errors(rows: list[dict], layouts: dict[str, dict], swaps: Counter | None = None) -> dict[str, Counter]:
    """kind of the object asked about -> outcome (one of OUTCOMES) -> questions, for the object questions
    that name a cell ("What is in the top left?") on scenes in `layouts`. "another of its kind"
    is a garment, clip art or emoji named for one of its own kind that the scene lacks (a
    name some scene in `layouts` holds): the thing was found and its kind told, not its name.
    `swaps`, when given, counts those answers by (kind, the object's name, the name said)."""
    table: dict[str, Counter] = defaultdict(Counter)
    names_of_kind: dict[str, set[str]] = defaultdict(set)
    for layout in layouts.values():
        for obj in layout["objects"]:
            names_of_kind[obj["kind"]].add(normalize_answer(obj["name"]))
    for row in rows:
        if row.get("type") != "object" or "question" not in row:
            continue
        layout = _layout_of(row, layouts)
        cell = next((c for c in CELL_NAMES.values() if row["question"].rstrip("?").endswith(f"the {c}")), None)
        if layout is None or cell is None:
            continue
        truth = next(obj for obj in layout["objects"] if cell in obj["cells"])
        said = normalize_answer(row["prediction"])
        if row["correct"]:
            outcome = "right"
        elif any(said == normalize_answer(obj["name"]) for obj in layout["objects"]):
            outcome = "another object of the scene"
        elif truth["kind"] == "shape" and said.split()[:1] == [truth["color"]]:
            outcome = "right colour, wrong shape"
        elif truth["kind"] == "shape" and said.split()[-1:] == [truth["key"]]:
            outcome = "right shape, wrong colour"
        elif truth["kind"] != "shape" and said in names_of_kind[truth["kind"]]:
            outcome = "another of its kind"
            if swaps is not None:
                swaps[truth["kind"], normalize_answer(truth["name"]), said] += 1
        else:
            outcome = "not in the scene"
        table[truth["kind"]][outcome] += 1
    return dict(table)


COUNT_TOTAL = frozenset(QUESTIONS["count_total"])


def counting_errors(rows: list[dict], layouts: dict[str, dict]) -> dict[str, Counter]:
    """what a count question asks about ("in all", or the kind of thing named: shape, fashion,
    ..., "absent") -> "asked", "right" and "said the total" (wrong, with the scene's total),
    for count questions on scenes in `layouts`."""
    table: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        if row.get("type") != "count" or "question" not in row:
            continue
        layout = _layout_of(row, layouts)
        if layout is None:
            continue
        question = row["question"].removeprefix("<image>\n")
        if question in COUNT_TOTAL:
            asked = "in all"
        else:  # the longest plural that the question names: "pairs of trousers" before "trousers"
            named = [obj for obj in layout["objects"] if f" {plural(obj['name'])} " in f" {question.rstrip('?.')} "]
            asked = max(named, key=lambda obj: len(obj["name"]))["kind"] if named else "absent"
        total = sum(obj["count"] for obj in layout["objects"])
        said = normalize_answer(row["prediction"])
        counts = table[asked]
        counts["asked"] += 1
        counts["right"] += bool(row["correct"])
        counts["said the total"] += not row["correct"] and asked != "in all" and said == normalize_answer(str(total))
    return dict(table)


def _layout_of(row: dict, layouts: dict[str, dict]) -> dict | None:
    """The layout of the row's image (`layouts` keyed by the path relative to the corpus), or None."""
    return next((layouts[key] for key in _suffixes(row["image"]) if key in layouts), None)


def _suffixes(image: str) -> list[str]:
    parts = Path(image).parts
    return ["/".join(parts[i:]) for i in range(len(parts))]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("predictions", help="predictions.jsonl from `vlm-chat eval --out DIR`")
    parser.add_argument("--type", default=None, help="question type to look at (default: all)")
    parser.add_argument("--min-n", type=int, default=10, help="leave out expected answers asked fewer times")
    parser.add_argument("--layouts", help="corpus layouts_<split>.jsonl: accuracy by objects in the scene instead")
    parser.add_argument("--naming", action="store_true", help="with --layouts: what went wrong naming a cell's object")
    parser.add_argument("--counting", action="store_true",
                        help="with --layouts: count questions in all and about one kind of thing, by that kind")
    parser.add_argument("--named", action="store_true",
                        help="with --layouts: accuracy by type and the kind of the scene's objects the question names")
    args = parser.parse_args()
    path = Path(args.predictions)
    rows = _read_jsonl(path)
    if (args.naming or args.counting or args.named) and not args.layouts:
        parser.error("--naming, --counting and --named need --layouts CORPUS/layouts_<split>.jsonl")
    if args.layouts:
        layouts = {row["image"]: row for row in _read_jsonl(Path(args.layouts))}
        if args.naming:
            swaps: Counter = Counter()
            table = naming_errors(rows, layouts, swaps)
            print(f"{path}: object questions about a cell, by the kind of object there")
            print("| kind | asked | " + " | ".join(OUTCOMES) + " |")
            print("|---|---|" + "---|" * len(OUTCOMES))
            for kind, counts in sorted(table.items(), key=lambda item: -sum(item[1].values())):
                n = sum(counts.values())
                print(f"| {kind} | {n} | " + " | ".join(f"{100 * counts[o] / n:.0f} % ({counts[o]})" for o in OUTCOMES) + " |")
            print("\nanother of its kind, the most common swaps:")
            print("| kind | the object | named as | times |")
            print("|---|---|---|---|")
            for (kind, truth, said), n in swaps.most_common(12):
                print(f"| {kind} | {truth} | {said} | {n} |")
            return
        if args.counting:
            table = counting_errors(rows, layouts)
            print(f"{path}: count questions, by what they ask about")
            print("| asks about | asked | right | wrong, said the scene's total |")
            print("|---|---|---|---|")
            for asked, counts in sorted(table.items(), key=lambda item: -item[1]["asked"]):
                n = counts["asked"]
                told = "" if asked == "in all" else f"{counts['said the total']} ({100 * counts['said the total'] / n:.0f} %)"
                print(f"| {asked} | {n} | {100 * counts['right'] / n:.0f} % ({counts['right']}) | {told} |")
            return
        if args.named:
            table = by_named_kind(rows, layouts)
            print(f"{path}: accuracy by the kind of the scene's objects the question names (right / asked)")
            print("| type | names | right | asked | wrong |")
            print("|---|---|---|---|---|")
            for kind in sorted(table):
                for named, (right, asked) in table[kind].items():
                    print(f"| {kind} | {named} | {100 * right / asked:.1f} % | {asked} | {asked - right} |")
            return
        table = by_objects(rows, layouts)
        sizes = sorted({n for counts in table.values() for n in counts})
        print(f"{path}: accuracy by objects in the scene (right / asked)")
        print("| type | " + " | ".join(f"{n} object{'s' * (n > 1)}" for n in sizes) + " |")
        print("|---|" + "---|" * len(sizes))
        for kind in sorted(table):
            cells = [table[kind].get(n, (0, 0)) for n in sizes]
            print(f"| {kind} | " + " | ".join(f"{100 * r / a:.0f} % ({r}/{a})" if a else "" for r, a in cells) + " |")
        return
    table = [row for row in confusions(rows, args.type) if row[1] >= args.min_n]
    print(f"{path}: {args.type or 'all types'}")
    print("| expected | n | right | answers given most |")
    print("|---|---|---|---|")
    for truth, n, right, common in table:
        shown = ", ".join(f"{answer or '(empty)'} {count}" for answer, count in common)
        print(f"| {truth} | {n} | {100 * right:.0f} % | {shown} |")


if __name__ == "__main__":
    main()
