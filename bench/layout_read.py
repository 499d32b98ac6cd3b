"""Can the model say what is in each grid cell of a scene? The layout stage's own test.

    python bench/layout_read.py --corpus DIR [--model BUNDLE] [--scenes 200] [--batch-size 16] [--json]

For the first test scenes without a word (a word fills a row the layout does not name),
the model is asked for the cell-by-cell description the layout stage trains ("top left:
a pink star; top middle: nothing; ..."), greedily. Each of the 9 cells is scored from the
answer against the scene's layout:
  occupied   "nothing" or something, as the layout says (a cell missing from the answer is wrong)
  object     for occupied cells, the exact object ("a pink star") after answer normalisation
  all 9      scenes whose 9 occupancies are all right
  count      scenes where the number of cells named with something equals the objects shown
The baseline is the best constant answer, measured on the same scenes: every cell
"nothing" or every cell something, whichever is right more often, for occupancy, and
the most common count for the count.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from training.corpus.scenes import CELL_NAMES
from training.corpus.templates import article
from training.default_model import LAYOUT_PROMPTS
from training.evaluate import normalize_answer

CELLS = [CELL_NAMES[cell] for cell in sorted(CELL_NAMES)]  # reading order


def parse_layout(text: str) -> dict[str, str]:
    """'top left: a pink star; center: nothing' -> {"top left": "a pink star", "center": "nothing"};
    the first mention of a cell counts, pieces that name no cell are dropped."""
    found: dict[str, str] = {}
    for piece in text.replace("\n", ";").split(";"):
        name, sep, thing = piece.partition(":")
        name = name.strip().lower()
        if sep and name in CELLS and name not in found:
            found[name] = thing.strip()
    return found


def score(layouts: list[dict], answers: list[str]) -> dict:
    occupied_right = object_right = occupied_cells = all_right = count_right = 0
    counts = Counter(sum(o["count"] for o in layout["objects"]) for layout in layouts)
    for layout, answer in zip(layouts, answers):
        truth = {cell: article(o["name"]) for o in layout["objects"] for cell in o["cells"]}
        said = parse_layout(answer)
        right = 0
        for cell in CELLS:
            guess = said.get(cell)
            says_something = guess is not None and normalize_answer(guess) != "nothing"
            if guess is not None and says_something == (cell in truth):
                right += 1
            if cell in truth:
                occupied_cells += 1
                object_right += guess is not None and normalize_answer(guess) == normalize_answer(truth[cell])
        occupied_right += right
        all_right += right == len(CELLS)
        named = sum(1 for cell in CELLS if cell in said and normalize_answer(said[cell]) != "nothing")
        count_right += named == len(truth)
    n, cells = len(layouts), len(layouts) * len(CELLS)
    return {
        "scenes": n,
        "occupied": occupied_right / cells,
        "occupied_baseline": max(occupied_cells, cells - occupied_cells) / cells,
        "object": object_right / max(occupied_cells, 1),
        "all_9": all_right / n,
        "count": count_right / n, "count_baseline": counts.most_common(1)[0][1] / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--model", default=None, help="bundle (default: the shipped default model)")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--show", type=int, default=3, help="print this many answers next to the truth")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from training.default_model import layout_answer
    from vlm_chat.defaults import resolve_model
    from vlm_chat.generation import GenerationSettings, generate_batch
    from vlm_chat.model import VisionLanguageModel

    layouts = []
    with (args.corpus / "layouts_test.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            if not row["word"]:
                layouts.append(row)
            if len(layouts) == args.scenes:
                break
    model, processor = VisionLanguageModel.from_pretrained(resolve_model(args.model), device="cpu", quantization="none")
    settings = GenerationSettings(max_new_tokens=96)
    answers: list[str] = []
    for start in range(0, len(layouts), args.batch_size):
        batch = layouts[start:start + args.batch_size]
        conversations = [[{"role": "user", "content": [{"type": "image", "image": str(args.corpus / row["image"])},
                                                       {"type": "text", "text": LAYOUT_PROMPTS[0]}]}] for row in batch]
        answers += [a.strip() for a in generate_batch(model, processor, conversations, settings)]
    result = score(layouts, answers)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for row, answer in list(zip(layouts, answers))[: args.show]:
        print(f"{row['image']}\n  said:  {answer}\n  truth: {layout_answer(row)}")
    print(f"\n{result['scenes']} test scenes without a word, model {args.model or 'default'}\n")
    print("| measure | model | best constant answer | ratio |\n|---|---|---|---|")
    print(f"| cell occupied or not (9 per scene) | {result['occupied']:.1%} | {result['occupied_baseline']:.1%} "
          f"| {result['occupied'] / result['occupied_baseline']:.2f}x |")
    print(f"| all 9 cells right | {result['all_9']:.1%} | | |")
    print(f"| object in an occupied cell | {result['object']:.1%} | | |")
    print(f"| count (cells named) | {result['count']:.1%} | {result['count_baseline']:.1%} "
          f"| {result['count'] / result['count_baseline']:.2f}x |")


if __name__ == "__main__":
    main()
