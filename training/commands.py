"""Commands of this layer for the `vlm-chat` CLI (see cli/main.py)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this layer's subcommands."""
    _register_corpus(subparsers)
    _register_train(subparsers)
    _register_data(subparsers)
    _register_eval(subparsers)
    _register_default(subparsers)


def _register_corpus(subparsers: argparse._SubParsersAction) -> None:
    corpus = subparsers.add_parser("corpus", help="build the offline image-text corpus")
    actions = corpus.add_subparsers(dest="corpus_command", metavar="ACTION")
    actions.required = True
    build = actions.add_parser(
        "build",
        help="render images, captions and questions from Debian-packaged sources",
        description="Write a deterministic image-text corpus (see docs/corpus.md). "
        "Same seed, same flags: byte-identical files.",
    )
    build.add_argument("--out", required=True, help="output directory (created; a previous corpus there is replaced)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--scenes", type=int, default=None, help="composed scenes over all splits (default 60000)")
    build.add_argument("--max-per-source", type=int, default=None,
                       help="cap on Fashion-MNIST images, emoji glyphs and clip-art files each; 0 = all (default)")
    build.add_argument("--canvas", type=int, default=None, help="image side in pixels (default 96)")
    build.add_argument("--workers", type=int, default=2, help="render processes; output does not depend on it")
    build.add_argument("--small", action="store_true", help="a seconds-sized corpus for tests and smoke runs")
    build.set_defaults(func=_corpus_build)


