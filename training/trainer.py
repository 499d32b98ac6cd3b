"""The one training loop every stage shares (CLIP pretraining, projector alignment, LoRA tuning).

A stage hands over a model, a `loss_fn(model, batch) -> scalar`, optimizer parameter
groups (per-module learning rates, nanoVLM style), datasets + collate fn and a
`TrainConfig`. Built on `accelerate`, so `accelerate launch` runs the same code on
several GPUs and a single CPU just runs it.

Checkpoints (no pickle anywhere) live in `OUT/checkpoints/step-XXXXXXXX/`:
    trainable.safetensors   parameters with requires_grad (frozen towers are not copied)
    optimizer.safetensors   optimizer state tensors, keys "state.<param index>.<name>"
    optimizer.json          param_groups + non-tensor state fields
    scheduler.json          LR scheduler state_dict
    rng.safetensors         torch CPU / CUDA generator states (uint8) + the data loader generator
    rng.json                python `random` and numpy states
    trainer_state.json      step, epoch, batches consumed in the epoch, the config
A checkpoint is built in a temp dir beside it, fsynced, then renamed into place, so any
`step-*` dir that exists is complete; a kill at any moment leaves the previous one intact.

Data order is a permutation seeded by (seed, epoch); resume skips the batches already
consumed in the current epoch, so `N/2 steps + resume + N/2 steps == N steps`.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from vlm_chat.devices import cpu_has_native_bf16, machine, trim_heap_when_large
from vlm_chat.errors import ConfigError, UserFacingError

MIXED_PRECISION = ("no", "bf16", "fp16", "auto")  # auto: bf16 where the hardware does it natively, else fp32
PRECISION_LABELS = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}  # what a run computes in
SCHEDULES = ("cosine", "constant")
CHECKPOINT_PREFIX = "step-"


@dataclass
class TrainConfig:
    """Everything the loop needs; stages nest this in their own config."""

    output_dir: str
    epochs: int = 1
    max_steps: int = 0  # optimizer steps; > 0 overrides epochs
    batch_size: int = 8  # per device, per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # default for groups without their own "lr"
    weight_decay: float = 0.0  # default for groups without their own "weight_decay"
    warmup: float = 0.0  # < 1: fraction of total steps; >= 1: number of steps
    schedule: str = "cosine"  # "cosine" decays to min_lr_ratio * lr; "constant"
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    log_every: int = 10
    eval_every: int = 0  # steps; 0 = only at the end
    eval_max_batches: int = 0  # 0 = the whole eval set
    save_every: int = 0  # steps; 0 = only at the end
    save_every_minutes: float = 0.0  # also save when this much wall time passed; 0 = off
    keep_last: int = 2
    seed: int = 0
    in_order: bool = False  # batches in the data's own order (a curriculum), not a seeded shuffle
    group_by_length: bool = False  # shuffled batches of similar-length samples (less padding); needs dataset.lengths()
    mixed_precision: str = "no"
    num_workers: int = 0
    resume: str = ""  # "" = fresh run, "latest" = newest checkpoint in output_dir, or a checkpoint dir

    def validate(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"train.mixed_precision={self.mixed_precision!r}; choose one of {MIXED_PRECISION}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule={self.schedule!r}; choose one of {SCHEDULES}")
        for name in ("epochs", "batch_size", "grad_accum", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 1")
        if self.warmup < 0:
            raise ConfigError(f"train.warmup={self.warmup} must be >= 0 (a fraction < 1 or a step count)")
        if self.in_order and self.group_by_length:
            raise ConfigError("train.in_order and train.group_by_length both set the batch order; choose one")


def train_config_from(settings: dict) -> tuple[TrainConfig, dict]:
    """Split flat settings (CLI flags / YAML keys) into a TrainConfig and the stage's own keys.

    `out` names the output dir; every other TrainConfig field keeps its name.
    """
    from dataclasses import fields

    rest = dict(settings)
    if not rest.get("out"):
        raise ConfigError("no output dir: pass --out DIR (or 'out:' in the --config file)")
    values = {"output_dir": str(rest.pop("out"))}
    for f in fields(TrainConfig):
        if f.name in rest:
            values[f.name] = rest.pop(f.name)
    config = TrainConfig(**values)
    config.validate()
    return config, rest


@dataclass
class TrainResult:
    step: int
    train_loss: float
    eval_loss: float | None
    checkpoint: str


class EpochPermutation(Sampler[int]):
    """Indices in an order fixed by (seed, epoch): the same on every process and every resume."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class LengthGroupedPermutation(EpochPermutation):
    """A seeded permutation whose batches hold samples of similar length, so padding each
    batch to its longest sample wastes little (the Hugging Face Trainer's `group_by_length`).
    The shuffled indices are cut into mega-batches of `megabatch` batches, each is sorted by
    length and cut into batches, and the full batches are shuffled again, so no length
    comes at a fixed point of the epoch; a short last batch stays last. Fixed by
    (seed, epoch) like its parent, so a resume skips exactly the batches already seen."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, megabatch: int = 50):
        super().__init__(len(lengths), seed)
        self.lengths, self.batch_size, self.megabatch = list(lengths), batch_size, megabatch

    def __iter__(self) -> Iterator[int]:
        order = list(super().__iter__())
        size = self.batch_size * self.megabatch
        batches: list[list[int]] = []
        for start in range(0, len(order), size):
            chunk = sorted(order[start:start + size], key=lambda i: -self.lengths[i])
            batches += [chunk[s:s + self.batch_size] for s in range(0, len(chunk), self.batch_size)]
        # Mega-batches hold whole batches, so only the epoch's very last batch can be short.
        short = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 7)
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return iter([i for batch in shuffled + short for i in batch])


def param_groups(module: nn.Module, lr: float | None = None, weight_decay: float = 0.0) -> list[dict]:
    """Trainable params of `module` as two groups: matrices get weight decay, biases/norms/scalars don't."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    extra = {} if lr is None else {"lr": lr}
    groups = [{"params": decay, "weight_decay": weight_decay, **extra}, {"params": no_decay, "weight_decay": 0.0, **extra}]
    return [group for group in groups if group["params"]]


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier on each group's base lr: linear warmup, then cosine (or constant)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- checkpoints (no pickle)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1))


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for path in [*directory.rglob("*"), directory]:
        _fsync_path(path)


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, fields in meta["scalars"].items():
        state.setdefault(int(index), {}).update(fields)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state(data_generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state(), "data_generator": data_generator.get_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": [version, list(mt_state), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict, data_generator: torch.Generator) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    data_generator.set_state(tensors["data_generator"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    version, mt_state, gauss = meta["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only parameters with requires_grad: frozen towers are not copied on every save."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp dirs of interrupted writes are ignored)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def write_checkpoint(root: Path, step: int, files: dict[str, Callable[[Path], None]], keep_last: int) -> Path:
    """Atomically create root/step-XXXXXXXX from `files` ({name: writer(path)}); prune old ones."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a kill in the middle of an earlier write
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    if final.exists():  # this step is already saved (periodic save, then stop/end at the same step): same state
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; checkpoints are ordinary dirs
        for name, writer in files.items():
            writer(tmp / name)
        _fsync_tree(tmp)
        os.replace(tmp, final)  # atomic: readers see no dir or the complete one
        _fsync_path(root)  # make the rename itself durable
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> dict:
    """Load every file of a checkpoint dir (safetensors + JSON only)."""
    from safetensors.torch import load_file

    missing = [n for n in ("trainable.safetensors", "trainer_state.json") if not (path / n).exists()]
    if missing:
        raise UserFacingError(f"checkpoint {path} lacks {missing}; point --resume at a complete step-* dir")
    return {
        "trainable": load_file(path / "trainable.safetensors"),
        "optimizer": _unflatten_optimizer(
            load_file(path / "optimizer.safetensors"), json.loads((path / "optimizer.json").read_text())
        ),
        "scheduler": json.loads((path / "scheduler.json").read_text()),
        "rng": (load_file(path / "rng.safetensors"), json.loads((path / "rng.json").read_text())),
        "trainer": json.loads((path / "trainer_state.json").read_text()),
    }


# ---------------------------------------------------------------- metrics


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    """Train loss (per log step) and eval loss against optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


class _StopRequest:
    """Turn Ctrl-C / SIGTERM into a flag the loop checks after each optimizer step (then it saves and exits).

    Deferring keeps the saved state consistent (never half an optimizer step); a second
    Ctrl-C raises KeyboardInterrupt at once without saving.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then exiting "
              "(press Ctrl-C again to quit without saving)", flush=True)

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _batch_len(batch: Any) -> int:
    """Samples in a micro-batch: leading dim of the first tensor found."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    values = batch.values() if isinstance(batch, dict) else batch
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise UserFacingError("collate_fn must return a tensor, or a dict/tuple holding at least one tensor")


def native_bf16() -> bool:
    """bf16 autocast pays here: a GPU that supports it, or a CPU with AVX512-BF16 or AMX."""
    return torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_has_native_bf16()


def _autocast_precision(config: TrainConfig) -> str:
    """The asked mixed precision, except bf16 on a CPU that would only emulate it: fp32 there;
    "auto" is bf16 where the hardware has it natively, else fp32."""
    if config.mixed_precision == "auto":
        return "bf16" if native_bf16() else "no"
    if config.mixed_precision == "bf16" and not torch.cuda.is_available() and not cpu_has_native_bf16():
        warnings.warn(
            "mixed_precision=bf16 asked for, but this CPU has no native bf16 (neither AVX512-BF16 nor AMX), "
            "so bf16 autocast would be emulated and far slower than fp32 (a 15 s step took over 8 minutes "
            "on an AVX2-only CPU); training in fp32 instead", stacklevel=3,
        )
        return "no"
    return config.mixed_precision


def _resolve_resume(config: TrainConfig) -> Path | None:
    existing = list_checkpoints(config.output_dir)
    if not config.resume:
        if existing:
            raise UserFacingError(
                f"{config.output_dir} already holds checkpoints (latest {existing[-1].name}); "
                "pass --resume to continue it or choose another --out"
            )
        return None
    if config.resume == "latest":
        if not existing:
            print(f"resume: no checkpoint in {config.output_dir}/checkpoints yet, starting from scratch")
            return None
        return existing[-1]
    path = Path(config.resume)
    if not path.is_dir():
        raise UserFacingError(f"--resume {path}: not a directory; give a step-* checkpoint dir or 'latest'")
    return path


def _check_groups(model: nn.Module, groups: Sequence[dict]) -> list[dict]:
    owned = {id(p) for p in model.parameters()}
    for i, group in enumerate(groups):
        for p in group["params"]:
            if id(p) not in owned:
                raise ConfigError(f"param group {i} holds a parameter that is not part of the model")
            if not p.requires_grad:
                raise ConfigError(f"param group {i} holds a frozen parameter (requires_grad=False); leave it out")
    if not any(group["params"] for group in groups):
        raise ConfigError("no trainable parameters: every param group is empty")
    return [dict(group, params=list(group["params"])) for group in groups]


# ---------------------------------------------------------------- the loop


def _checkpoint_files(model, optimizer, scheduler, rng: tuple[dict, dict], trainer_state: dict) -> dict[str, Callable[[Path], None]]:
    """{file name: writer(path)} for write_checkpoint: safetensors for tensors, JSON for the rest."""
    from safetensors.torch import save_file

    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    rng_tensors, rng_meta = rng
    return {
        "trainable.safetensors": lambda p: save_file(trainable_state_dict(model), p),
        "optimizer.safetensors": lambda p: save_file(opt_tensors, p),
        "optimizer.json": lambda p: _write_json(p, opt_meta),
        "scheduler.json": lambda p: _write_json(p, scheduler.state_dict()),
        "rng.safetensors": lambda p: save_file(rng_tensors, p),
        "rng.json": lambda p: _write_json(p, rng_meta),
        "trainer_state.json": lambda p: _write_json(p, trainer_state),
    }


def _restore(path: Path, config: TrainConfig, model, optimizer, scheduler, data_generator) -> tuple[int, int, int]:
    """Load a checkpoint into model/optimizer/scheduler/RNGs; returns (step, epoch, batches consumed in epoch)."""
    saved = read_checkpoint(path)
    for key in ("batch_size", "grad_accum", "seed"):
        if saved["trainer"]["config"][key] != getattr(config, key):
            raise ConfigError(
                f"resume from {path}: {key}={getattr(config, key)} but the checkpoint used "
                f"{saved['trainer']['config'][key]}; the same value is needed to continue the same data order"
            )
    result = model.load_state_dict(saved["trainable"], strict=False)
    missing = {n for n, p in model.named_parameters() if p.requires_grad} - saved["trainable"].keys()
    if result.unexpected_keys or missing:
        raise UserFacingError(
            f"checkpoint {path} does not match the model: unexpected {result.unexpected_keys[:5]}, "
            f"missing {sorted(missing)[:5]}; resume with the same model setup"
        )
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    _set_rng_state(*saved["rng"], data_generator)
    return tuple(saved["trainer"][k] for k in ("step", "epoch", "batches_in_epoch"))


def _evaluate(accelerator, model, loss_fn, eval_loader, max_batches: int) -> float | None:
    """Mean loss per sample over the eval loader (all processes), without moving the training RNG."""
    if eval_loader is None:
        return None
    model.eval()
    totals = torch.zeros(2, device=accelerator.device)  # (sum of loss * n, n)
    with torch.no_grad(), torch.random.fork_rng():
        for i, batch in enumerate(eval_loader):
            if max_batches and i >= max_batches:
                break
            with accelerator.autocast():
                loss = loss_fn(model, batch)
            n = _batch_len(batch)
            totals += torch.stack([loss.detach().float() * n, torch.tensor(float(n), device=totals.device)])
    model.train()
    totals = accelerator.reduce(totals, "sum")
    return (totals[0] / totals[1].clamp(min=1)).item()


class _MetricsLog:
    """metrics.jsonl (one JSON object per log step / eval) + loss.png, written by the main process."""

    def __init__(self, out: Path, resumed_step: int, enabled: bool):
        self.path, self.png, self.enabled = out / "metrics.jsonl", out / "loss.png", enabled
        if enabled:  # keep records up to the resumed step; later ones were written after the last save
            kept = []
            if resumed_step > 0 and self.path.exists():
                kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resumed_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        if self.enabled:
            plot_metrics(self.path, self.png)


def train(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    groups: Sequence[dict],
    train_dataset: Dataset,
    collate_fn: Callable[[list], Any] | None,
    config: TrainConfig,
    eval_dataset: Dataset | None = None,
) -> TrainResult:
    """Train `model` by minimising `loss_fn(model, batch)`; checkpoints and metrics go to config.output_dir."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    config.validate()
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("mixed_precision=fp16 needs a CUDA GPU; use 'bf16' or 'no' on this device")
    if config.mixed_precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bf16; use mixed_precision 'fp16' or 'no'")
    # Each call is a run of its own: an earlier run in this process must not pin its mixed
    # precision on this one (`vlm-chat default build` runs instruct in fp32, then drill in bf16,
    # in one process; accelerate raised there). The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    precision = _autocast_precision(config)
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, mixed_precision=precision)
    accelerator.print(f"training on {machine()}, {PRECISION_LABELS[precision]}")
    set_seed(config.seed)  # python random, numpy, torch (all devices)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume_from = _resolve_resume(config)

    optimizer = torch.optim.AdamW(_check_groups(model, groups), lr=config.lr, weight_decay=config.weight_decay)
    data_generator = torch.Generator().manual_seed(config.seed)  # keeps loader internals off the global RNG
    if config.group_by_length:
        if not callable(getattr(train_dataset, "lengths", None)):
            raise ConfigError(f"group_by_length needs a dataset with a lengths() method; {type(train_dataset).__name__} has none")
        sampler = LengthGroupedPermutation(train_dataset.lengths(), config.batch_size, config.seed)
    else:
        sampler = EpochPermutation(len(train_dataset), config.seed, shuffle=not config.in_order)
    train_loader = DataLoader(
        train_dataset, batch_size=config.batch_size, sampler=sampler,
        collate_fn=collate_fn, num_workers=config.num_workers, generator=data_generator,
    )
    eval_loader = None
    if eval_dataset is not None:
        eval_loader = accelerator.prepare(DataLoader(eval_dataset, batch_size=config.batch_size, collate_fn=collate_fn))
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)

    batches_per_epoch = len(train_loader)  # per process, after sharding
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = config.max_steps if config.max_steps > 0 else config.epochs * steps_per_epoch
    warmup_steps = int(config.warmup * total_steps) if config.warmup < 1 else int(config.warmup)
    # Stepped by hand once per optimizer step (not prepared: accelerate would step it
    # num_processes times), so total_steps counts optimizer steps of one process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer.optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, config.schedule, config.min_lr_ratio)
    )
    step, epoch, batches_in_epoch = 0, 0, 0
    if resume_from is not None:
        step, epoch, batches_in_epoch = _restore(
            resume_from, config, accelerator.unwrap_model(model), optimizer, scheduler, data_generator
        )
        accelerator.print(f"resumed from {resume_from} at step {step} (epoch {epoch}, batch {batches_in_epoch})")
    metrics = _MetricsLog(out, step, accelerator.is_main_process)

    def save() -> Path:
        accelerator.wait_for_everyone()
        # A finished epoch is stored as the start of the next one, so resume never skips a whole loader.
        e, b = (epoch + 1, 0) if batches_in_epoch >= batches_per_epoch else (epoch, batches_in_epoch)
        path = out / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"
        if accelerator.is_main_process:
            trainer_state = {"step": step, "epoch": e, "batches_in_epoch": b, "total_steps": total_steps,
                             "num_processes": accelerator.num_processes, "config": asdict(config)}
            files = _checkpoint_files(accelerator.unwrap_model(model), optimizer, scheduler, rng_at_step, trainer_state)
            path = write_checkpoint(out / "checkpoints", step, files, config.keep_last)
            metrics.plot()
        accelerator.wait_for_everyone()
        return path

    model.train()
    rng_at_step = _rng_state(data_generator)  # RNG as of the last optimizer step: what a checkpoint stores
    window_loss, window_batches, window_samples, window_start = 0.0, 0, 0, time.perf_counter()
    last_loss, eval_loss, checkpoint, last_save_time = float("nan"), None, Path(), time.monotonic()
    on_cpu = accelerator.device.type == "cpu"
    progress = tqdm(total=total_steps, initial=step, disable=not accelerator.is_main_process, dynamic_ncols=True)
    with _StopRequest() as stop, progress:  # the bar is closed even when a step raises
        while step < total_steps:
            train_loader.set_epoch(epoch)
            loader = accelerator.skip_first_batches(train_loader, batches_in_epoch) if batches_in_epoch else train_loader
            for batch in loader:
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss = loss_fn(model, batch)  # scalar
                    accelerator.backward(loss)  # divides by grad_accum
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    optimizer.step()  # a no-op until the accumulation window is full
                    optimizer.zero_grad()
                batches_in_epoch += 1
                window_loss += loss.detach().float().item()
                window_batches += 1
                window_samples += _batch_len(batch) * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                step += 1
                scheduler.step()
                rng_at_step = _rng_state(data_generator)
                progress.update(1)
                if on_cpu:
                    trim_heap_when_large()  # batches of changing length fragment the C heap (vlm_chat/devices.py)

                if step % config.log_every == 0 or step == total_steps:
                    mean = torch.tensor(window_loss / window_batches, device=accelerator.device)
                    last_loss = accelerator.reduce(mean, "mean").item()
                    lr, speed = scheduler.get_last_lr()[0], window_samples / max(time.perf_counter() - window_start, 1e-9)
                    metrics.write({"step": step, "epoch": epoch, "loss": last_loss, "lr": lr, "samples_per_s": speed})
                    progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{speed:.1f}")
                    window_loss, window_batches, window_samples, window_start = 0.0, 0, 0, time.perf_counter()
                if config.eval_every and step % config.eval_every == 0 and step < total_steps:
                    eval_loss = _evaluate(accelerator, model, loss_fn, eval_loader, config.eval_max_batches)
                    if eval_loss is not None:
                        metrics.write({"step": step, "eval_loss": eval_loss})
                        progress.write(f"step {step}: eval loss {eval_loss:.4f}")
                timed_out = config.save_every_minutes and time.monotonic() - last_save_time > 60 * config.save_every_minutes
                if (config.save_every and step % config.save_every == 0) or timed_out or stop.requested:
                    checkpoint, last_save_time = save(), time.monotonic()
                if stop.requested:
                    progress.close()
                    accelerator.print(f"stopped at step {step}; checkpoint {checkpoint}; continue with --resume")
                    raise KeyboardInterrupt
                if step >= total_steps:
                    break
            else:
                epoch, batches_in_epoch = epoch + 1, 0
        progress.close()
        eval_loss = _evaluate(accelerator, model, loss_fn, eval_loader, config.eval_max_batches)
        if eval_loss is not None:
            metrics.write({"step": step, "eval_loss": eval_loss})
            accelerator.print(f"final eval loss {eval_loss:.4f}")
        checkpoint = save()
    return TrainResult(step=step, train_loss=last_loss, eval_loss=eval_loss, checkpoint=str(checkpoint))
