"""Device and dtype choice: CUDA when present, else CPU; overridable everywhere."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys
from collections.abc import Mapping

import torch

from vlm_chat.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    return torch.device(device)


def cpu_bf16_units() -> list[str]:
    """The units this CPU does bf16 math with in hardware, of "AMX" and "AVX512-BF16"."""
    checks = {"AMX": "_is_amx_tile_supported", "AVX512-BF16": "_is_avx512_bf16_supported"}
    return [unit for unit, name in checks.items() if getattr(torch.cpu, name, lambda: False)()]


def cpu_has_native_bf16() -> bool:
    """True when this CPU does bf16 math in hardware (AVX512-BF16 or AMX); without either,
    torch emulates bf16 and autocast to it runs far slower than fp32."""
    return bool(cpu_bf16_units())


def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name as Linux reports it ("AMD EPYC", "Intel(R) Xeon(R) ..."), else
    what `platform` knows, else "unknown CPU"."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine() -> str:
    """One line that says what a run ran on, for timings recorded next to it: the GPU when
    training uses one, else the CPU's name, how many CPUs this process may use, and how it
    does bf16 ("AMX", "AVX512-BF16" or none), which decides what `mixed_precision auto` picks
    and so how fast a training stage runs."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA)"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    units = cpu_bf16_units()
    bf16 = f"bf16 by {' and '.join(units)}" if units else "no native bf16"
    return f"{cpu_name()}, {cpus} CPU{'s' if cpus != 1 else ''}, {bf16}"


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # glibc's own: absent from macOS, Windows and musl
        return libc
    except (OSError, AttributeError):
        return None


def trim_heap() -> bool:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim); True when memory
    was returned. Off glibc, a no-op. Not free: every page handed back is faulted in again
    by the next training step, and a trim after each step made a build stage's steps 1.7
    times slower (bench/bench_train.py), so the trainer trims only when the process is
    near the machine's memory (`trim_heap_when_large`)."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def resident_bytes() -> int | None:
    """This process's resident memory (Linux's /proc), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


# The share of the machine's memory a process may hold after a training step before the
# trainer trims: a guard against the slow growth that ends in the OOM killer, not a
# routine. A stage's steps take up to 21 GB of 24 GB at their peak and glibc keeps much of
# it between steps; on a stage's batches (grouped by length) this trimmed twice in 40
# steps, where half the memory would trim nearly every step (README, "Speed").
TRIM_ABOVE = 0.75


def trim_heap_when_large(share: float = TRIM_ABOVE) -> bool:
    """Trim the C heap when this process holds more than `share` of the machine's memory.
    Tensors of ever-changing sizes (a batch's sequence length) leave holes in glibc's heap
    that it keeps for itself: a CPU training run grew to 24 GB that way and was killed.
    Checked after every training step; True when it trimmed."""
    rss, total = resident_bytes(), physical_memory()
    if rss is None or not total or rss <= share * total:
        return False
    trim_heap()
    return True


# Training on a CPU runs faster on tcmalloc than on glibc's malloc, 1.3x on a build stage
# (README, "Speed on this 2-core CPU"); likely because glibc maps each large tensor afresh
# and hands it back when freed, so every step faults its pages in again, where tcmalloc
# keeps freed memory for the next step. Debian and Ubuntu ship it as libtcmalloc-minimal4
# (scripts/setup.sh installs it); a training command runs itself again under it when it is
# installed, as PyTorch's own CPU launcher (torch.backends.xeon.run_cpu) does with LD_PRELOAD.
ALLOCATOR_ENV = "VLM_CHAT_ALLOCATOR"  # "auto" (default): tcmalloc when installed; "system": the C library's malloc
ALLOCATORS = ("auto", "system")
CHOSEN_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")  # already in LD_PRELOAD: the user chose, leave it


def fast_allocator() -> str | None:
    """tcmalloc's library name when the dynamic loader can find it, else None."""
    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def allocator_relaunch(argv: list[str], environ: Mapping[str, str]) -> tuple[list[str], dict[str, str]] | None:
    """The command line and environment that run `vlm-chat ARGV` again under tcmalloc, or
    None to go on as is: asked not to ($VLM_CHAT_ALLOCATOR=system), not Linux, an allocator
    already preloaded (which also ends the relaunch itself), or tcmalloc not installed."""
    choice = environ.get(ALLOCATOR_ENV, "auto")
    if choice not in ALLOCATORS:
        raise ConfigError(f"${ALLOCATOR_ENV}={choice!r}; choose one of: {', '.join(ALLOCATORS)}")
    preload = environ.get("LD_PRELOAD", "")
    if choice == "system" or not sys.platform.startswith("linux") or any(name in preload for name in CHOSEN_ALLOCATORS):
        return None
    library = fast_allocator()
    if library is None:
        return None
    env = {**environ, "LD_PRELOAD": ":".join(part for part in (library, preload) if part)}
    return [sys.executable, "-m", "cli", *argv], env


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 decodes slower there), bf16 on GPUs that have it, else fp16."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]
