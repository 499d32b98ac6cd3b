"""The shared training loop: learning, exact resume, atomic checkpoints, metrics."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from training.trainer import (
    ConfigError, LengthGroupedPermutation, TrainConfig, list_checkpoints, param_groups, read_checkpoint, train, write_checkpoint,
)


def make_data(n: int = 40) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)  # (N, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1  # (N, 1)
    return TensorDataset(x, y)


def make_model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(4, 1)


def noisy_mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    x = x + 0.05 * torch.randn_like(x)  # augmentation on the global RNG: resume must restore it
    return nn.functional.mse_loss(model(x), y)


def config(tmp_path, name: str, **overrides) -> TrainConfig:
    base = dict(output_dir=str(tmp_path / name), max_steps=12, batch_size=4, grad_accum=2, lr=0.05,
                warmup=2, log_every=1, seed=3)
    return TrainConfig(**{**base, **overrides})


def run(cfg: TrainConfig, loss_fn=noisy_mse, model: nn.Module | None = None) -> nn.Module:
    model = model or make_model()
    train(model, loss_fn, param_groups(model, weight_decay=0.01), make_data(), None, cfg, eval_dataset=make_data(8))
    return model


def test_loss_falls(tmp_path):
    cfg = config(tmp_path, "fall", max_steps=60, lr=0.3, eval_every=10)
    run(cfg)
    rows = [json.loads(line) for line in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.2 * losses[0]
    assert any("eval_loss" in r for r in rows)
    assert os.path.getsize(os.path.join(cfg.output_dir, "loss.png")) > 1000


def failing_after(batches: int, error: Exception | None):
    """noisy_mse that fails (or sends SIGTERM to itself) on micro-batch number `batches`."""
    seen = {"n": 0}

    def loss_fn(model, batch):
        seen["n"] += 1
        if seen["n"] == batches:
            if error is None:
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise error
        return noisy_mse(model, batch)

    return loss_fn


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_sigterm_then_resume_matches_straight_run(tmp_path, grad_accum):
    straight = run(config(tmp_path, "straight", grad_accum=grad_accum))
    cfg = config(tmp_path, "killed", grad_accum=grad_accum)
    with pytest.raises(KeyboardInterrupt):  # SIGTERM mid-accumulation: finish the step, save, exit
        run(cfg, failing_after(5 * grad_accum + 1, None))
    assert read_checkpoint(list_checkpoints(cfg.output_dir)[-1])["trainer"]["step"] == 6
    cfg.resume = "latest"
    resumed = run(cfg)
    torch.testing.assert_close(resumed.state_dict(), straight.state_dict(), rtol=1e-6, atol=1e-7)


def test_crash_then_resume_from_periodic_checkpoint(tmp_path):
    straight = run(config(tmp_path, "straight", max_steps=15))  # 40 samples / 4 = 10 batches: crosses epochs
    cfg = config(tmp_path, "crashed", max_steps=15, save_every=4, keep_last=2)
    with pytest.raises(RuntimeError, match="power cut"):
        run(cfg, failing_after(2 * 10 + 1, RuntimeError("power cut")))  # dies in step 11, after saving step 8
    assert [p.name for p in list_checkpoints(cfg.output_dir)] == ["step-00000004", "step-00000008"]
    cfg.resume = "latest"
    resumed = run(cfg)
    torch.testing.assert_close(resumed.state_dict(), straight.state_dict(), rtol=1e-6, atol=1e-7)
    metrics_steps = [json.loads(line)["step"] for line in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    assert metrics_steps == sorted(metrics_steps)  # records after the resumed step were dropped, not duplicated


def test_failed_checkpoint_write_keeps_previous_latest(tmp_path):
    root = tmp_path / "checkpoints"
    ok = {"a.json": lambda p: p.write_text("1"), "b.json": lambda p: p.write_text("2")}
    write_checkpoint(root, 1, ok, keep_last=3)

    def explode(path):
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(root, 2, {"a.json": ok["a.json"], "b.json": explode}, keep_last=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]
    assert (root / "step-00000001" / "b.json").read_text() == "2"
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]


def test_leftover_temp_dir_from_a_kill_is_ignored(tmp_path):
    cfg = config(tmp_path, "run", max_steps=4, save_every=2)
    run(cfg)
    stale = tmp_path / "run" / "checkpoints" / ".tmp-step-00000006-xyz"
    stale.mkdir()
    (stale / "trainable.safetensors").write_bytes(b"\0garbage")  # a kill in the middle of a write
    assert list_checkpoints(cfg.output_dir)[-1].name == "step-00000004"


def test_only_trainable_parameters_are_saved(tmp_path):
    model = nn.Sequential(make_model(), nn.Linear(1, 1))
    model[1].requires_grad_(False)
    cfg = config(tmp_path, "frozen", max_steps=2)
    train(model, noisy_mse, param_groups(model), make_data(), None, cfg)
    saved = read_checkpoint(list_checkpoints(cfg.output_dir)[-1])["trainable"]
    assert sorted(saved) == ["0.bias", "0.weight"]


def test_existing_checkpoints_need_resume(tmp_path):
    cfg = config(tmp_path, "twice", max_steps=2)
    run(cfg)
    with pytest.raises(Exception, match="--resume"):
        run(cfg)


@pytest.mark.parametrize("in_order", [False, True])
def test_in_order_trains_on_batches_in_the_data_order(tmp_path, in_order):
    seen: list[float] = []

    def recording(model, batch):
        seen.extend(batch[0][:, 0].tolist())  # first feature identifies the row
        return noisy_mse(model, batch)

    run(config(tmp_path, f"order{in_order}", max_steps=5, grad_accum=2, batch_size=4, in_order=in_order), loss_fn=recording)
    rows = make_data()[:][0][:, 0].tolist()
    seen = seen[:40]  # then the final eval loss on the 8 eval rows
    assert (seen == rows) is in_order and sorted(seen) == sorted(rows)


def test_length_grouped_batches_pad_little_and_still_shuffle():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 400, (1003,), generator=g).tolist()
    sampler = LengthGroupedPermutation(lengths, batch_size=8, seed=5, megabatch=10)
    order = list(sampler)
    assert sorted(order) == list(range(1003))
    batches = [order[s:s + 8] for s in range(0, len(order), 8)]
    assert len(batches[-1]) == 1003 % 8  # the short batch stays last, so later batches do not shift

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    plain = [list(range(1003))[s:s + 8] for s in range(0, 1003, 8)]
    assert padded(batches) < 0.75 * padded(plain)  # about 300 -> 220 tokens per slot on this spread
    assert order == list(sampler)  # fixed by (seed, epoch): a resume sees the same batches
    first_lengths = [max(lengths[i] for i in b) for b in batches[:20]]
    assert first_lengths != sorted(first_lengths, reverse=True)  # batches are not in length order
    sampler.set_epoch(1)
    assert list(sampler) != order


class Lengths(torch.utils.data.Dataset):
    def __init__(self):
        self.data = make_data()

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        return self.data[index]

    def lengths(self):
        return [int(abs(x[0]) * 100) for x, _ in self.data]


def test_group_by_length_trains_and_needs_lengths(tmp_path):
    model = make_model()
    cfg = config(tmp_path, "grouped", max_steps=5, group_by_length=True)
    train(model, noisy_mse, param_groups(model), Lengths(), None, cfg)
    assert (tmp_path / "grouped" / "metrics.jsonl").is_file()
    with pytest.raises(ConfigError, match="lengths"):
        run(config(tmp_path, "no_lengths", max_steps=2, group_by_length=True))
    with pytest.raises(ConfigError, match="choose one"):
        config(tmp_path, "both", in_order=True, group_by_length=True).validate()


@pytest.mark.parametrize("native", [False, True])
def test_bf16_autocast_only_where_the_cpu_has_it(tmp_path, monkeypatch, capsys, native):
    monkeypatch.setattr("training.trainer.torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("training.trainer.cpu_has_native_bf16", lambda: native)
    seen = set()

    def loss_fn(model, batch):
        seen.add(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return noisy_mse(model, batch)

    cfg = config(tmp_path, f"bf16-{native}", max_steps=2, mixed_precision="bf16")
    if native:
        run(cfg, loss_fn)
        assert seen == {torch.bfloat16}
    else:
        with pytest.warns(UserWarning, match="no native bf16.*fp32 instead"):
            run(cfg, loss_fn)
        assert seen == {False}
    seen.clear()
    run(config(tmp_path, f"auto-{native}", max_steps=2, mixed_precision="auto"), loss_fn)  # no warning: auto asks for no emulation
    assert seen == ({torch.bfloat16} if native else {False})
    # Each run says what it computed in, and on what (the build records the latter per stage).
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("training on ")]
    assert len(said) == 2 and all(line.endswith("bf16 autocast" if native else ", fp32") for line in said)


def test_machine_names_the_cpu_its_cpus_and_its_bf16(tmp_path, monkeypatch):
    from vlm_chat import devices

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD  EPYC 9R14\nflags\t: fpu\n")
    assert devices.cpu_name(str(cpuinfo)) == "AMD EPYC 9R14"
    monkeypatch.setattr(devices.platform, "processor", lambda: "arm")
    assert devices.cpu_name(str(tmp_path / "missing")) == "arm"  # not Linux: what platform knows
    monkeypatch.setattr(devices, "cpu_name", lambda: "Xeon")
    monkeypatch.setattr(devices.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(devices.torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setattr(devices.torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert devices.machine() == "Xeon, 2 CPUs, bf16 by AMX and AVX512-BF16"
    monkeypatch.setattr(devices.torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(devices.torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert devices.machine() == "Xeon, 1 CPU, no native bf16"
    monkeypatch.setattr(devices.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices.torch.cuda, "get_device_name", lambda index: "NVIDIA A10G")
    assert devices.machine() == "NVIDIA A10G (CUDA)"


# Tensors of changing sizes, as batches of changing length make, after one larger block was
# freed (which makes glibc keep blocks of up to that size on its heap): the resident memory
# (MB) after freeing all but small tensors in between, and after a trim.
_HEAP_PROBE = """
import torch
from vlm_chat.devices import resident_bytes, trim_heap
def rss():
    return resident_bytes() >> 20
