"""LoRA on either tower through peft: add for training, load for inference, merge for export.

Defaults follow LLaVA 1.5's LoRA recipe (LoRA on every linear layer of the LLM,
alpha = 2 r, dropout 0.05) with the rank scaled to small models: LLaVA uses r=128 on
a 4096-wide 7B model; r=16 keeps the same rank-to-width ratio order on 576-wide
SmolLM2 without dominating its parameter count.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from vlm_chat.errors import ConfigError

ADAPTER_NAME = "default"


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # "all-linear": every nn.Linear except the output head (peft's own rule), LLaVA's choice.
    target_modules: list[str] | str = field(default_factory=lambda: "all-linear")

    def validate(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA needs r >= 1, alpha > 0 and 0 <= dropout < 1; got {self}")


@contextmanager
def _quiet_peft():
    """peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` when it
    wraps a model, so every load printed a FutureWarning the user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def add_lora(module: nn.Module, settings: LoraSettings, quantized: bool = False) -> nn.Module:
    """Wrap `module` in a peft LoRA model; only the LoRA matrices require grad afterwards."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    settings.validate()
    if quantized:
        # QLoRA: casts norms to fp32 and enables input grads so LoRA on 4-bit layers trains.
        module = prepare_model_for_kbit_training(module, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias="none",
    )
    try:
        with _quiet_peft():
            return get_peft_model(module, config)
    except ValueError as err:
        raise ConfigError(f"LoRA target modules {settings.target_modules!r} do not fit this model: {err}") from None


def load_lora(
    module: nn.Module, directory: str | Path, trainable: bool = False, adapter_name: str = ADAPTER_NAME
) -> nn.Module:
    """Wrap `module` with the adapter saved in `directory`, or add it to an existing peft model."""
    from peft import PeftModel

    if not (Path(directory) / "adapter_config.json").is_file():
        raise ConfigError(f"{directory}: no LoRA adapter here (adapter_config.json is missing)")
    if is_lora(module):
        module.load_adapter(str(directory), adapter_name=adapter_name, is_trainable=trainable)
        return module
    with _quiet_peft():
        return PeftModel.from_pretrained(module, str(directory), is_trainable=trainable, adapter_name=adapter_name)


def set_lora_dropout(module: nn.Module, p: float) -> None:
    """Set the dropout in front of every LoRA layer of a peft model, and in its config so the
    saved adapter_config.json says so. p = 0 puts nn.Identity there, as peft does for a new
    adapter. On a CPU the dropout is not cheap: drawing its masks (aten::bernoulli_) took
    about a quarter of a SmolLM2 training step (README, "Speed on this 2-core CPU")."""
    LoraSettings(dropout=p).validate()
    from peft.tuners.lora import LoraLayer

    for layer in module.modules():
        if isinstance(layer, LoraLayer):
            for name in layer.lora_dropout:
                layer.lora_dropout[name] = nn.Dropout(p) if p > 0 else nn.Identity()
    for config in module.peft_config.values():
        config.lora_dropout = p


def is_lora(module: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(module, PeftModel)


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold LoRA into the base weights and return the plain model."""
    return module.merge_and_unload() if is_lora(module) else module