def _corpus_build(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from training.corpus import CorpusConfig, build_corpus
    from vlm_chat.errors import UserFacingError

    overrides = {k: v for k, v in (("scenes", args.scenes), ("max_per_source", args.max_per_source),
                                   ("canvas", args.canvas)) if v is not None}
    if args.canvas is not None and args.canvas < 48:
        raise UserFacingError(f"--canvas {args.canvas} is too small: scenes need at least 48 px (16 px cells)")
    out = Path(args.out)
    if args.small:
        cfg = CorpusConfig.small(out, seed=args.seed, workers=args.workers, **overrides)
    else:
        cfg = CorpusConfig(out=out, seed=args.seed, workers=args.workers, **overrides)
    manifest = build_corpus(cfg)
    summary = {k: manifest[k] for k in ("images", "captions", "triples", "labels_test", "build_seconds")}
    print(json.dumps(summary, indent=1))
    print(f"corpus written to {out}")
    return 0


# ---------------------------------------------------------------- train

# Flags shared by every stage: the fields of training.trainer.TrainConfig (`--out` is output_dir).
TRAIN_FLAGS = (
    ("--epochs", int, "passes over the training data (default 1)"),
    ("--max-steps", int, "optimizer steps; > 0 overrides --epochs"),
    ("--batch-size", int, "samples per micro-batch per device (default 8)"),
    ("--grad-accum", int, "micro-batches per optimizer step (default 1)"),
    ("--lr", float, "peak learning rate (default 1e-4)"),
    ("--weight-decay", float, "AdamW weight decay on matrices (default 0)"),
    ("--warmup", float, "warmup: a fraction of the steps if < 1, else a step count (default 0)"),
    ("--schedule", str, "cosine | constant (default cosine)"),
    ("--min-lr-ratio", float, "cosine floor as a fraction of the peak lr (default 0)"),
    ("--max-grad-norm", float, "gradient clipping; 0 disables (default 1.0)"),
    ("--log-every", int, "steps between metrics.jsonl records (default 10)"),
    ("--eval-every", int, "steps between eval-loss measurements; 0 = at the end only"),
    ("--eval-max-batches", int, "cap on eval batches; 0 = the whole eval split"),
    ("--save-every", int, "steps between checkpoints; 0 = at the end only"),
    ("--save-every-minutes", float, "also checkpoint after this many minutes; 0 = off"),
    ("--keep-last", int, "checkpoints kept (default 2)"),
    ("--seed", int, "seed of init, data order and augmentation (default 0)"),
    ("--mixed-precision", str, "no | bf16 | fp16 | auto (fp16 needs a GPU; bf16 runs as fp32 on a CPU without native bf16; "
                                "auto: bf16 on a GPU with it or a CPU with AVX512-BF16 or AMX, else fp32) (default no)"),
    ("--num-workers", int, "data loader processes (default 0: exact resume of augmentation)"),
)


def _train_clip(settings: dict) -> int:
    from training.clip import config_from_settings, run
    from vlm_chat.errors import UserFacingError

    for key in ("data", "val"):
        if isinstance(settings.get(key), list):
            if len(settings[key]) != 1:
                raise UserFacingError(f"stage clip takes one --{key} captions file, got {len(settings[key])}")
            settings[key] = settings[key][0]

    run(config_from_settings(settings))
    return 0


def _train_vlm(stage: str, settings: dict) -> int:
    from training.vlm import config_from_settings, run

    run(config_from_settings(stage, settings))
    return 0


def _train_sharpen(settings: dict) -> int:
    from training.sharpen import sharpen
    from vlm_chat.errors import UserFacingError

    known = {"model", "data", "val", "out", "max_steps", "batch_size", "lr", "head_lr", "anchor", "seed", "recolour"}
    other = sorted(set(settings) - known)
    if other:
        raise UserFacingError(f"stage sharpen takes none of: {', '.join('--' + k.replace('_', '-') for k in other)} "
                              f"(it takes {', '.join('--' + k.replace('_', '-') for k in sorted(known))})")
    for key in ("model", "data", "val", "out"):
        value = settings.get(key)
        if isinstance(value, list):
            if len(value) != 1:
                raise UserFacingError(f"stage sharpen takes one --{key}, got {len(value)}")
            settings[key] = value[0]
        if not settings.get(key):
            raise UserFacingError(f"stage sharpen needs --{key}")
    sharpen(settings.pop("model"), settings.pop("data"), settings.pop("val"), settings.pop("out"), **settings)
    return 0


# Each stage takes the merged flat settings and parses them into its typed config.
STAGES = {
    "clip": _train_clip,
    "align": lambda settings: _train_vlm("align", settings),
    "instruct": lambda settings: _train_vlm("instruct", settings),
    "sharpen": _train_sharpen,
}


def _register_train(subparsers: argparse._SubParsersAction) -> None:
    # SUPPRESS: only flags actually given reach the handler, so they can override --config values
    train = subparsers.add_parser(
        "train",
        help="train a stage: clip (contrastive pretraining), align (projector), instruct (LoRA), "
        "sharpen (the vision tower on labels of image cells)",
        description="Every stage runs the shared loop in training/trainer.py: checkpoints in OUT/checkpoints, "
        "metrics.jsonl and loss.png in OUT. Keys of --config FILE.yaml are the flag names with underscores; "
        "flags given on the command line win.",
        argument_default=argparse.SUPPRESS,
    )
    train.add_argument("--stage", help=f"one of: {', '.join(STAGES)}")
    train.add_argument("--config", help="YAML file of settings (same keys as the flags)")
    train.add_argument("--out", help="output dir (checkpoints, metrics, final model)")
    train.add_argument("--resume", nargs="?", const="latest",
                       help="continue from the latest checkpoint in --out, or from the given checkpoint dir")
    common = train.add_argument_group("trainer (all stages)")
    for flag, kind, help_text in TRAIN_FLAGS:
        common.add_argument(flag, type=kind, help=help_text)
    common.add_argument("--in-order", action="store_true",
                        help="batches in the order of the data file (a curriculum written by the data), not shuffled")
    common.add_argument("--group-by-length", action="store_true",
                        help="shuffled batches of samples of similar length, so little compute goes to padding "
                        "(stages align and instruct)")
    vlm = train.add_argument_group("stages align and instruct")
    vlm.add_argument("--model", help="bundle to start from (vlm-chat build, or an earlier stage's --out)")
    vlm.add_argument("--vision", choices=["frozen", "lora", "full"], help="what trains in the vision tower")
    vlm.add_argument("--projector", choices=["frozen", "full"], help="what trains in the projector")
    vlm.add_argument("--llm", choices=["frozen", "lora", "full"], help="what trains in the LLM")
    vlm.add_argument("--projector-lr", type=float, help="projector learning rate (instruct default 2e-5)")
    vlm.add_argument("--vision-lr", type=float, help="vision tower learning rate (default --lr)")
    vlm.add_argument("--lora-r", type=int, help="LoRA rank (default 16)")
    vlm.add_argument("--lora-alpha", type=int, help="LoRA alpha (default 32)")
    vlm.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0.05); given, it also replaces the dropout of an adapter the "
                     "bundle already has. 0 trains about 1.35x faster on a CPU (README)")
    vlm.add_argument("--lora-targets", nargs="+", help="module names for LoRA (default: all linear layers)")
    vlm.add_argument("--position-embedding", action="store_true",
                     help="give the projector a learned vector per image token (zeros at first, so nothing the "
                     "bundle knows is lost) if it has none; it trains with the projector")
    vlm.add_argument("--match-word-scale", action="store_true",
                     help="before training, scale the projector's output so image tokens have the mean norm of the "
                     "LLM's word embeddings (measured on 64 training images; saved as projector.output_scale)")
    vlm.add_argument("--top-layers", type=int, metavar="N",
                     help="train only the LoRA of the LLM's last N decoder layers: what the frozen rest computes is "
                     "cached once, so an epoch costs about N / layers of a full one (needs --vision frozen --projector "
                     "frozen --llm lora)")
    vlm.add_argument("--qlora", action="store_true", help="load the LLM in 4-bit (bitsandbytes NF4) and train LoRA on it")
    vlm.add_argument("--val-fraction", type=float, help="share of --data held out for eval loss when no --val (0.02)")
    vlm.add_argument("--skip-bad", action="store_true", help="train on the good rows when some rows are bad")
    vlm.add_argument("--device", help="auto, cpu, cuda ...")
    sharpen = train.add_argument_group("stage sharpen (training/sharpen.py; also --model, --data, --val, --max-steps, "
                                     "--batch-size, --lr for the tower, --seed)")
    sharpen.add_argument("--head-lr", type=float, help="learning rate of the linear heads (default 1e-3)")
    sharpen.add_argument("--anchor", type=float, help="weight of the pull towards the original tower's features (default 1.0)")
    sharpen.add_argument("--recolour", help="a head that also learns from each batch with its colour channels shuffled, "
                         "so it cannot lean on the colours a label was seen in (e.g. object)")
    clip = train.add_argument_group("stage clip")
    clip.add_argument("--data", nargs="+",
                      help="data file(s): clip/align take captions JSONL; instruct takes triples JSONL/CSV, "
                      "captions JSONL or LLaVA JSON (paths relative to each file)")
    clip.add_argument("--val", nargs="+", help="held-out data file(s) (clip default: captions_val.jsonl beside --data)")
    clip.add_argument("--max-eval-samples", type=int, help="cap on held-out pairs for the eval loss (default 1000)")
    clip.add_argument("--no-augment", dest="augment", action="store_false", help="no random resized crops")
    clip.add_argument("--init", help="CLIP dir or hub id to continue from (default: from scratch)")
    clip.add_argument("--loss", help="infonce (CLIP) | sigmoid (SigLIP) (default infonce)")
    for flag, kind in (("--image-size", int), ("--patch-size", int), ("--vision-width", int), ("--vision-layers", int),
                       ("--vision-heads", int), ("--text-width", int), ("--text-layers", int), ("--text-heads", int),
                       ("--projection-dim", int), ("--vocab-size", int), ("--max-text-len", int)):
        clip.add_argument(flag, type=kind, help="model size for a from-scratch CLIP (see docs/clip.md)")
    train.set_defaults(func=_train, fast_allocator=True)  # runs again under tcmalloc when installed (vlm_chat/devices.py)


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vlm_chat.errors import UserFacingError

    settings: dict = {}
    if "config" in args:
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise UserFacingError(f"--config {path}: file not found")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise UserFacingError(f"--config {path}: expected a mapping of settings, got {type(loaded).__name__}")
        settings.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
    settings.update({k: v for k, v in vars(args).items() if k not in ("func", "command", "config")})
    stage = settings.pop("stage", None)
    if stage not in STAGES:
        raise UserFacingError(f"unknown or missing stage {stage!r}; choose --stage one of: {', '.join(STAGES)}")
    return STAGES[stage](settings)


