"""Copy a bundle with its LLM LoRA widened to a higher rank, computing exactly what it did.

peft adds scale * B @ A to each target weight, with scale = alpha / r (alpha / sqrt(r)
with rsLoRA). The widened adapter keeps the old rows of A and columns of B, draws the new
rows of A the way peft draws A (Kaiming-uniform, a = sqrt(5)), sets the new columns of B
to zero and raises alpha so the scale stays. So B' @ A' = B @ A and the bundle's answers
do not change; training it from there (`vlm-chat train --model OUT ...`, which keeps
training a bundle's adapter) has the new directions free. It asks whether a pass is
short of LoRA capacity without starting that pass from an untrained adapter.

    python bench/widen_lora.py --bundle runs/next/census --rank 32 --out runs/census32
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.soup import NOT_COPIED  # noqa: E402  # checkpoints and the records of one bundle's run

ADAPTER_CONFIG = "adapter/adapter_config.json"
ADAPTER_WEIGHTS = "adapter/adapter_model.safetensors"


def widened_config(config: dict, rank: int, where: Path) -> dict:
    """The adapter config at `rank`, alpha raised to keep peft's scale; refuses what one rank cannot widen."""
    old = config.get("r")
    if not isinstance(old, int) or "lora_alpha" not in config:
        raise SystemExit(f"{where}: not a LoRA adapter config (no integer r and lora_alpha)")
    if rank <= old:
        raise SystemExit(f"--rank {rank}: the adapter already has rank {old}; give a larger one")
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            raise SystemExit(f"{where}: {field} gives some modules their own rank or alpha; only one rank widens")
    if config.get("use_dora"):
        raise SystemExit(f"{where}: a DoRA adapter (its magnitudes depend on B @ A) is not widened by this")
    growth = math.sqrt(rank / old) if config.get("use_rslora") else rank / old
    return {**config, "r": rank, "lora_alpha": config["lora_alpha"] * growth}


def widen(bundle: Path, rank: int, out: Path, seed: int = 0) -> tuple[int, int]:
    """Write `bundle` with its adapter at `rank` into `out`; returns (old rank, tensors widened)."""
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (bundle / name).is_file():
            raise SystemExit(f"{bundle / name}: missing; give a bundle with an LLM LoRA adapter")
    if out.exists():
        raise SystemExit(f"{out}: already exists; give a new --out")
    config = json.loads((bundle / ADAPTER_CONFIG).read_text())
    new_config = widened_config(config, rank, bundle / ADAPTER_CONFIG)
    old = config["r"]
    generator = torch.Generator().manual_seed(seed)
    weights, widened = {}, 0
    for key, tensor in load_file(str(bundle / ADAPTER_WEIGHTS)).items():
        if "lora_A" in key or "lora_B" in key:
            rows = tensor.shape[0] if "lora_A" in key else tensor.shape[1]
            if tensor.dim() != 2 or rows != old:
                raise SystemExit(f"{bundle / ADAPTER_WEIGHTS}: {key} has shape {tuple(tensor.shape)}, not rank {old}")
        if "lora_A" in key:
            bound = 1 / math.sqrt(tensor.shape[1])  # kaiming_uniform_(a=sqrt(5)), as peft initialises A
            extra = torch.empty(rank - old, tensor.shape[1]).uniform_(-bound, bound, generator=generator)
            tensor, widened = torch.cat([tensor, extra.to(tensor.dtype)], 0), widened + 1
        elif "lora_B" in key:
            tensor = torch.cat([tensor, torch.zeros(tensor.shape[0], rank - old, dtype=tensor.dtype)], 1)
            widened += 1
        weights[key] = tensor.contiguous()
    if not widened:
        raise SystemExit(f"{bundle / ADAPTER_WEIGHTS}: no lora_A or lora_B tensors to widen")
    shutil.copytree(bundle, out, ignore=shutil.ignore_patterns(*NOT_COPIED))
    (out / ADAPTER_CONFIG).write_text(json.dumps(new_config, indent=2))
    save_file(weights, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return old, widened


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0, help="for the new rows of A")
    args = parser.parse_args(argv)
    old, widened = widen(args.bundle, args.rank, args.out, args.seed)
    print(f"{args.out}: {widened} LoRA tensors widened from rank {old} to {args.rank}, same outputs")


if __name__ == "__main__":
    main()
