"""LoRA instruct-stage training speed: our trainer against a bare PyTorch loop, one run.

    python bench/bench_train.py [--bundle DIR] [--steps 12] [--batch-size 4]
    python bench/bench_train.py --bundle BUNDLE --data WORK/census.jsonl --vision full --batch-size 8

Both sides train the same model (the bundle's SmolLM2 + projector, LoRA r=16 on all
LLM linear layers, frozen vision tower) on the same batches of generated
(image, question, answer) triples. "ours" is `vlm-chat train --stage instruct`
(accelerate, gradient clipping, cosine schedule, progress bar, metrics log, the
output head computed only where labels are), once in fp32, once with
`--mixed-precision bf16` (autocast; pays off on CPUs with AMX or AVX512-BF16) and once in
bf16 with `--lora-dropout 0`;
"bare" is forward (the model's full loss) / backward / AdamW step in a plain
for-loop. The first two steps of each are warm-up and not timed.

`--data FILE` times a build stage's own mix instead (its first steps x batch-size rows,
in file order, so every run trains on the same batches). The baseline is ours in fp32 on
glibc's malloc with nothing done to it, measured first and last; between them ours
calling malloc_trim after each step, ours trimming only when the process is large (the
trainer's way, `vlm_chat/devices.py:trim_heap_when_large`), and ours in fp32 and bf16 on
glibc, jemalloc and tcmalloc (LD_PRELOAD, where installed), then with no LoRA dropout
(`--lora-dropout 0`) in fp32 and in bf16 on each malloc; `--only` picks some. The bare
loop's full-vocabulary loss over such long conversations does not fit in 24 GB at batch 8. `--vision full` trains the vision tower too, as the build's stages do.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WARMUP = 2


def make_triples(folder: Path, n: int) -> Path:
    from PIL import Image, ImageDraw

    colours = {"red": (220, 30, 30), "blue": (20, 40, 220), "green": (30, 200, 40), "yellow": (230, 220, 20)}
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name, rgb = list(colours.items())[i % 4]
        image = Image.new("RGB", (96, 96), "white")
        ImageDraw.Draw(image).ellipse((10 + i % 20, 10, 60 + i % 20, 60), fill=rgb)
        image.save(folder / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "question": "What colour is the circle in this picture?",
                     "answer": f"The circle is {name}. It sits near the top left of a white background."})
    path = folder / "triples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def first_rows(source: Path, n: int, dest: Path, needed_by: str = "--steps x --batch-size") -> Path:
    """The first n rows of a mix file, image paths made absolute (they are relative to
    the file they are in), so every loop trains on the same batches; `needed_by` says
    what wants n of them when the file is short."""
    rows = []
    with source.open() as f:
        for line in f:
            if len(rows) == n:
                break
            row = json.loads(line)
            if row.get("image"):
                row["image"] = str((source.parent / row["image"]).resolve())
            rows.append(row)
    if len(rows) < n:
        raise SystemExit(f"{source} has {len(rows)} rows; {needed_by} needs {n}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dest


def bare_setup(bundle: str, data: Path, batch_size: int, n_batches: int, vision: str = "frozen",
               lora_dropout: float | None = None):
    """A plain PyTorch training setup, as the build's LoRA stages train: the bundle with its
    adapter continued (or a new one as `vlm-chat train` adds it), the projector and the
    chosen part of the vision tower trainable, AdamW, and `n_batches` batches of the data
    file's rows in file order (wrapping round). `lora_dropout` replaces the adapter's
    dropout as `--lora-dropout` does. Returns (model, batches, optimizer)."""
    import torch

    from adapters.lora import LoraSettings
    from training.data import ConversationDataset, check_samples, collate
    from training.trainable import TrainablePlan, apply_plan
    from vlm_chat.model import VisionLanguageModel

    torch.manual_seed(0)
    model, processor = VisionLanguageModel.from_pretrained(bundle, device="cpu", quantization="none")
    samples, problems = check_samples([str(data)], processor, model.max_context)
    if problems:
        raise SystemExit(f"{data}: {len(problems)} rows with problems; run `vlm-chat data check` on it")
    lora = LoraSettings() if lora_dropout is None else LoraSettings(dropout=lora_dropout)
    apply_plan(model, TrainablePlan(vision, "full", "lora"), lora, adapter_dropout=lora_dropout)
    model.train()
    dataset = ConversationDataset(samples, processor, model.max_context)
    pad = processor.tokenizer.pad_token_id or 0
    batches = [collate([dataset[(k * batch_size + i) % len(dataset)] for i in range(batch_size)], pad_id=pad)
               for k in range(n_batches)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    return model, batches, optimizer


def bare_step(model, optimizer, batch, *, loss_only: bool = False, bf16: bool = False) -> None:
    """Forward (the full loss, or with `loss_only` the answer-only loss the trainer uses),
    backward, AdamW step."""
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch, loss_only=loss_only).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def bare_loop(bundle: str, data: Path, steps: int, batch_size: int, vision: str = "frozen") -> float:
    model, batches, optimizer = bare_setup(bundle, data, batch_size, steps, vision)
    for batch in batches[:WARMUP]:
        bare_step(model, optimizer, batch)
    start = time.perf_counter()
    for batch in batches[WARMUP:]:
        bare_step(model, optimizer, batch)
    return (steps - WARMUP) * batch_size / (time.perf_counter() - start)


# The CLI with the trainer's heap trim after each step (`trim_heap_when_large`) replaced:
# never, or on every step (as the trainer did on 2026-12-02).
TRIM_LAUNCH = ("import sys, training.trainer as t, vlm_chat.devices as d; t.trim_heap_when_large = {}; "
               "from cli.main import main; sys.exit(main())")
TRIMS = {"when large": None, "never": "lambda: False", "each step": "lambda: d.trim_heap()"}


def launch_env(preload: str | None) -> dict[str, str]:
    """The environment of a timed run: `preload`'s malloc, or glibc's with the training
    commands' own relaunch under tcmalloc turned off."""
    return {**os.environ, "LD_PRELOAD": preload} if preload else {**os.environ, "VLM_CHAT_ALLOCATOR": "system"}


