"""Where a training step's CPU time goes: torch.profiler over LoRA instruct steps, top ops.

    python bench/profile_step.py --bundle vlm_chat/assets/default --data runs/next/naming.jsonl
    python bench/profile_step.py ... --lora-dropout 0 --bf16

Trains the bundle as the build's LoRA stages do (its adapter, or a new one as `vlm-chat
train` adds it; the projector; the vision tower; AdamW) on the data file's first rows in file order, batch by batch: two
warm-up steps, two timed steps, then two steps under the profiler, whose ops are listed
by their own CPU time. `--lora-dropout P` replaces the adapter's dropout (0: none), as
`vlm-chat train --lora-dropout` does; `--bf16` runs the forward pass in bf16 autocast;
`--compile` compiles each of the LLM's decoder layers with `torch.compile(dynamic=True)`
(regional compilation: one graph, reused by every layer, compiled in the warm-up steps).
Under the table: the rate of the step's matrix products (the profiler's FLOP count of
`aten::mm`, `addmm`, `bmm` over their own CPU time) next to the rate one large fp32
product reaches on this CPU, timed in the same run: a step whose products run near that
ceiling is bound by arithmetic, and only fewer FLOPs or faster arithmetic (bf16 hardware)
make it faster.
On 2026-12-07 (Intel Xeon with AMX, naming's rows) this found the LoRA dropout masks
(`aten::bernoulli_`) at 18 % of a step (README, "Speed on this 2-core CPU").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STEPS = 6  # two warm-up, two timed, two profiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="a bundle (its adapter keeps training; without one, a new one)")
    parser.add_argument("--data", type=Path, required=True, help="a mix file (its first rows are used)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vision", choices=("frozen", "full"), default="full")
    parser.add_argument("--lora-dropout", type=float, help="replace the adapter's dropout (default: keep it)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile each LLM decoder layer")
    parser.add_argument("--rows", type=int, default=30, help="ops to list (default 30)")
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from bench.bench_train import bare_setup, bare_step, first_rows

    with tempfile.TemporaryDirectory() as tmp:  # only the rows it trains on are checked and tokenized
        rows = first_rows(args.data, STEPS * args.batch_size, Path(tmp) / "rows.jsonl",
                          needed_by=f"{STEPS} steps of {args.batch_size}")
        model, batches, optimizer = bare_setup(args.bundle, rows, args.batch_size, STEPS, args.vision,
                                               args.lora_dropout)
    if args.compile:
        compiled = compile_decoder_layers(model)
        print(f"torch.compile: {compiled} decoder layers", flush=True)
    step = partial(bare_step, model, optimizer, loss_only=True, bf16=args.bf16)

    for batch in batches[:2]:
        step(batch)
    start = time.perf_counter()
    for batch in batches[2:4]:
        step(batch)
    seconds = (time.perf_counter() - start) / 2
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for batch in batches[4:]:
            step(batch)
    shapes = ", ".join(f"{tuple(b['input_ids'].shape)}" for b in batches[2:4])
    print(f"{args.bundle}, batch {args.batch_size} ({shapes} tokens), vision {args.vision}, "
          f"LoRA dropout {'kept' if args.lora_dropout is None else args.lora_dropout}, {'bf16' if args.bf16 else 'fp32'}"
          f"{', decoder layers compiled' if args.compile else ''}: {seconds:.2f} s a step (mean of 2)")
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    flops, matmul_seconds = matmul_work(events)
    total_seconds = sum(e.self_cpu_time_total for e in events) / 1e6
    ceiling = matmul_ceiling()
    print(f"matrix products: {flops / 1e9:.0f} GFLOP in {matmul_seconds:.2f} s of {total_seconds:.2f} s profiled "
          f"({matmul_seconds / total_seconds:.0%}), {flops / 1e9 / matmul_seconds:.0f} GFLOP/s; "
          f"one {CEILING_SIZE}^3 fp32 product here: {ceiling:.0f} GFLOP/s "
          f"({flops / 1e9 / matmul_seconds / ceiling:.0%} of it)")


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")
CEILING_SIZE = 2048


def matmul_work(events) -> tuple[float, float]:
    """(FLOPs, seconds of own CPU time) of the matrix products in a profiler's key averages."""
    chosen = [e for e in events if e.key in MATMULS]
    return sum(e.flops for e in chosen), sum(e.self_cpu_time_total for e in chosen) / 1e6


def matmul_ceiling(size: int = CEILING_SIZE, repeats: int = 5) -> float:
    """GFLOP/s of one size x size x size fp32 product on this CPU (the best of `repeats`)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compile_decoder_layers(model) -> int:
    """torch.compile each decoder layer of the model's LLM in place; returns how many."""
    layers = [m for m in model.language_model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


if __name__ == "__main__":
    main()