torch.set_num_threads(1)
del_me = torch.ones(4 << 20)  # 16 MB
del del_me
start, kept = rss(), []
for i in range(60):
    kept += [torch.ones((2 << 20) + i * 256), torch.ones(1000)]  # about 8 MB each, a small one between
kept = [t for t in kept if t.numel() == 1000]
held = rss() - start
trim_heap()
print(held, rss() - start)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux's /proc")
def test_trimming_the_heap_gives_freed_tensor_memory_back_to_the_os():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _HEAP_PROBE], capture_output=True, text=True, check=True)
    held, trimmed = map(int, run.stdout.split()[-2:])
    if held < 200:
        pytest.skip("this C library hands freed blocks back by itself")
    assert trimmed < 50  # 480 MB were allocated and freed


def test_the_trainer_checks_the_heap_after_each_step_on_cpu(tmp_path, monkeypatch):
    import training.trainer as trainer

    checks = []
    monkeypatch.setattr(trainer, "trim_heap_when_large", lambda: checks.append(1))
    run(config(tmp_path, "trim", max_steps=3))  # 2 micro-batches a step: a check per optimizer step
    assert len(checks) == 3


def test_the_heap_is_trimmed_only_when_the_process_holds_more_than_its_share(monkeypatch):
    import vlm_chat.devices as devices

    trims = []
    monkeypatch.setattr(devices, "trim_heap", lambda: trims.append(1) or True)
    monkeypatch.setattr(devices, "physical_memory", lambda: 24 << 30)
    for rss, trimmed in ((5 << 30, False), (12 << 30, False), (13 << 30, True)):
        monkeypatch.setattr(devices, "resident_bytes", lambda rss=rss: rss)
        assert devices.trim_heap_when_large(0.5) is trimmed
    assert len(trims) == 1
    monkeypatch.setattr(devices, "resident_bytes", lambda: None)  # no /proc: nothing to decide on
    assert devices.trim_heap_when_large(0.0) is False and len(trims) == 1
    if os.path.exists("/proc/self/statm"):
        monkeypatch.undo()
        assert 0 < devices.resident_bytes() < devices.physical_memory()