def ours(bundle: str, data: Path, steps: int, batch_size: int, out: Path, precision: str = "no",
         vision: str = "frozen", trim: str = "when large", preload: str | None = None,
         lora_dropout: float | None = None, top_layers: int = 0) -> float:
    """samples/s of `vlm-chat train --stage instruct`; `preload` runs it on another malloc
    (LD_PRELOAD of jemalloc or tcmalloc), else glibc's; `lora_dropout` is passed as
    --lora-dropout (else the adapter's own, or 0.05 for a new one). With `top_layers` only
    the LoRA of the LLM's last N layers trains (tower and projector frozen), on inputs cached
    before the first step: the time that took is printed, and is not in samples/s."""
    launch = ["-c", TRIM_LAUNCH.format(TRIMS[trim])] if TRIMS[trim] else ["-m", "cli"]
    env = launch_env(preload)
    cmd = [sys.executable, *launch, "train", "--stage", "instruct", "--model", bundle, "--data", str(data),
           "--out", str(out), "--max-steps", str(steps), "--batch-size", str(batch_size), "--log-every", "1",
           "--val-fraction", "0", "--save-every", "0", "--mixed-precision", precision,
           "--vision", "frozen" if top_layers else vision, "--in-order",
           *(["--lora-dropout", str(lora_dropout)] if lora_dropout is not None else []),
           *(["--top-layers", str(top_layers), "--projector", "frozen"] if top_layers else [])]
    done = subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, env=env, text=True)
    if top_layers:
        cached = re.search(r"top layers: .*? cached in (\d+) s", done.stdout)
        print(f"(top {top_layers} layers: caching the inputs of {steps * batch_size} rows took "
              f"{cached.group(1) if cached else '?'} s before the first step)")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "samples_per_s" in r and r["step"] > WARMUP]
    # Each record covers one step of batch_size samples: the mean of per-step times.
    seconds = sum(batch_size / r["samples_per_s"] for r in timed)
    return len(timed) * batch_size / seconds


