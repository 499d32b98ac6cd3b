"""Which bundle a command uses when no --model is given."""

from __future__ import annotations

import os
from pathlib import Path

from vlm_chat.config import CONFIG_NAME
from vlm_chat.errors import UserFacingError

# The offline default model ships here once it is built (`vlm_chat/assets/default`);
# $VLM_CHAT_DEFAULT_MODEL points elsewhere.
SHIPPED_DEFAULT = Path(__file__).resolve().parent / "assets" / "default"
DEFAULT_NAME = "default"  # `--model default` names it explicitly (e.g. to train on top of it)


def default_model_dir() -> Path:
    return Path(os.environ.get("VLM_CHAT_DEFAULT_MODEL") or SHIPPED_DEFAULT)


def resolve_model(model: str | None) -> str:
    """The --model given, else the default bundle, else a clear error.

    `--model default` means the default bundle unless a directory of that name exists here.
    """
    if model and (model != DEFAULT_NAME or Path(model).exists()):
        return model
    default = default_model_dir()
    if (default / CONFIG_NAME).is_file():
        return str(default)
    raise UserFacingError(
        f"no --model given and no default model at {default}; pass a bundle directory "
        "(make one with `vlm-chat build`, train it with `vlm-chat train`) or set $VLM_CHAT_DEFAULT_MODEL"
    )
