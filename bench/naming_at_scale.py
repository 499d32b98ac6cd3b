"""What an object is, at the scale that taught position and counting: one training stage
on top of a build's model that names every object of thousands of fresh scenes.

    python bench/naming_at_scale.py --corpus DIR --work WORK --out OUT [--scenes 4000]
        [--every-skill 500] [--lookalike-share 0.2] [--captions 200] [--seed 31]

Writes OUT/train.jsonl, one conversation per scene, about training scenes that none of
the mixes WORK's model trained on talked about (the stages its recipe skipped do not
count: their mixes were written, never trained on):

- `--scenes` scenes, each asked "What is in the <cell>?" for every object it holds (and
  "What is shown in the image?" when it holds one kind); `--lookalike-share` of them also
  yes/no about each of their shapes and garments and about a look-alike they lack (same
  colour, other shape; another garment); each scene one conversation in random order;
- `--every-skill` more scenes asked everything the census way (every count, colour,
  position, relation and object question, 1.2 absent things per present one), so the
  other skills stay in practice;
- `--captions` single-image captions and WORK's distilled text turns.

The crowd and tally stages of the chain recipe lifted position and counting this way
(one skill at scale, MODEL_CARD.md); naming after census is 44 % while census asked
about every object of 2,400 scenes. Then, with the build's census settings:

    vlm-chat train --stage instruct --model vlm_chat/assets/default --data OUT/train.jsonl \\
        --out OUT/model --seed 0 --resume --batch-size 8 --lr 5e-4 --projector-lr 1e-3 \\
        --vision full --vision-lr 3e-5 --warmup 0.03 --epochs 1 --val-fraction 0.02 --group-by-length
    vlm-chat eval --model OUT/model --data WORK/eval_triples.jsonl WORK/eval_captions.jsonl \\
        --batch-size 32 --out OUT/eval
    python bench/compare_evals.py WORK/eval OUT/eval

Measured on 2026-12-06 (MODEL_CARD.md, `--scenes 3400 --every-skill 300 --captions 150`):
naming rose from 44 to 53 % while counting, position, reading and yes/no fell (overall
-2.3 points, paired SE 0.7). At 0.4 times the learning rates naming kept its gain (+8.3) and overall
was level (+0.1), but colour fell under its bar and the answers leaned to "no", so it is
an experiment, not a stage of the build.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from training.corpus.scenes import vocabulary_of
from training.default_model import (
    CENSUS_LIMITS, SCENE_MIXES, Recipe, _conversation, _group, _questions, _read_jsonl, _single_captions,
    _used_scenes, _write_jsonl, holdouts_of, layouts_of, lookalike_turns, naming_turns, survey_turns,
)


def trained_mixes(work: Path) -> tuple[tuple[str, str], ...]:
    """The (file, id prefix) of SCENE_MIXES that WORK's build trained on: not those of the
    stages its recipe (WORK/state.json) skipped."""
    state = json.loads((work / "state.json").read_text())
    skipped = {f"{stage}.jsonl" for stage in state["recipe"].get("skip", ())}
    return tuple((f, p) for f, p in SCENE_MIXES if f not in skipped and (work / f).is_file())


def write(corpus: Path, work: Path, out: Path, scenes: int, every_skill: int, captions: int, seed: int,
          lookalike_share: float = 0.2) -> dict:
    rng = random.Random(seed)
    root = corpus.resolve()

    def image(n: str) -> str:
        return str(root / n)

    layouts = layouts_of(corpus, "train")
    known = {obj["name"]: obj["kind"] for row in layouts.values() for obj in row["objects"]}
    used = _used_scenes(work, trained_mixes(work))
    fresh = sorted(set(layouts) - used)
    if len(fresh) < scenes + every_skill:
        raise SystemExit(f"only {len(fresh)} training scenes are fresh; ask for fewer than {scenes} + {every_skill}")
    drawn = rng.sample(fresh, scenes + every_skill)
    naming = []
    for n in drawn[:scenes]:
        turns = naming_turns(rng, layouts[n])
        if rng.random() < lookalike_share:
            turns += lookalike_turns(rng, layouts[n], known)
        rng.shuffle(turns)
        naming.append(_conversation(f"name:{n}", image(n), turns))
    vocabulary, holdouts = vocabulary_of(list(layouts.values())), holdouts_of(corpus)
    every = [_conversation(f"every:{n}", image(n), survey_turns(rng, layouts[n], vocabulary, holdouts,
                                                                 Recipe().census_no_per_yes, CENSUS_LIMITS))
             for n in drawn[scenes:]]
    singles = _single_captions(rng, _group(_read_jsonl(corpus / "captions_train.jsonl")), image, captions)
    text = _read_jsonl(work / "text_turns.jsonl")
    rows = naming + every + singles + text
    rng.shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", rows)
    answers = [t["value"] for r in naming for t in r["conversations"][1::2]]
    return {"fresh_scenes": len(fresh), "naming_scenes": len(naming), "naming_questions": _questions(naming),
            "yes_no_questions": sum(a in ("yes", "no") for a in answers),
            "every_skill_scenes": len(every), "every_skill_questions": _questions(every),
            "caption_singles": len(singles), "text_turns": len(text)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="the build's work dir (its trained scenes are left out)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenes", type=int, default=4000, help="scenes whose every object is named")
    parser.add_argument("--every-skill", type=int, default=500, help="scenes asked everything, the census way")
    parser.add_argument("--lookalike-share", type=float, default=0.2,
                        help="share of the naming scenes also asked yes/no about their objects and look-alikes")
    parser.add_argument("--captions", type=int, default=200, help="single-image captions")
    parser.add_argument("--seed", type=int, default=31)
    args = parser.parse_args()
    print(json.dumps(write(args.corpus, args.work, args.out, args.scenes, args.every_skill, args.captions, args.seed,
                           args.lookalike_share)))


if __name__ == "__main__":
    main()
