"""The `mars` command line: one entry point, one sub-command per verb.

Each subsystem owns its verbs in its own `cli.py` with an `add_commands(subparsers)` function that
registers argparse sub-parsers and sets `func` (called with the parsed namespace). This file only
wires them together and turns `MarsError` into a one-line message.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mars.errors import MarsError

# Modules that contribute verbs, in the order they appear in `mars --help`.
COMMAND_MODULES = [
    "mars.cli_generate",
    "mars.model.cli",
    "mars.data.cli",
    "mars.vq.cli",
    "mars.data.preprocess_cli",
    "mars.train.cli",
    "mars.eval.cli",
    "mars.serve.cli",
    "mars.recipes.cli",
]


def comma_list(text: str) -> tuple[str, ...]:
    """An argparse `type` for comma-separated names: "a, b,," -> ("a", "b")."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mars",
        description="MARS: text-to-image generation with a frozen LLM and a trainable visual expert.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except MarsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
