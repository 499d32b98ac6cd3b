"""Teach the default model's own vision tower shapes, then the model with it (an
experiment on top of a build's work dir; not a build stage, see below).

    python bench/resight.py --work WORK --corpus DIR [--after discern] [--clip CLIP] [--steps 300] [--seed 0]
    vlm-chat eval --model WORK/resight --data WORK/eval_triples.jsonl WORK/eval_captions.jsonl --out WORK/resight-eval

sharpen: the vision tower of WORK/<after> (the VLM trained it at a low learning rate),
joined to the text tower of the CLIP it started from (`--clip`, default the shipped
one), goes on training contrastively on WORK/sharpen.jsonl: every caption of the
corpus's single-shape training images and as many drawn from its other training
captions. Half of each batch of 128 is then lone shapes in the 8 colours, so colour alone
cannot match its pairs (`bench/clip_shapes.py` measures the result). resight: a copy of
WORK/<after> with that tower trains on WORK/resight.jsonl, a mix like the build's discern
stage (every object of 2,000 training scenes named by its cell, yes/no about look-alikes,
400 fresh scenes, the discern, tint, tally and crowd mixes replayed), with discern's
settings. Every step is a `vlm-chat` command, printed as it runs; a rerun resumes.

On the default model after discern this took the tower's shape zero-shot from 26 % to
79 % and the model's naming of shapes from 18 % to 21 %, but cost 2.6 points overall and
the "yes"-share bar, so the build does not run it (docs/experiments.md has the figures).
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

from training.default_model import (
    EVERY_SKILL_SETTINGS, NOT_SHIPPED, SCENE_MIXES, SHIPPED_CLIP, _cli, _flags, _read_jsonl, _used_scenes,
    _write_telling_mix, is_shape_caption, write_captions,
)


def write_sharpen(corpus: Path, out: Path, other_captions: int, seed: int) -> dict:
    """`out`: every caption of the single-shape training images and `other_captions` others, shuffled."""
    rows = _read_jsonl(corpus / "captions_train.jsonl")
    shapes = [r for r in rows if is_shape_caption(r)]
    rest = [r for r in rows if not is_shape_caption(r)]
    rng = random.Random(seed)
    mixed = shapes + rng.sample(rest, min(other_captions, len(rest)))
    rng.shuffle(mixed)
    write_captions(corpus, out, mixed)
    return {"shape_captions": len(shapes), "other_captions": len(mixed) - len(shapes)}


def clip_with_tower(clip: Path, vision: Path, out: Path) -> None:
    """A CLIP dir: the text tower and projections of `clip`, the vision tower saved in `vision`
    (a bundle's vision/, which training moved away from the text tower)."""
    from transformers import AutoProcessor, CLIPModel, CLIPVisionModel

    model = CLIPModel.from_pretrained(clip)
    tower = CLIPVisionModel.from_pretrained(vision)
    model.vision_model.load_state_dict(getattr(tower, "vision_model", tower).state_dict())  # transformers 5 dropped the wrapper
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(clip).save_pretrained(out)


def bundle_with_tower(bundle: Path, clip: Path, out: Path) -> None:
    """A copy of `bundle` (without its checkpoints) whose vision tower is the one of the CLIP dir `clip`."""
    from transformers import CLIPVisionModel

    from vlm_chat.config import VLMConfig

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(bundle, out, ignore=shutil.ignore_patterns(*NOT_SHIPPED))
    if (out / "vision").exists():
        shutil.rmtree(out / "vision")
    CLIPVisionModel.from_pretrained(clip).save_pretrained(out / "vision")
    config = VLMConfig.load(out)
    config.vision.name_or_path = "vision"
    config.save(out)


def write_resight(corpus: Path, work: Path, seed: int, naming_scenes: int = 2000, lookalike_scenes: int = 1000,
                  conversations: int = 400, replays: tuple[tuple[str, int], ...] = (
                      ("tint", 200), ("tally", 300), ("crowd", 200), ("discern", 300)),
                  caption_singles: int = 200) -> dict:
    """WORK/resight.jsonl: discern's kind of mix again, on scenes no mix of the build used.
    Its naming and look-alike rows are told apart from discern's replayed ones by their ids."""
    used = _used_scenes(work, tuple((f, p) for f, p in SCENE_MIXES if (work / f).is_file()))
    return _write_telling_mix(corpus, work, "resight", seed + 91, used, naming_scenes, lookalike_scenes, conversations,
                              (8, 13), 0.1, replays, caption_singles, ids="resight-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="a default-model build's work dir (`vlm-chat default build --work`)")
    parser.add_argument("--corpus", required=True, help="that build's corpus dir")
    parser.add_argument("--after", default="discern", help="the build's bundle to go on from (default discern)")
    parser.add_argument("--clip", default=str(SHIPPED_CLIP), help="the CLIP whose text tower is used (default the shipped one)")
    parser.add_argument("--steps", type=int, default=300, help="contrastive steps of 128 (default 300)")
    parser.add_argument("--other-captions", type=int, default=12800)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work, corpus = Path(args.work), Path(args.corpus)
    if not (work / args.after / "vision").is_dir():
        parser.error(f"{work / args.after}/vision not found: give --after a bundle of the build whose vision tower was trained")
    print(write_sharpen(corpus, work / "sharpen.jsonl", args.other_captions, args.seed), flush=True)
    if not (work / "sharpen_init" / "config.json").is_file():
        clip_with_tower(Path(args.clip), work / args.after / "vision", work / "sharpen_init")
    _cli(["train", "--stage", "clip", "--init", str(work / "sharpen_init"), "--data", str(work / "sharpen.jsonl"),
          "--out", str(work / "sharpen"), "--batch-size", "128", "--max-steps", str(args.steps), "--lr", "1e-4",
          "--warmup", str(args.steps // 20), "--weight-decay", "0.1", "--eval-every", "0", "--save-every-minutes", "5",
          "--log-every", "10", "--seed", str(args.seed), "--resume"])
    if not (work / "resight_init" / "vlm_config.json").is_file():
        bundle_with_tower(work / args.after, work / "sharpen" / "final", work / "resight_init")
    print(write_resight(corpus, work, args.seed), flush=True)
    settings = {**EVERY_SKILL_SETTINGS, "val_fraction": 0.02}
    _cli(["train", "--stage", "instruct", "--model", str(work / "resight_init"), "--data", str(work / "resight.jsonl"),
          "--out", str(work / "resight"), "--seed", str(args.seed), "--resume", *_flags(settings)])


if __name__ == "__main__":
    main()
