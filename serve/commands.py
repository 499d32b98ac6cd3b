"""Commands of this layer for the `vlm-chat` CLI (see cli/main.py)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this layer's subcommands; none yet."""
