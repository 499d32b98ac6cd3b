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


def _rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def one_object_scenes(corpus: Path, split: str) -> set[str]:
    return {row["image"] for row in _rows(corpus / f"layouts_{split}.jsonl")
            if sum(obj["count"] for obj in row["objects"]) == 1}


def write(corpus: Path, out: Path, scenes: int, test: int, seed: int) -> dict:
    rng = random.Random(seed)
    lone = one_object_scenes(corpus, "train")
    questions: dict[str, list[dict]] = {}
    for t in _rows(corpus / "triples_train.jsonl"):
        if t["image"] in lone and t["type"] == "position":
            questions.setdefault(t["image"], []).append(t)
    picked = rng.sample(sorted(questions), min(scenes, len(questions)))
    out.mkdir(parents=True, exist_ok=True)
    with (out / "train.jsonl").open("w", encoding="utf-8") as f:
        for name in picked:
            turns = []
            for index, t in enumerate(questions[name]):
                turns += [{"from": "human", "value": ("<image>\n" if index == 0 else "") + t["question"]},
                          {"from": "gpt", "value": t["answer"]}]
            f.write(json.dumps({"id": f"lone:{name}", "image": str(corpus.resolve() / name), "conversations": turns}) + "\n")
    lone_test = one_object_scenes(corpus, "test")
    pool = [t for t in _rows(corpus / "triples_test.jsonl") if t["image"] in lone_test and t["type"] == "position"]
    chosen = rng.sample(pool, min(test, len(pool)))
    with (out / "test.jsonl").open("w", encoding="utf-8") as f:
        for t in chosen:
            f.write(json.dumps({**t, "image": str(corpus.resolve() / t["image"])}) + "\n")
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
