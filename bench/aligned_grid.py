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

Steps, each a `vlm-chat` command printed as it runs; a rerun resumes:

  clip      OUT/clip_captions.jsonl, then `vlm-chat train --stage clip` (2,200 steps of 128)
  bundle    the CLIP's vision tower + SmolLM2 + a `mlp2x_gelu` projector, no token reduction
  align     the build's align stage settings on WORK/align.jsonl
  instruct  the build's instruct stage settings on WORK/instruct.jsonl
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
import random
from pathlib import Path

from training.default_model import Recipe, _cli, _flags, _read_jsonl, _write_jsonl, knowledge_check

STEPS = ("clip", "bundle", "align", "instruct", "eval")
CLIP_FLAGS = ["--image-size", "96", "--patch-size", "16", "--vision-width", "256", "--vision-layers", "6",
              "--text-width", "256", "--text-layers", "4", "--projection-dim", "256", "--vocab-size", "4096",
              "--max-text-len", "32", "--no-augment"]


def write_clip_captions(corpus: Path, out: Path, shape_copies: int, seed: int) -> dict:
    """`out`: every training caption of the corpus, plus `shape_copies` more of each caption
    of a single-shape image, shuffled; image paths absolute."""
    rows = _read_jsonl(corpus / "captions_train.jsonl")
    shapes = [r for r in rows if "/shape/" in f"/{r['image']}"]
    mixed = rows + shapes * shape_copies
    random.Random(seed).shuffle(mixed)
    root = corpus.resolve()
    _write_jsonl(out, [{"image": str(root / r["image"]), "caption": r["caption"]} for r in mixed])
    return {"captions": len(rows), "shape_captions": len(shapes), "pairs": len(mixed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="a default-model build's work dir: its align, instruct and eval files")
    parser.add_argument("--corpus", required=True, help="that build's corpus dir")
    parser.add_argument("--out", required=True, help="folder for this experiment's runs")
    parser.add_argument("--until", choices=STEPS, default="eval", help="last step to run (default eval)")
    parser.add_argument("--clip-steps", type=int, default=2200)
    parser.add_argument("--shape-copies", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    base, corpus, out = Path(args.base), Path(args.corpus), Path(args.out)
    wanted = ["align.jsonl", "instruct.jsonl", "eval_triples.jsonl", "eval_captions.jsonl"]
    missing = [name for name in wanted if not (base / name).is_file()]
    if missing:
        parser.error(f"{base}: {', '.join(missing)} not found; run `vlm-chat default build --work {base} --until mix` first")
    out.mkdir(parents=True, exist_ok=True)
    recipe = Recipe(seed=args.seed)

    def train(stage: str, after: Path, settings: dict) -> None:
        if (out / stage / "vlm_config.json").is_file():  # written when the stage ends
            return
        _cli(["train", "--stage", stage, "--model", str(after), "--data", str(base / f"{stage}.jsonl"),
              "--out", str(out / stage), "--seed", str(args.seed), "--resume", *_flags(settings)])

    for step in STEPS:
        if step == "clip":
            print(write_clip_captions(corpus, out / "clip_captions.jsonl", args.shape_copies, args.seed), flush=True)
            if not (out / "clip" / "final" / "config.json").is_file():  # written when the run ends
                _cli(["train", "--stage", "clip", "--data", str(out / "clip_captions.jsonl"),
                      "--val", str(corpus / "captions_val.jsonl"), "--out", str(out / "clip"), *CLIP_FLAGS,
                      "--batch-size", "128", "--max-steps", str(args.clip_steps), "--lr", "5e-4",
                      "--warmup", str(min(100, args.clip_steps // 10)), "--weight-decay", "0.1", "--eval-every", "200",
                      "--eval-max-batches", "8", "--save-every-minutes", "5", "--log-every", "10",
                      "--seed", str(args.seed), "--resume"])
        elif step == "bundle" and not (out / "bundle" / "vlm_config.json").is_file():
            _cli(["build", "--vision", str(out / "clip" / "final"), "--llm", recipe.llm, "--projector", recipe.projector,
                  "--token-reduction", "none", "--seed", str(args.seed), "--out", str(out / "bundle")])
        elif step == "align":
            train("align", out / "bundle", recipe.align)
        elif step == "instruct":
            train("instruct", out / "align", recipe.instruct)
        elif step == "eval":
            _cli(["eval", "--model", str(out / "instruct"), "--data", str(base / "eval_triples.jsonl"),
                  str(base / "eval_captions.jsonl"), "--batch-size", str(recipe.eval_batch_size), "--out", str(out / "eval")])
            first_image = _read_jsonl(base / "eval_triples.jsonl")[0]["image"]
            knowledge = knowledge_check(out / "instruct", first_image)
            (out / "eval" / "knowledge.json").write_text(json.dumps({"tuned_with_image": knowledge}, indent=1))
            print(f"general questions, image attached: {knowledge['hits']}/{knowledge['n']}", flush=True)
        if step == args.until:
            break


if __name__ == "__main__":
    main()
