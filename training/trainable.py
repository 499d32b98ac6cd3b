"""What trains is data: one plan, applied by one function (TinyLLaVA Factory's idea).

    vision: frozen | lora | full     projector: frozen | full     llm: frozen | lora | full
"""

from __future__ import annotations

from dataclasses import dataclass

from adapters.lora import LoraSettings, add_lora, is_lora, set_lora_dropout
from vlm_chat.errors import ConfigError

CHOICES = {"vision": ("frozen", "lora", "full"), "projector": ("frozen", "full"), "llm": ("frozen", "lora", "full")}
# LoRA targets inside a CLIP/SigLIP vision tower (attention and MLP projections).
VISION_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@dataclass
class TrainablePlan:
    vision: str = "frozen"
    projector: str = "full"
    llm: str = "lora"

    def validate(self) -> None:
        for part, choices in CHOICES.items():
            value = getattr(self, part)
            if value not in choices:
                raise ConfigError(f"trainable {part}={value!r}; choose one of: {', '.join(choices)}")
        if all(getattr(self, part) == "frozen" for part in CHOICES):
            raise ConfigError("every part is frozen: nothing would train")


def apply_plan(model, plan: TrainablePlan, lora: LoraSettings, quantized_llm: bool = False,
               adapter_dropout: float | None = None) -> None:
    """Freeze everything, then unfreeze (or wrap with LoRA) exactly what the plan says.
    An adapter the bundle already carries keeps its own rank and alpha; its dropout becomes
    `adapter_dropout` when that is given (None keeps the one it was trained with)."""
    plan.validate()
    model.requires_grad_(False)
    if plan.vision == "full":
        model.vision_tower.requires_grad_(True)
    elif plan.vision == "lora":
        vision_lora = LoraSettings(lora.r, lora.alpha, lora.dropout, VISION_LORA_TARGETS)
        model.vision_tower.model = add_lora(model.vision_tower.model, vision_lora)
    if plan.projector == "full":
        model.projector.requires_grad_(True)
    if plan.llm == "full":
        if quantized_llm:
            raise ConfigError("llm 'full' cannot train 4-bit weights; use llm 'lora' with --qlora, or drop --qlora")
        model.language_model.requires_grad_(True)
    elif plan.llm == "lora" and is_lora(model.language_model):
        # The bundle already carries an adapter: keep training it.
        for name, param in model.language_model.named_parameters():
            param.requires_grad_("lora_" in name)
        if adapter_dropout is not None:
            set_lora_dropout(model.language_model, adapter_dropout)
    elif plan.llm == "lora":
        model.language_model = add_lora(model.language_model, lora, quantized=quantized_llm)
        if quantized_llm:
            # k-bit preparation may re-enable grads on non-LoRA params (norms in fp32); keep to the plan.
            for name, param in model.language_model.named_parameters():
                param.requires_grad_("lora_" in name)


def trainable_summary(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable:,} of {total:,} parameters train ({100 * trainable / max(total, 1):.2f}%)"