def test_the_train_bench_times_a_mix_on_its_first_rows_and_can_change_the_trim(tmp_path):
    import inspect
    import subprocess
    import sys
    from pathlib import Path

    from bench.bench_train import TRIM_LAUNCH, TRIMS, first_rows, launch_env, mix_variants, ours
    from vlm_chat.devices import allocator_relaunch

    mix = tmp_path / "work" / "mix.jsonl"
    mix.parent.mkdir()
    rows = [{"id": str(i), "image": f"images/{i}.png", "conversations": []} for i in range(5)]
    rows.append({"id": "text", "conversations": []})
    mix.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = [json.loads(line) for line in first_rows(mix, 3, tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    assert [r["id"] for r in got] == ["0", "1", "2"]
    assert got[0]["image"] == str((mix.parent / "images" / "0.png").resolve())  # relative to the mix, now absolute
    with pytest.raises(SystemExit, match="has 6 rows; --steps x --batch-size needs 8"):
        first_rows(mix, 8, tmp_path / "out" / "more.jsonl")
    variants = mix_variants(0.75)
    assert {"trim after each step", "trim above 75% of memory", "bf16", "no LoRA dropout + bf16"} <= set(variants)
    assert not any("," in name for name in variants)  # --only splits on commas
    # Each malloc times no-dropout training in fp32 and in bf16, so the two compare on it.
    for name, kwargs in variants.items():
        if name.startswith("no LoRA dropout + bf16 + "):
            fp32 = variants["no LoRA dropout + " + name.removeprefix("no LoRA dropout + bf16 + ")]
            assert fp32 == {**kwargs, "precision": "no"} or {**fp32, "precision": "bf16"} == kwargs
    assert all(set(kwargs) <= set(inspect.signature(ours).parameters) for kwargs in variants.values())
    # The baseline stays on glibc (the CLI would otherwise run itself again under tcmalloc),
    # a preloaded malloc stays the one preloaded.
    assert launch_env(None)["VLM_CHAT_ALLOCATOR"] == "system" and allocator_relaunch(["train"], launch_env(None)) is None
    assert allocator_relaunch(["train"], launch_env("libjemalloc.so.2")) is None
    # The launchers are the real CLI with the trainer's trim replaced.
    repo = Path(__file__).resolve().parents[1]
    for trim in ("never", "each step"):
        launch = TRIM_LAUNCH.format(TRIMS[trim])
        run = subprocess.run([sys.executable, "-c", launch, "train", "--help"], cwd=repo, capture_output=True, text=True)
        assert run.returncode == 0 and "--stage" in run.stdout, trim
