"""Image tokens in named tiles: the grid bundle after align, tuned by the build's instruct
stage with each 2x2 block of tokens (one scene cell) after its name, then evaluated
(an experiment next to a default-model build; not a build stage).

    python bench/cell_tiles.py --base WORK --grid GRID_OUT --out OUT [--tiles 3]

The grid bundle (`bench/aligned_grid.py`: 96 px CLIP in 16 px patches, 36 image tokens,
one per patch) already gives every scene cell its own 2x2 block of tokens. The LLM
still has to learn which block is where from the tokens' index alone, and after
instruct it answered "top" for every object in the bottom row. Here the processor
lays the 36 tokens out cell by cell, each cell's four after "\\ntop left:", "\\ntop
middle:", ... (`vlm-chat build --image-tiles 3`; SmolVLM does the same with
`<row_1_col_1>`), so a question about a place finds it as text.

  tiles     a copy of GRID_OUT/align with `image_tiles` set. Align trains only the
            projector, which maps each token by itself, so its weights fit any layout.
  instruct  the build's instruct stage on a copy of WORK/instruct.jsonl (same data,
            order and settings as the grid run it is compared with)
  eval      `vlm-chat eval` on WORK's test files and the general-questions check, into
            OUT/eval, as `bench/aligned_grid.py` evaluates GRID_OUT/instruct
  drill ... discern  the build's later stages, each on a copy of WORK/<stage>.jsonl,
            with the same evaluation after drill, consolidate, recall, recount, retint
            and discern, into OUT/eval_<stage> (`--until drill-eval` stops after the first);
            `--skip review,lone,...` leaves stages out, each next one going on from the
            bundle of the last one run (a shorter chain: `--skip` every stage between
            drill and survey runs instruct, drill, survey and resurvey)

A rerun resumes. Compare with GRID_OUT/eval (docs/experiments.md: 48.2 % overall, position
33.2 %, after instruct on the same bundle without tiles), GRID_OUT/eval_drill and the
build's own evals (`python bench/compare_evals.py`).
"""

from __future__ import annotations

import argparse
import sys
import shutil
from dataclasses import replace
from pathlib import Path

from training.default_model import (BENCH_LATER_STEPS, MIX_WRITERS, RECIPES, BuildPaths, Recipe, bench_later_steps,
                                    run_bench_steps, set_image_tiles, stage_commands)
from vlm_chat.errors import UserFacingError

STEPS = ("tiles", "instruct", "eval", *BENCH_LATER_STEPS)


def tiled_copy(source: Path, dest: Path, tiles: int) -> None:
    """`source` bundle copied to `dest` with its image tokens laid out in tiles x tiles tiles."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("checkpoints"))
    set_image_tiles(tmp, tiles)
    tmp.rename(dest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="a default-model build's work dir: its stage mixes and eval files")
    parser.add_argument("--grid", required=True, help="bench/aligned_grid.py's --out, with its align bundle")
    parser.add_argument("--out", required=True, help="folder for this experiment's runs")
    parser.add_argument("--tiles", type=int, default=3, help="tiles per side (default 3, the scenes' cells)")
    parser.add_argument("--until", choices=STEPS, default=STEPS[-1], help=f"last step to run (default {STEPS[-1]})")
    parser.add_argument("--skip", default="", metavar="STAGE,...",
                        help=f"later stages to leave out, comma-separated (of: {', '.join(MIX_WRITERS)})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    skip = tuple(stage for stage in args.skip.split(",") if stage)
    steps = ("tiles", "instruct", "eval", *bench_later_steps(skip))
    if args.until not in steps:
        parser.error(f"--until {args.until}: that step is skipped (--skip {args.skip})")
    base, grid, out = Path(args.base), Path(args.grid), Path(args.out)
    # The build's "tiles" recipe (its drill in fp32, as this line's first drill ran, and
    # grouped by length), with this run's tiles and skipped stages.
    recipe = replace(Recipe(seed=args.seed), **{**RECIPES["tiles"], "image_tiles": args.tiles, "skip": skip})
    try:
        commands = stage_commands(BuildPaths(work=out, corpus=Path("unused"), clip="train", out=out / "unused"), recipe)
    except UserFacingError as error:
        parser.error(str(error))

    def tiles() -> None:
        if not (grid / "align" / "vlm_config.json").is_file():
            raise UserFacingError(f"not found: {grid / 'align' / 'vlm_config.json'}; run bench/aligned_grid.py --until align")
        tiled_copy(grid / "align", out / "align", args.tiles)
        print(f"[tiles] {out / 'align'}: {grid / 'align'} with image_tiles {args.tiles}", flush=True)

    try:  # a missing input of the base build is named before anything runs
        run_bench_steps(steps, args.until, out, base, recipe, commands,
                        own={"tiles": (out / "align" / "vlm_config.json", tiles)})
    except UserFacingError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
