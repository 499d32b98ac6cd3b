"""Entry point of the `vlm-chat` console script.

Each layer owns its commands (`vlm_chat/commands.py`, `training/commands.py`,
`serve/commands.py`) and registers them here; this file is the only place that
knows all layers, so the core never imports training or serving code.
Command modules import only argparse at top level: heavy imports happen inside
the handlers, so `vlm-chat --help` answers instantly.
"""

from __future__ import annotations

import argparse
import sys

from serve import commands as serve_commands
from training import commands as training_commands
from vlm_chat import commands as core_commands
from vlm_chat.errors import UserFacingError

COMMAND_GROUPS = (core_commands, training_commands, serve_commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-chat",
        description="Talk with your images: ask, caption, train, classify, search and serve.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for group in COMMAND_GROUPS:
        group.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    fast_allocator = vars(args).pop("fast_allocator", False)  # the CLI's own, not a command's setting
    try:
        if argv is None and fast_allocator:
            _relaunch_under_fast_allocator()
        _quiet_libraries()
        result = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserFacingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


def _relaunch_under_fast_allocator() -> None:
    """Training commands run themselves again under tcmalloc when it is installed (only from
    the console script: a caller's own process, such as a test's, is never replaced)."""
    import os

    from vlm_chat.devices import ALLOCATOR_ENV, allocator_relaunch

    relaunch = allocator_relaunch(sys.argv[1:], os.environ)
    if relaunch is not None:
        command, env = relaunch
        print(f"[allocator] training under {env['LD_PRELOAD'].split(':')[0]} "
              f"(set {ALLOCATOR_ENV}=system for the C library's malloc)", file=sys.stderr, flush=True)
        os.execve(command[0], command, env)


def _quiet_libraries() -> None:
    """Our own progress bars and messages are enough; hide the libraries' per-load ones."""
    import os

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
