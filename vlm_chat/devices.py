"""Device and dtype choice: CUDA when present, else CPU; overridable everywhere."""

from __future__ import annotations

import ctypes
import os

import torch

from vlm_chat.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """True when this CPU does bf16 math in hardware (AVX512-BF16 or AMX); without either,
    torch emulates bf16 and autocast to it runs far slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


def return_freed_memory() -> bool:
    """Make glibc serve every block of 1 MiB or more with mmap, so a freed tensor's memory goes
    back to the OS at once. By default glibc raises that threshold (up to 32 MiB) each time
    it frees such a block and keeps later ones on its heap, where tensors of ever-changing
    sizes (a batch's sequence length) leave holes it cannot hand back: a CPU training run
    grew to 24 GB and was killed for it. A MALLOC_MMAP_THRESHOLD_ the user set stands, and
    off glibc nothing changes. True when the threshold was set here."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return False


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 decodes slower there), bf16 on GPUs that have it, else fp16."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]
