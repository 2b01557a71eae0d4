"""Reading JSON-lines files strictly: every non-blank line one JSON value, errors naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

from mars.errors import MarsError


def read_jsonl(path: str | Path, what: str = "file") -> list[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of `path`.

    A missing file or a folder ("{what} not found: PATH") or a line that is not JSON ("PATH:N: not
    JSON (...)") raises MarsError; what each value must hold is the caller's to check."""
    if not Path(path).is_file():  # missing, or a folder
        raise MarsError(f"{what} not found: {path}")
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    values = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            values.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise MarsError(f"{path}:{number}: not JSON ({err})") from None
    return values