# ---------------------------------------------------------------- data check


def _register_data(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="check training data before training on it")
    actions = data.add_subparsers(dest="data_command", metavar="ACTION")
    actions.required = True
    check = actions.add_parser(
        "check",
        help="report every bad row (missing/unreadable images, empty turns, placeholder mismatch, too long, duplicate ids)",
        description="Validate triples (JSONL/CSV), captions JSONL or LLaVA JSON. Exits 1 if any row is bad. "
        "With --model, also counts each sample's tokens against that bundle's context.",
    )
    check.add_argument("files", nargs="+", help="data files")
    check.add_argument("--model", help="bundle whose tokenizer and context limit to check lengths against")
    check.add_argument("--fix-out", help="write the good rows here (JSONL, one row per line as read)")
    check.set_defaults(func=_data_check)


def _data_check(args: argparse.Namespace) -> int:
    import json
    import os
    from collections import Counter

    from training.data import check_samples

    processor, limit = None, 0
    if args.model:
        from vlm_chat.defaults import resolve_model
        from vlm_chat.model import VisionLanguageModel

        model, processor = VisionLanguageModel.from_pretrained(resolve_model(args.model), device="cpu", quantization="none")
        limit = model.max_context
    good, problems = check_samples(args.files, processor, limit, full_decode=True)
    for problem in sorted(problems, key=lambda p: (p.file, p.row)):
        print(problem)
    bad = {(p.file, p.row) for p in problems}
    kinds = Counter(p.message.split(":")[0] for p in problems)
    print(f"{len(good)} good row(s), {len(bad)} bad row(s)" + (f" ({dict(kinds)})" if kinds else "")
          + ("" if args.model else "; lengths not checked (pass --model BUNDLE)"))
    if args.fix_out:
        out_dir = os.path.dirname(os.path.abspath(args.fix_out))
        with open(args.fix_out, "w") as out:
            for sample in good:
                row = dict(sample.raw)
                # Keep image paths valid relative to the new file's folder.
                if "image" in row and row["image"]:
                    names = row["image"] if isinstance(row["image"], list) else [row["image"]]
                    fixed = [os.path.relpath(os.path.join(os.path.dirname(sample.file), n), out_dir) for n in names]
                    row["image"] = fixed if isinstance(row["image"], list) else fixed[0]
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(good)} good row(s) to {args.fix_out}")
    return 1 if problems else 0


