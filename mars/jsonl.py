"""Reading a user's line files strictly: text lines, or JSON lines (every non-blank line one JSON
value), errors naming the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from mars.errors import MarsError


def read_lines(path: str | Path, what: str = "file") -> list[tuple[int, str]]:
    """(line number, line) of each non-blank line of `path`; a missing file or a folder raises
    MarsError("{what} not found: PATH")."""
    if not Path(path).is_file():  # missing, or a folder
        raise MarsError(f"{what} not found: {path}")
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [(number, line) for number, line in enumerate(lines, 1) if line.strip()]


def read_jsonl(path: str | Path, what: str = "file") -> list[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of `path`.

    A missing file or a folder ("{what} not found: PATH") or a line that is not JSON ("PATH:N: not
    JSON (...)") raises MarsError; what each value must hold is the caller's to check."""
    values = []
    for number, line in read_lines(path, what):
        try:
            values.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise MarsError(f"{path}:{number}: not JSON ({err})") from None
    return values
