"""Ship the tiles line's finished chain (bench/cell_tiles.py) as the offline default model,
with the record `vlm-chat default build --recipe tiles` writes (recipe.json).

    python bench/ship_tiles.py --base WORK --corpus DIR --grid GRID --tiles OUT \\
        --seconds clip=2700 align=1452 instruct=5076 drill=5400 survey=6720 resurvey=5900 eval=580

The tiles line was trained step by step next to a build of the chain recipe (WORK):
bench/aligned_grid.py made the grid CLIP, its bundle and align (GRID), and
bench/cell_tiles.py ran instruct, drill, survey and resurvey (OUT) on copies of WORK's
data files, each with the command the build runs for that stage. This script checks that
this is the build's recipe before it ships anything:

  1. Into a scratch work dir, the build's own writers write every data file of the tiles
     recipe again (CLIP captions, the mixes, each later stage's mix, the skipped ones
     included), each timed; each must be byte-identical to the file the run trained on
     (GRID's CLIP captions, WORK's mixes). The distilled text turns are WORK's (the
     same prompts answered by the same LLM; the vision tower plays no part).
  2. The untrained bundle is built with the recipe's command and its projector compared
     with GRID's bundle's (seeded: the same weights).
  3. The record: the tiles recipe, and per stage its result (the writers' counts) and
     wall time: the writers' as measured here, the training stages' and the eval's from
     --seconds (as measured from the run's logs, MODEL_CARD.md), since the run's own
     processes spanned several sessions.
  4. OUT/resurvey is shipped into vlm_chat/assets/default (or --out) with that record,
     OUT/eval_resurvey's scores.json and its knowledge.json, to which the untrained
     bundle's answers without an image are added, as the build's eval does.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from training.default_model import (FINAL_STAGE, MIX_WRITERS, RECIPES, SHIPPED_RECIPE, STAGES, BuildPaths, Recipe,
                                    _cli, bundle_command, knowledge_check, knowledge_hits, recipe_json, ship,
                                    trained_stages, write_clip_captions, write_mixes)
from vlm_chat.defaults import SHIPPED_DEFAULT
from vlm_chat.errors import UserFacingError

TIMED_ELSEWHERE = ("clip", "align", "instruct", "drill", "survey", "resurvey", "eval")  # --seconds


def timed(call):
    start = time.monotonic()
    result = call()
    return round(time.monotonic() - start, 1), result


def same_files(scratch: Path, trained_on: Path, names: list[str]) -> None:
    for name in names:
        if not filecmp.cmp(scratch / name, trained_on / name, shallow=False):
            raise UserFacingError(f"{scratch / name} differs from {trained_on / name}, which the run trained on: "
                                  "the recipe is not what the run did; nothing shipped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the chain build's work dir whose data files the run trained on")
    parser.add_argument("--corpus", required=True, help="the corpus they were written from")
    parser.add_argument("--grid", required=True, help="bench/aligned_grid.py's --out (clip_captions.jsonl, bundle)")
    parser.add_argument("--tiles", required=True, help="bench/cell_tiles.py's --out (resurvey, eval_resurvey)")
    parser.add_argument("--seconds", nargs="+", required=True, metavar="STAGE=S",
                        help=f"measured wall time of {', '.join(TIMED_ELSEWHERE)}")
    parser.add_argument("--out", default=str(SHIPPED_DEFAULT), help="where the model goes (default the shipped one)")
    parser.add_argument("--check-only", action="store_true", help="steps 1 and 2 only: ship nothing")
    args = parser.parse_args()
    base, corpus, grid, tiles = (Path(p).resolve() for p in (args.base, args.corpus, args.grid, args.tiles))
    seconds = dict(item.split("=", 1) for item in args.seconds)
    missing = [stage for stage in TIMED_ELSEWHERE if stage not in seconds]
    if missing:
        parser.error(f"--seconds: give {', '.join(missing)}")
    recipe = replace(Recipe(), **RECIPES[SHIPPED_RECIPE])
    final = trained_stages(recipe)[-1]
    bundle, evaluation = tiles / final, tiles / f"eval_{final}"
    to_ship = () if args.check_only else (bundle / "vlm_config.json", evaluation / "scores.json",
                                          evaluation / "knowledge.json")
    for needed in (*to_ship, base / "text_turns.jsonl", base / "state.json", grid / "bundle" / "projector.safetensors"):
        if not needed.is_file():
            sys.exit(f"error: not found: {needed}")
    base_state = json.loads((base / "state.json").read_text())["stages"]
    stages: dict[str, dict] = {"corpus": base_state["corpus"]}

    try:
        with tempfile.TemporaryDirectory(prefix="ship-tiles-") as scratch_dir:
            w = Path(scratch_dir)
            took, result = timed(lambda: write_clip_captions(corpus, w / "clip_captions.jsonl",
                                                            recipe.clip_shape_copies, recipe.seed))
            same_files(w, grid, ["clip_captions.jsonl"])
            stages["clip"] = {"seconds": float(seconds["clip"]) + took, "result": result}
            paths = BuildPaths(work=w, corpus=corpus, clip="train", out=Path(args.out))
            took, _ = timed(lambda: _cli(bundle_command(paths, recipe, grid / "clip" / "final")))
            same_files(w / "bundle", grid / "bundle", ["projector.safetensors"])
            stages["bundle"] = {"seconds": took, "result": None}
            before = set(p.name for p in w.iterdir())
            took, result = timed(lambda: write_mixes(corpus, w, recipe))
            same_files(w, base, sorted(set(p.name for p in w.iterdir()) - before))
            stages["mix"] = {"seconds": took, "result": result}
            for name in ("text_turns.jsonl", "distill_answers.json"):
                if (base / name).is_file():
                    shutil.copy2(base / name, w / name)
            stages["distill"] = base_state["distill"]
            for stage in ("align", "instruct"):
                stages[stage] = {"seconds": float(seconds[stage]), "result": None}
            for stage, write in MIX_WRITERS.items():
                took, result = timed(lambda: write(corpus, w, recipe))
                same_files(w, base, [f"{stage}.jsonl"])
                if stage in recipe.skip:
                    stages[stage] = {"seconds": took, "result": {**result, "trained": False}}
                else:
                    stages[stage] = {"seconds": float(seconds[stage]) + took, "result": result}
                print(f"[{stage}] {took:.0f} s, as the run's", flush=True)
            if args.check_only:
                print("the tiles recipe's data and bundle are the run's")
                return
            knowledge = json.loads((evaluation / "knowledge.json").read_text())
            knowledge["base_without_image"] = knowledge_check(w / "bundle", None)
    except UserFacingError as error:
        sys.exit(f"error: {error}")
    stages["eval"] = {"seconds": float(seconds["eval"]),
                      "result": knowledge_hits(knowledge)}
    assert list(stages) == [s for s in STAGES if s != "ship"] and final == FINAL_STAGE
    record = {"recipe": recipe_json(recipe), "stages": stages, "unfinished_seconds": {},
              "assembled_by": "bench/ship_tiles.py: the training stages ran as bench/aligned_grid.py and "
                              "bench/cell_tiles.py (MODEL_CARD.md); every data file was checked byte for byte "
                              "against the build's writers"}
    shipped = ship(bundle, Path(args.out), {"scores.json": evaluation / "scores.json"})
    (Path(args.out) / "knowledge.json").write_text(json.dumps(knowledge, indent=1))
    record["stages"]["ship"] = {"seconds": 0.0, "result": shipped}
    (Path(args.out) / "recipe.json").write_text(json.dumps(record, indent=1))
    total = sum(info["seconds"] for info in record["stages"].values())
    print(json.dumps({stage: info["seconds"] for stage, info in record["stages"].items()}, indent=1))
    print(f"shipped {shipped['out']} ({shipped['megabytes']} MB); stages in all {total / 3600:.2f} h")


if __name__ == "__main__":
    main()
