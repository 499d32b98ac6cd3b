"""What an object is, at the scale that taught position and counting: one training stage
on top of a build's model that names every object of thousands of fresh scenes.

    python bench/naming_at_scale.py --corpus DIR --work WORK --out OUT [--scenes 4000]
        [--every-skill 500] [--lookalike-share 0.2] [--colour] [--presence N] [--captions 200]
        [--seed 31]

Writes OUT/train.jsonl, one conversation per scene, about training scenes that none of
the mixes WORK's model trained on talked about (the stages its recipe skipped do not
count: their mixes were written, never trained on):

- `--scenes` scenes, each asked "What is in the <cell>?" for every object it holds (and
  "What is shown in the image?" when it holds one kind); `--lookalike-share` of them also
  yes/no about each of their shapes and garments and about a look-alike they lack (same
  colour, other shape; another garment); with `--colour`, every colour question the
  scene supports too (which colour the <shape> is: finding the shape among others is
  what those questions miss); with `--presence N`, up to N "is there ...?" questions about
  what the scene holds, of any kind, and as many about what it lacks, so that emoji and
  clip art are asked yes as often as no; each scene one conversation in random order;
- `--every-skill` more scenes asked everything the census way (every count, colour,
  position, relation and object question, 1.2 absent things per present one), so the
  other skills stay in practice;
- `--captions` single-image captions and WORK's distilled text turns.

The crowd and tally stages of the chain recipe lifted position and counting this way
(one skill at scale, docs/experiments.md); naming after census is 44 % while census asked
about every object of 2,400 scenes. Then, with the settings of the build's naming stage
(census's at 0.4 times its learning rates), from WORK's census model:

    vlm-chat train --stage instruct --model WORK/census --data OUT/train.jsonl \\
        --out OUT/model --seed 0 --resume --batch-size 8 --lr 2e-4 --projector-lr 4e-4 \\
        --vision full --vision-lr 1.2e-5 --warmup 0.03 --epochs 1 --val-fraction 0.02 \\
        --group-by-length --mixed-precision no
    vlm-chat eval --model OUT/model --data WORK/eval_triples.jsonl WORK/eval_captions.jsonl \\
        --batch-size 32 --out OUT/eval
    python bench/compare_evals.py WORK/eval OUT/eval

Measured on 2026-12-06 (docs/experiments.md, `--scenes 3400 --every-skill 300 --captions 150`):
naming rose from 44 to 53 % while counting, position, reading and yes/no fell (overall
-2.3 points, paired SE 0.7). At 0.4 times the learning rates naming kept its gain (+8.3) and overall
was level (+0.1), but colour fell under its bar and the answers leaned to "no" (on emoji
and clip art, which only the census-way scenes asked yes/no about). With `--scenes 3000
--every-skill 400 --captions 150 --colour --presence 2` at 0.4 times the rates, overall
rose 1.4 points (paired SE 0.5), colour 3.4, naming 4.8, relations 6.1, with the "yes"
share 4.8 points from the true one: that is the build's naming stage (`write_naming`,
the same rows), and this script stays for trying other mixes of it.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from training.default_model import _read_jsonl, _used_scenes, _write_jsonl, naming_rows, trained_mixes


def write(corpus: Path, work: Path, out: Path, scenes: int, every_skill: int, captions: int, seed: int,
          lookalike_share: float = 0.2, colour: bool = False, presence: int = 0) -> dict:
    """OUT/train.jsonl about training scenes none of the mixes in WORK asked about, but for
    those of the stages its build skipped (its state.json's recipe); returns its counts."""
    skip = tuple(json.loads((work / "state.json").read_text())["recipe"].get("skip", ()))
    # every mix WORK holds, the build's own naming mix too once it has one
    trained = tuple((f, prefix) for f, prefix in trained_mixes(skip) if (work / f).is_file())
    rows, counts = naming_rows(corpus, random.Random(seed), _used_scenes(work, trained),
                               _read_jsonl(work / "text_turns.jsonl"), scenes, every_skill, captions, lookalike_share,
                               colour, presence)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", rows)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="the build's work dir (its trained scenes are left out)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenes", type=int, default=4000, help="scenes whose every object is named")
    parser.add_argument("--every-skill", type=int, default=500, help="scenes asked everything, the census way")
    parser.add_argument("--lookalike-share", type=float, default=0.2,
                        help="share of the naming scenes also asked yes/no about their objects and look-alikes")
    parser.add_argument("--colour", action="store_true", help="also ask every colour question of the naming scenes")
    parser.add_argument("--presence", type=int, default=0,
                        help="also ask up to N 'is there ...?' about what each naming scene holds and as many about what it lacks")
    parser.add_argument("--captions", type=int, default=200, help="single-image captions")
    parser.add_argument("--seed", type=int, default=31)
    args = parser.parse_args()
    print(json.dumps(write(args.corpus, args.work, args.out, args.scenes, args.every_skill, args.captions, args.seed,
                           args.lookalike_share, args.colour, args.presence)))


if __name__ == "__main__":
    main()
