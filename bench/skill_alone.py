"""One kind of question about training scenes a build never used: how far does the model
get on that skill when it is all it is trained on?

    python bench/skill_alone.py --corpus DIR --work WORK --type count --out DIR [--min-objects 1] [--max-objects 6]
        [--scenes 1600] [--test 400] [--seed 21] [--reuse]

Writes OUT/train.jsonl (one conversation per scene: all of its questions of `--type`, for
`--scenes` training scenes that none of WORK's mixes talked about, or any training scenes
with `--reuse`) and OUT/test.jsonl (a sample of that type's questions about test scenes).
`--min-objects` and `--max-objects` keep only scenes of that many objects, in both
(position among distractors: `--type position --min-objects 2`). Then, as with bench/lone_objects.py:

    vlm-chat eval --model BUNDLE --data OUT/test.jsonl --out OUT/before
    vlm-chat train --stage instruct --model BUNDLE --data OUT/train.jsonl --out OUT/model \\
        --batch-size 8 --lr 5e-4 --projector-lr 1e-3 --vision full --vision-lr 3e-5 --warmup 0.03 --group-by-length
    vlm-chat eval --model OUT/model --data OUT/test.jsonl --out OUT/after

The model card has what this measured for counting on the default model.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from training.default_model import (
    SCENE_MIXES, _used_scenes, _write_jsonl, one_skill_conversations, questions_of, scenes_of,
)


def write(corpus: Path, work: Path, kind: str, out: Path, scenes: int, test: int, seed: int, min_objects: int = 1,
          max_objects: int = 99, reuse: bool = False) -> dict:
    """`reuse`: draw from every training scene, the build's included (for a skill whose
    questions the build's mixes have nearly used up)."""
    used = _used_scenes(work, tuple((f, p) for f, p in SCENE_MIXES if (work / f).is_file()))
    unusable = set() if reuse else used
    rng = random.Random(seed)
    root = corpus.resolve()
    objects = range(min_objects, max_objects + 1)
    questions = questions_of(corpus, "train", kind, scenes_of(corpus, "train", objects) - unusable)
    if not questions:
        raise SystemExit(f"no {kind!r} questions about {'' if reuse else 'unused '}training scenes in "
                         f"{corpus}/triples_train.jsonl" + ("" if reuse else " (--reuse draws from all of them)"))
    rows = one_skill_conversations(rng, kind, questions, scenes, lambda n: str(root / n))
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", rows)
    pool = [t for group in questions_of(corpus, "test", kind, scenes_of(corpus, "test", objects)).values() for t in group]
    chosen = rng.sample(pool, min(test, len(pool)))
    _write_jsonl(out / "test.jsonl", [{**t, "image": str(root / t["image"])} for t in chosen])
    return {"scenes_used_by_the_build": len(used), "train_scenes": len(rows),
            "train_questions": sum(len(r["conversations"]) // 2 for r in rows), "test_questions": len(chosen)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="the build's work dir (its scenes are left out)")
    parser.add_argument("--type", required=True, help="question type: count, color, position, relation, yesno, object, read")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--min-objects", type=int, default=1, help="only scenes of at least this many objects")
    parser.add_argument("--max-objects", type=int, default=99, help="only scenes of at most this many objects")
    parser.add_argument("--scenes", type=int, default=1600)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--reuse", action="store_true",
                        help="draw from every training scene, also those the build's mixes used")
    args = parser.parse_args()
    print(json.dumps(write(args.corpus, args.work, args.type, args.out, args.scenes, args.test, args.seed, args.min_objects,
                           args.max_objects, args.reuse)))


if __name__ == "__main__":
    main()
