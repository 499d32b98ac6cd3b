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

The model card has what this measured on the default model.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from training.default_model import _conversation, _group, _read_jsonl, _write_jsonl


def one_object_scenes(corpus: Path, split: str) -> set[str]:
    return {row["image"] for row in _read_jsonl(corpus / f"layouts_{split}.jsonl")
            if sum(obj["count"] for obj in row["objects"]) == 1}


def _position_questions(corpus: Path, split: str) -> list[dict]:
    """The position triples of `split` about one-object scenes, in file order."""
    lone = one_object_scenes(corpus, split)
    return [t for t in _read_jsonl(corpus / f"triples_{split}.jsonl") if t["image"] in lone and t["type"] == "position"]


def write(corpus: Path, out: Path, scenes: int, test: int, seed: int) -> dict:
    rng = random.Random(seed)
    root = corpus.resolve()
    questions = _group(_position_questions(corpus, "train"))
    picked = rng.sample(sorted(questions), min(scenes, len(questions)))
    pool = _position_questions(corpus, "test")
    chosen = rng.sample(pool, min(test, len(pool)))
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", [
        _conversation(f"lone:{name}", str(root / name), [(t["question"], t["answer"]) for t in questions[name]])
        for name in picked
    ])
    _write_jsonl(out / "test.jsonl", [{**t, "image": str(root / t["image"])} for t in chosen])
    return {"train_scenes": len(picked), "train_questions": sum(len(questions[n]) for n in picked), "test_questions": len(chosen)}


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
