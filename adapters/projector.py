"""Projection bridge: `image_features` (N, P, D_v) -> image embeddings (N, P', D_lm).

Variants are looked up by exact key in `PROJECTORS` and `TOKEN_REDUCTIONS`.
Layer names (`linear_1`, `act`, `linear_2`) follow transformers' Llava projector
so the export is a plain copy of weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlm_chat.config import ProjectorConfig
from vlm_chat.errors import ConfigError


class LinearProjector(nn.Module):
    """LLaVA 1.0: one linear map."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_1(x)


class MLP2xGELUProjector(nn.Module):
    """LLaVA 1.5's `mlp2x_gelu`: Linear -> GELU -> Linear."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


PROJECTORS = {"linear": LinearProjector, "mlp2x_gelu": MLP2xGELUProjector}


def _as_grid(x: torch.Tensor, factor: int) -> torch.Tensor:
    n, p, d = x.shape
    side = math.isqrt(p)
    if side * side != p:
        raise ConfigError(
            f"token reduction needs a square patch grid, got {p} tokens; "
            "use vision.select_strategy 'default' (drops CLS) or projector.token_reduction 'none'"
        )
    if side % factor:
        raise ConfigError(
            f"token reduction factor {factor} does not divide the {side}x{side} patch grid; "
            "pick a factor that divides it"
        )
    return x.view(n, side, side, d)


def reduce_none(x: torch.Tensor, factor: int) -> torch.Tensor:
    return x


def reduce_avg_pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, g*g, D) -> (N, (g/f)^2, D): average each f x f block of patches."""
    grid = _as_grid(x, factor).permute(0, 3, 1, 2)  # (N, D, g, g)
    pooled = nn.functional.avg_pool2d(grid, factor)  # (N, D, g/f, g/f)
    return pooled.flatten(2).transpose(1, 2)  # (N, (g/f)^2, D)


def reduce_pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, g*g, D) -> (N, (g/f)^2, D*f*f): stack each f x f block into channels (SmolVLM, nanoVLM)."""
    grid = _as_grid(x, factor).permute(0, 3, 1, 2)  # (N, D, g, g)
    shuffled = nn.functional.pixel_unshuffle(grid, factor)  # (N, D*f*f, g/f, g/f)
    return shuffled.flatten(2).transpose(1, 2)  # (N, (g/f)^2, D*f*f)


# name -> (function, how it multiplies the feature width)
TOKEN_REDUCTIONS = {
    "none": (reduce_none, lambda f: 1),
    "avg_pool": (reduce_avg_pool, lambda f: 1),
    "pixel_shuffle": (reduce_pixel_shuffle, lambda f: f * f),
}


def _lookup(table: dict, key: str, field: str):
    if key not in table:
        raise ConfigError(f"{field} {key!r} is unknown; choose one of: {', '.join(table)}")
    return table[key]


class Projector(nn.Module):
    """Token reduction, the projection MLP, and optionally a learned position per image token."""

    def __init__(self, config: ProjectorConfig, vision_dim: int, llm_dim: int, num_input_tokens: int | None = None):
        super().__init__()
        reduce, width_mult = _lookup(TOKEN_REDUCTIONS, config.token_reduction, "projector.token_reduction")
        klass = _lookup(PROJECTORS, config.type, "projector.type")
        if config.reduction_factor < 1:
            raise ConfigError(f"projector.reduction_factor must be >= 1, got {config.reduction_factor}")
        self.config = config
        self.reduce = reduce
        self.factor = config.reduction_factor
        self.mlp = klass(vision_dim * width_mult(self.factor), llm_dim)
        self.llm_dim = llm_dim
        self.position_embedding: nn.Parameter | None = None
        if config.position_embedding:
            if num_input_tokens is None:
                raise ConfigError("projector.position_embedding needs the vision tower's token count")
            self.add_position_embedding(num_input_tokens)

    def add_position_embedding(self, num_input_tokens: int) -> None:
        """(P', D_lm) zeros: outputs are unchanged until it learns, so a trained bundle
        can take one on and keep what it knows."""
        weight = self.mlp.linear_1.weight
        shape = (self.num_output_tokens(num_input_tokens), self.llm_dim)
        self.position_embedding = nn.Parameter(torch.zeros(shape, device=weight.device, dtype=weight.dtype))
        self.config.position_embedding = True

    def num_output_tokens(self, num_input_tokens: int) -> int:
        if self.config.token_reduction == "none":
            return num_input_tokens
        return num_input_tokens // (self.factor * self.factor)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        x = self.reduce(image_features, self.factor)  # (N, P', D_v * width_mult)
        x = self.mlp(x)  # (N, P', D_lm)
        if self.config.output_scale != 1.0:
            x = x * self.config.output_scale
        if self.position_embedding is not None:
            x = x + self.position_embedding  # (P', D_lm) broadcast over the N images
        return x
