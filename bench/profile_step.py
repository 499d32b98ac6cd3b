"""Where a training step's CPU time goes: torch.profiler over LoRA instruct steps, top ops.

    python bench/profile_step.py --bundle vlm_chat/assets/default --data runs/next/naming.jsonl
    python bench/profile_step.py ... --lora-dropout 0 --bf16

Trains the bundle as the build's LoRA stages do (its adapter, or a new one as `vlm-chat
train` adds it; the projector; the vision tower; AdamW) on the data file's first rows in file order, batch by batch: two
warm-up steps, two timed steps, then two steps under the profiler, whose ops are listed
by their own CPU time. `--lora-dropout P` replaces the adapter's dropout (0: none), as
`vlm-chat train --lora-dropout` does; `--bf16` runs the forward pass in bf16 autocast.
On 2026-12-07 (Intel Xeon with AMX, naming's rows) this found the LoRA dropout masks
(`aten::bernoulli_`) at 18 % of a step (README, "Speed on this 2-core CPU").
"""

from __future__ import annotations

import argparse
import sys
import time
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
    parser.add_argument("--rows", type=int, default=30, help="ops to list (default 30)")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from adapters.lora import LoraSettings
    from training.data import ConversationDataset, check_samples, collate
    from training.trainable import TrainablePlan, apply_plan
    from vlm_chat.model import VisionLanguageModel

    model, processor = VisionLanguageModel.from_pretrained(args.bundle, device="cpu", quantization="none")
    samples, problems = check_samples([str(args.data)], processor, model.max_context)
    if problems:
        raise SystemExit(f"{args.data}: {len(problems)} rows with problems; run `vlm-chat data check` on it")
    if len(samples) < STEPS * args.batch_size:
        raise SystemExit(f"{args.data} has {len(samples)} usable rows; {STEPS} steps of {args.batch_size} need more")
    torch.manual_seed(0)
    lora = LoraSettings() if args.lora_dropout is None else LoraSettings(dropout=args.lora_dropout)
    apply_plan(model, TrainablePlan(args.vision, "full", "lora"), lora, adapter_dropout=args.lora_dropout)
    model.train()
    dataset = ConversationDataset(samples, processor, model.max_context)
    pad = processor.tokenizer.pad_token_id or 0
    batches = [collate([dataset[k * args.batch_size + i] for i in range(args.batch_size)], pad_id=pad) for k in range(STEPS)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(batch) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(**batch, loss_only=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for batch in batches[:2]:
        step(batch)
    start = time.perf_counter()
    for batch in batches[2:4]:
        step(batch)
    seconds = (time.perf_counter() - start) / 2
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[4:]:
            step(batch)
    shapes = ", ".join(f"{tuple(b['input_ids'].shape)}" for b in batches[2:4])
    print(f"{args.bundle}, batch {args.batch_size} ({shapes} tokens), vision {args.vision}, "
          f"LoRA dropout {'kept' if args.lora_dropout is None else args.lora_dropout}, {'bf16' if args.bf16 else 'fp32'}: "
          f"{seconds:.2f} s a step (mean of 2)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
