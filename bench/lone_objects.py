"""Position questions about scenes of one object: can the model learn to read where a lone
object is, when that is all it is trained on?

    python bench/lone_objects.py --corpus DIR --out DIR [--scenes 1600] [--test 400] [--seed 11]

Writes OUT/train.jsonl (one conversation per one-object training scene, all of its
position questions: left/right, top/bottom, which of the 9 cells) and OUT/test.jsonl (a
sample of the position questions about one-object test scenes). Then, for example:

    vlm-chat eval --model BUNDLE --data OUT/test.jsonl --out OUT/before
    vlm-chat train --stage instruct --model BUNDLE --data OUT/train.jsonl --out OUT/model \\
        --batch-size 8 --lr 5e-4 --projector-lr 1e-3 --vision full --vision-lr 3e-5 --warmup 0.03
    vlm-chat eval --model OUT/model --data OUT/test.jsonl --out OUT/after

The build's lone stage is this training, from the review's model; the model card has
what it measured.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from training.default_model import (
    Recipe, _write_jsonl, questions_of, scenes_of, write_lone,
)


def write(corpus: Path, out: Path, scenes: int, test: int, seed: int) -> dict:
    """OUT/train.jsonl as the build's lone stage writes it (its seed is the recipe's + 11),
    and OUT/test.jsonl: `test` position questions about one-object test scenes."""
    counts = write_lone(corpus, out, Recipe(seed=seed - 11, lone_scenes=scenes))
    (out / "lone.jsonl").replace(out / "train.jsonl")
    rng = random.Random(seed)  # the test sample is drawn after the lone stage's own draw
    rng.sample(range(counts["one_object_scenes"]), counts["scenes"])
    pool = [t for rows in questions_of(corpus, "test", "position", scenes_of(corpus, "test", range(1, 2))).values() for t in rows]
    chosen = rng.sample(pool, min(test, len(pool)))
    root = corpus.resolve()
    _write_jsonl(out / "test.jsonl", [{**t, "image": str(root / t["image"])} for t in chosen])
    return {"train_scenes": counts["scenes"], "train_questions": counts["questions"], "test_questions": len(chosen)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenes", type=int, default=1600)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    print(json.dumps(write(args.corpus, args.out, args.scenes, args.test, args.seed)))


if __name__ == "__main__":
    main()
