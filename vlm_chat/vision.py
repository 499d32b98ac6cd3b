"""Vision tower: `pixel_values` (N, 3, S, S) -> `image_features` (N, P, D_v).

Any transformers CLIP or SigLIP model works, from a local dir or a hub id; for a
full CLIPModel / SiglipModel checkpoint only the vision half is loaded. The class
is picked from the checkpoint's `model_type`, never from its path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, CLIPVisionModel, SiglipVisionModel

from vlm_chat.config import VisionConfig
from vlm_chat.errors import ConfigError

# model_type of the checkpoint -> (vision class, has a CLS token)
VISION_MODELS = {
    "clip": (CLIPVisionModel, True),
    "clip_vision_model": (CLIPVisionModel, True),
    "siglip": (SiglipVisionModel, False),
    "siglip_vision_model": (SiglipVisionModel, False),
}
SELECT_STRATEGIES = ("default", "full")
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class ImageNormalisation:
    image_size: int
    image_mean: list[float]
    image_std: list[float]


class VisionTower(nn.Module):
    def __init__(self, model: nn.Module, config: VisionConfig, has_cls: bool):
        super().__init__()
        if config.select_strategy not in SELECT_STRATEGIES:
            raise ConfigError(
                f"vision.select_strategy {config.select_strategy!r} is unknown; "
                f"choose one of: {', '.join(SELECT_STRATEGIES)}"
            )
        if config.select_strategy == "default" and not has_cls:
            raise ConfigError(
                "vision.select_strategy 'default' drops a CLS token, but this vision model "
                "(SigLIP) has none; use select_strategy 'full'"
            )
        self.model = model
        self.feature_layer = config.feature_layer
        self.drop_cls = config.select_strategy == "default"
        vcfg = model.config
        self.hidden_size = vcfg.hidden_size * (len(self.feature_layer) if isinstance(self.feature_layer, list) else 1)
        self.image_size = vcfg.image_size
        self.patch_size = vcfg.patch_size
        self.grid_size = vcfg.image_size // vcfg.patch_size
        # Tokens per image after selection: the patch grid, plus CLS when kept.
        self.num_tokens = self.grid_size**2 + (1 if has_cls and not self.drop_cls else 0)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values.to(self.dtype), output_hidden_states=True)
        # hidden_states: tuple of (N, 1 + P, D) for CLIP (embeddings, then each layer)
        if isinstance(self.feature_layer, list):
            features = torch.cat([out.hidden_states[i] for i in self.feature_layer], dim=-1)
        else:
            features = out.hidden_states[self.feature_layer]
        if self.drop_cls:
            features = features[:, 1:]  # (N, P, D_v)
        return features


def vision_model_type(name_or_path: str) -> str:
    model_type = AutoConfig.from_pretrained(name_or_path).model_type
    if model_type not in VISION_MODELS:
        raise ConfigError(
            f"{name_or_path}: model_type {model_type!r} is not a supported vision tower; "
            f"supported: {', '.join(VISION_MODELS)}"
        )
    return model_type


def load_vision_tower(
    config: VisionConfig, path: str, dtype: torch.dtype, device: torch.device
) -> VisionTower:
    """Load the vision half of a CLIP/SigLIP checkpoint, frozen and in eval mode."""
    klass, has_cls = VISION_MODELS[vision_model_type(path)]
    model = klass.from_pretrained(path, dtype=dtype).to(device)
    model.requires_grad_(False)
    model.eval()
    return VisionTower(model, config, has_cls)


def image_normalisation(path: str, vision_model: nn.Module) -> ImageNormalisation:
    """Size, mean and std from the checkpoint's preprocessor, else CLIP's defaults."""
    from transformers import AutoImageProcessor

    size = vision_model.config.image_size
    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError):
        return ImageNormalisation(size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    mean = getattr(processor, "image_mean", None) or OPENAI_CLIP_MEAN
    std = getattr(processor, "image_std", None) or OPENAI_CLIP_STD
    return ImageNormalisation(size, list(mean), list(std))
