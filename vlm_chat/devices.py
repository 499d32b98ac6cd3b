"""Device and dtype choice: CUDA when present, else CPU; overridable everywhere."""

from __future__ import annotations

import ctypes
import functools

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


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # glibc's own: absent from macOS, Windows and musl
        return libc
    except (OSError, AttributeError):
        return None


def trim_heap() -> bool:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim). Tensors of ever-changing
    sizes (a batch's sequence length) leave holes in glibc's heap that it keeps for itself:
    a CPU training run grew to 24 GB that way and was killed. The trainer calls this after
    each step on CPU; True when memory was returned. Off glibc, a no-op."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 decodes slower there), bf16 on GPUs that have it, else fp16."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]
