"""A CLIP whose patch grid lines up with the scenes' 3x3 cells, and the build's first three
VLM stages on top of it (an experiment next to a default-model build; not a build stage).

    python bench/aligned_grid.py --base WORK --corpus DIR --out OUT [--until STEP]

The default model's CLIP reads 96 px scenes at 64 px in 8 px patches: a 32 px cell of the
scene is 2.67 patches wide, so most patches, and every image token after the 2x2 pixel
shuffle, straddle two cells. Counting and placing objects then means untangling what
tokens mix. Here the CLIP reads the scene at its own 96 px in 16 px patches: each cell
is exactly 2x2 patches, 36 in all, and the projector takes one token per patch (no
reduction, as HF Llava does, so the bundle also exports to the Llava format). The CLIP's
training captions are the corpus's plus four more copies of every single-shape caption
(a fifth of the pairs instead of 5.5 %, so colour alone matches fewer pairs), and no
random crops (a crop moves the cells the captions name).

These are the build's own stages with the recipe fields of GRID (`vlm-chat default
build` runs the same commands with that recipe), each a `vlm-chat` command printed as it
runs; a rerun resumes:

  clip      OUT/clip_captions.jsonl, then `vlm-chat train --stage clip` (2,200 steps of 128)
  bundle    the CLIP's vision tower + SmolLM2 + a `mlp2x_gelu` projector, no token reduction
  align     the build's align stage on a copy of WORK/align.jsonl
  instruct  the build's instruct stage on a copy of WORK/instruct.jsonl
  eval      `vlm-chat eval` on WORK/eval_triples.jsonl and WORK/eval_captions.jsonl, and the
            build's check of general questions with an image attached, into OUT/eval
  drill ... discern  the build's later stages, each on a copy of WORK/<stage>.jsonl (the
            drill's bf16 autocast becomes fp32 on a CPU without native bf16, as in any
            training run), with the same evaluation after drill, consolidate, recall,
            recount, retint and discern, into OUT/eval_<stage>

Same data, order and settings as the build's stages, so the results compare with the
build's model after each of them (docs/experiments.md: 44.0 % overall after instruct, 52.8 % after drill).
`python bench/clip_shapes.py --clip OUT/clip/final` and `vlm-chat eval-clip --clip
OUT/clip/final --corpus DIR` measure the CLIP itself.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from training.default_model import (BENCH_LATER_STEPS, GRID, BuildPaths, Recipe, _cli, run_bench_steps, stage_commands,
                                    write_clip_captions)
from vlm_chat.errors import UserFacingError

STEPS = ("clip", "bundle", "align", "instruct", "eval", *BENCH_LATER_STEPS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="a default-model build's work dir: its stage mixes and eval files")
    parser.add_argument("--corpus", required=True, help="that build's corpus dir")
    parser.add_argument("--out", required=True, help="folder for this experiment's runs")
    parser.add_argument("--until", choices=STEPS, default=STEPS[-1], help=f"last step to run (default {STEPS[-1]})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    base, corpus, out = Path(args.base), Path(args.corpus), Path(args.out)
    recipe = replace(Recipe(seed=args.seed), **GRID)
    commands = stage_commands(BuildPaths(work=out, corpus=corpus, clip="train", out=out / "unused"), recipe)
    clip_done = out / "clip" / "final" / "config.json"

    def clip() -> None:
        print(write_clip_captions(corpus, out / "clip_captions.jsonl", recipe.clip_shape_copies, recipe.seed), flush=True)
        _cli(commands["clip"])

    try:  # a missing input of the base build is named before anything runs
        run_bench_steps(STEPS, args.until, out, base, recipe, commands, own={"clip": (clip_done, clip)})
    except UserFacingError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
