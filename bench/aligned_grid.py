"""A CLIP whose patch grid lines up with the scenes' 3x3 cells, and the build's first two
VLM stages on top of it (an experiment next to a default-model build; not a build stage).

    python bench/aligned_grid.py --base WORK --corpus DIR --out OUT [--until align|instruct|eval]

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
            build's check of general questions with an image attached

Same data, order and settings as the build's align and instruct stages, so the result
compares with the build's model after instruct (MODEL_CARD.md: 44.0 % overall).
`python bench/clip_shapes.py --clip OUT/clip/final` and `vlm-chat eval-clip --clip
OUT/clip/final --corpus DIR` measure the CLIP itself.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

from training.default_model import BuildPaths, Recipe, _cli, _read_jsonl, knowledge_check, stage_commands, write_clip_captions

STEPS = ("clip", "bundle", "align", "instruct", "eval")
# The recipe fields that make the grid CLIP and its bundle; the rest is the build's default.
GRID = {"clip_image_size": 96, "clip_patch_size": 16, "clip_shape_copies": 4, "clip_augment": False,
        "token_reduction": "none"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="a default-model build's work dir: its align, instruct and eval files")
    parser.add_argument("--corpus", required=True, help="that build's corpus dir")
    parser.add_argument("--out", required=True, help="folder for this experiment's runs")
    parser.add_argument("--until", choices=STEPS, default="eval", help="last step to run (default eval)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    base, corpus, out = Path(args.base), Path(args.corpus), Path(args.out)
    wanted = ["align.jsonl", "instruct.jsonl", "eval_triples.jsonl", "eval_captions.jsonl"]
    missing = [name for name in wanted if not (base / name).is_file()]
    if missing:
        parser.error(f"{base}: {', '.join(missing)} not found; run `vlm-chat default build --work {base} --until mix` first")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("align.jsonl", "instruct.jsonl"):
        shutil.copy2(base / name, out / name)
    recipe = replace(Recipe(seed=args.seed), **GRID)
    commands = stage_commands(BuildPaths(work=out, corpus=corpus, clip="train", out=out / "unused"), recipe)
    finished = {"clip": out / "clip" / "final" / "config.json", "bundle": out / "bundle" / "vlm_config.json",
                "align": out / "align" / "vlm_config.json", "instruct": out / "instruct" / "vlm_config.json"}
    for step in STEPS:
        if step == "clip" and not finished["clip"].is_file():  # a finished CLIP needs its captions no more
            print(write_clip_captions(corpus, out / "clip_captions.jsonl", recipe.clip_shape_copies, recipe.seed), flush=True)
        if step == "eval":
            _cli(["eval", "--model", str(out / "instruct"), "--data", str(base / "eval_triples.jsonl"),
                  str(base / "eval_captions.jsonl"), "--batch-size", str(recipe.eval_batch_size), "--out", str(out / "eval")])
            first_image = _read_jsonl(base / "eval_triples.jsonl")[0]["image"]
            knowledge = knowledge_check(out / "instruct", first_image)
            (out / "eval" / "knowledge.json").write_text(json.dumps({"tuned_with_image": knowledge}, indent=1))
            print(f"general questions, image attached: {knowledge['hits']}/{knowledge['n']}", flush=True)
        elif not finished[step].is_file():  # each is written when its step ends
            _cli(commands[step])
        if step == args.until:
            break


if __name__ == "__main__":
    main()