# ---------------------------------------------------------------- eval


def _register_eval(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="VQA accuracy (by type), yes/no hallucination metrics and caption BLEU-4 / CIDEr of a bundle",
        description="Greedy, batched answers on triples (JSONL/CSV), LLaVA JSON and caption files; see training/evaluate.py.",
    )
    p.add_argument("--model", help="bundle directory (default: the offline default model, or $VLM_CHAT_DEFAULT_MODEL)")
    p.add_argument("--data", nargs="+", required=True, help="test files (triples with 'type', captions)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N questions and N captioned images")
    p.add_argument("--skip-bad", action="store_true", help="leave out bad rows instead of refusing")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.add_argument("--out", default=None, help="folder for scores.json, predictions.jsonl (every answer next to the expected one) and a bar chart per type (by_type.png)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from training.evaluate import evaluate, markdown_table, plot_by_type
    from vlm_chat.defaults import resolve_model
    from vlm_chat.errors import UserFacingError
    from vlm_chat.model import VisionLanguageModel

    if args.batch_size < 1:
        raise UserFacingError("--batch-size must be at least 1")
    model, processor = VisionLanguageModel.from_pretrained(resolve_model(args.model), device=args.device, merge_adapter=True)
    scores, predictions = evaluate(model, processor, args.data, args.batch_size, args.max_new_tokens, args.limit, args.skip_bad)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
        with (out / "predictions.jsonl").open("w") as f:
            for row in predictions:
                f.write(json.dumps(row) + "\n")
        if scores.get("by_type"):
            plot_by_type(scores, out / "by_type.png")
    print(json.dumps(scores, indent=2) if args.json else markdown_table(scores))
    return 0


# ---------------------------------------------------------------- default model


def _register_default(subparsers: argparse._SubParsersAction) -> None:
    default = subparsers.add_parser("default", help="rebuild the offline default model from nothing, or score it again")
    actions = default.add_subparsers(dest="default_command", metavar="ACTION")
    actions.required = True
    build = actions.add_parser(
        "build",
        help="corpus -> CLIP -> bundle -> align -> instruct -> ... -> eval -> ship (resumable)",
        description="Run the default model's recipe (training/default_model.py). Each stage's wall time goes "
        "to WORK/state.json; run the same command again after a kill and finished stages are skipped, "
        "a training stage resumes from its last checkpoint.",
    )
    build.add_argument("--work", default="runs/default-build", help="working dir (default runs/default-build)")
    build.add_argument("--corpus", help="corpus dir, reused if it holds a manifest.json (default WORK/corpus)")
    build.add_argument("--clip", choices=("shipped", "train"), default="train",
                       help="train the CLIP from scratch (default, about an hour) or take vlm_chat/assets/clip")
    build.add_argument("--out", help="where the finished model goes (default vlm_chat/assets/default; with a "
                       "recipe other than tiles, WORK/model)")
    build.add_argument("--recipe", choices=("tiles", "quick", "cells", "wordscale", "sharpen", "chain"), default="tiles",
                       help="tiles: the recipe of the shipped model (default): a CLIP on the scenes' grid (needs --clip "
                       "train), named image tiles, instruct, drill, survey, resurvey, census and naming; quick: tiles with no "
                       "LoRA dropout and in bf16 where the hardware has it, about 2.6x as fast a step on an AMX CPU; cells: tiles with one "
                       "image token per cell (each cell's 2x2 patches stacked by a pixel shuffle); wordscale: tiles "
                       "with image tokens scaled to the length of the LLM's word embeddings from align on; sharpen: tiles, "
                       "then the vision tower taught what each grid cell holds and the LLM taught to read it (stages "
                       "sharpen and rename, measured 0.8 points under tiles); chain: the "
                       "model shipped before it, on the 64 px CLIP, through all sixteen stages after align (MODEL_CARD.md)")
    build.add_argument("--until", help="stop after this stage (one of: corpus, clip, bundle, mix, distill, align, "
                       "instruct, drill, review, lone, consolidate, crowd, recall, tally, recount, tint, retint, discern, survey, resurvey, "
                       "census, naming, sharpen, rename, eval, ship)")
    build.add_argument("--from-shipped", action="store_true",
                       help="go on from the model in --out (as shipped, with its recipe.json) instead of from nothing: "
                       "rewrite the data of the stages it went through (seeded, a few minutes), check them against "
                       "its recipe.json, take it as its last training stage's output and run only the stages after "
                       "that one (with --clip shipped if the model was built on the shipped CLIP)")
    build.set_defaults(func=_default_build, fast_allocator=True)
    again = actions.add_parser(
        "eval",
        help="score a model the build shipped again, on its own test sample, against the scores it records",
        description="Rebuild the test sample a `vlm-chat default build` model was scored on (the corpus if --corpus "
        "holds none, about 3 minutes; then the seeded eval files of its recipe.json), run `vlm-chat eval` and the "
        "held-out general questions on it, and print the scores against the bars and against the model's own "
        "scores.json: 'reproduced' when every measure is the recorded one.",
    )
    again.add_argument("--model", help="a bundle `vlm-chat default build` shipped, with its recipe.json "
                       "(default: the shipped default model)")
    again.add_argument("--work", default="runs/default-eval", help="where the test files and WORK/eval go "
                       "(default runs/default-eval)")
    again.add_argument("--corpus", help="corpus dir, reused if it holds a manifest.json, else built there "
                       "(default WORK/corpus)")
    again.add_argument("--batch-size", type=int, help="eval batch size (default: the recipe's, 32)")
    again.set_defaults(func=_default_eval)


def _default_build(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from dataclasses import replace

    from training.default_model import (RECIPES, SHIPPED_RECIPE, STAGES, BuildPaths, Recipe, build_default,
                                        continue_from_shipped)
    from vlm_chat.defaults import SHIPPED_DEFAULT
    from vlm_chat.errors import UserFacingError

    if args.until and args.until not in STAGES:
        raise UserFacingError(f"--until {args.until}: choose one of {', '.join(STAGES)}")
    work = Path(args.work).resolve()
    paths = BuildPaths(work=work, corpus=Path(args.corpus).resolve() if args.corpus else work / "corpus",
                       clip=args.clip, out=Path(args.out).resolve() if args.out else
                       SHIPPED_DEFAULT if args.recipe == SHIPPED_RECIPE else work / "model")
    recipe = replace(Recipe(), **RECIPES[args.recipe])
    if args.from_shipped:
        continue_from_shipped(paths, recipe, paths.out)
    state = build_default(paths, recipe, until=args.until)
    print(json.dumps({stage: info["seconds"] for stage, info in state["stages"].items()}, indent=1))
    return 0


def _default_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training.default_model import reevaluate
    from vlm_chat.defaults import SHIPPED_DEFAULT

    work = Path(args.work).resolve()
    reevaluate(Path(args.model).resolve() if args.model else SHIPPED_DEFAULT, work,
               Path(args.corpus).resolve() if args.corpus else work / "corpus", args.batch_size)
    return 0