def mix_variants(trim_above: float) -> dict[str, dict]:
    """The runs of ours timed against the baseline (fp32, glibc's malloc, no trim) with
    --data: ours' keyword arguments by name. Allocators only where installed."""
    variants = {"trim after each step": {"trim": "each step"},
                f"trim above {trim_above:.0%} of memory": {}}  # the trainer's own way
    allocators = {name: lib for name in ("jemalloc", "tcmalloc_minimal") if (lib := ctypes.util.find_library(name))}
    variants.update({name: {"trim": "never", "preload": lib} for name, lib in allocators.items()})
    variants["bf16"] = {"precision": "bf16", "trim": "never"}
    variants.update({f"bf16 + {name}": {"precision": "bf16", "trim": "never", "preload": lib}
                     for name, lib in allocators.items()})
    # LoRA dropout draws a random mask in front of each of the 210 LoRA layers every step,
    # which on a CPU cost as much as bf16 saved; without it bf16's AMX matmuls show.
    variants["no LoRA dropout"] = {"trim": "never", "lora_dropout": 0.0}
    variants.update({f"no LoRA dropout + {name}": {"trim": "never", "preload": lib, "lora_dropout": 0.0}
                     for name, lib in allocators.items()})
    # Only the last 6 of SmolLM2's 30 decoder layers train, on cached inputs (--top-layers).
    variants["no LoRA dropout + top 6 layers"] = {"trim": "never", "lora_dropout": 0.0, "top_layers": 6}
    variants.update({f"no LoRA dropout + top 6 layers + {name}": {"trim": "never", "preload": lib, "lora_dropout": 0.0,
                                                                  "top_layers": 6} for name, lib in allocators.items()})
    variants["no LoRA dropout + bf16"] = {"precision": "bf16", "trim": "never", "lora_dropout": 0.0}
    variants.update({f"no LoRA dropout + bf16 + {name}": {"precision": "bf16", "trim": "never", "preload": lib,
                                                        "lora_dropout": 0.0} for name, lib in allocators.items()})
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=None, help="default: build one like bench_generate.py does")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--data", type=Path, help="a mix file to time (default: generated triples)")
    parser.add_argument("--vision", choices=("frozen", "full"), default="frozen", help="what trains in the vision tower")
    parser.add_argument("--only", help="with --data: the variants to time, comma-separated (default: all)")
    args = parser.parse_args()
    from bench.bench_generate import default_bundle
    from vlm_chat.devices import TRIM_ABOVE

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = args.bundle or default_bundle(tmp)
        if args.data:
            data = first_rows(args.data, args.steps * args.batch_size, tmp / "data" / "rows.jsonl")
            # The bare loop's full-vocabulary loss over a stage's long conversations does not
            # fit in 24 GB at batch 8, so the baseline is ours on glibc's malloc left alone,
            # in fp32, measured first and last.
            run = partial(ours, bundle, data, args.steps, args.batch_size, vision=args.vision)
            variants = mix_variants(TRIM_ABOVE)
            chosen = args.only.split(",") if args.only else list(variants)
            if unknown := [name for name in chosen if name not in variants]:
                parser.error(f"--only: no variant {', '.join(unknown)}; choose from: {', '.join(variants)}")
            first = run(tmp / "run", trim="never")
            speeds = {name: run(tmp / f"run-{i}", **variants[name]) for i, name in enumerate(chosen)}
            last = run(tmp / "run-again", trim="never")
            baseline, runs = "fp32, glibc", (first, last)
        else:
            data = make_triples(tmp / "data", 64)
            bare = bare_loop(bundle, data, args.steps, args.batch_size, args.vision)
            speeds = {"ours": ours(bundle, data, args.steps, args.batch_size, tmp / "run", vision=args.vision),
                      "ours, bf16": ours(bundle, data, args.steps, args.batch_size, tmp / "run-bf16", "bf16",
                                         args.vision),
                      "ours, bf16, no LoRA dropout": ours(bundle, data, args.steps, args.batch_size,
                                                          tmp / "run-bf16-nodrop", "bf16", args.vision,
                                                          lora_dropout=0.0)}
            bare_again = bare_loop(bundle, data, args.steps, args.batch_size, args.vision)  # bracket ours against drift
            baseline, runs = "bare", (bare, bare_again)
    base = sum(runs) / 2
    print(f"LoRA instruct stage, vision {args.vision}, batch {args.batch_size}, {args.steps - WARMUP} timed steps, "
          f"data: {args.data or 'generated triples'}")
    width = max(26, *map(len, speeds))
    print(f"{'loop':<{width}} {'samples/s':>10} {'vs base':>8}")
    print(f"{baseline:<{width}} {base:>10.2f} {1.0:>8.3f}   (runs: {runs[0]:.2f}, {runs[1]:.2f})")
    for name, speed in speeds.items():
        print(f"{name:<{width}} {speed:>10.2f} {speed / base:>8.3f}")


if __name__ == "__main__":
    main()
