"""Files of an evaluation: atomic writes, image listings and the closing table.

Every file an eval writes goes to a temporary name first and is renamed into place, so a run
that is killed leaves either the whole file or nothing: a resumed run can trust any PNG it finds.
Temporary names start with a dot and end in `.tmp`, so no benchmark's file pattern (GenEval reads
`\\d+\\.png`, T2I-CompBench every file of `samples/`) ever matches one; they live in the output's
`.partial/` folder, outside every folder a benchmark scans.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff")
PARTIAL_DIR = ".partial"


def _temporary(path: Path, tmp_dir: Path | None, tag: str | None) -> Path:
    folder = tmp_dir if tmp_dir is not None else path.parent
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f".{tag or os.getpid()}-{path.name}.tmp"


def save_image_atomic(image: Image.Image, path: str | Path, tmp_dir: str | Path | None = None,
                      tag: str | None = None) -> None:
    """Save `image` as PNG at `path` via a temporary file in `tmp_dir` (same file system).

    `tag` names the writer in the temporary name (default: the process id), so concurrent
    writers never share one and `remove_partials(tag)` finds a writer's own leftovers.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path, Path(tmp_dir) if tmp_dir is not None else None, tag)
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str, tmp_dir: str | Path | None = None,
                      tag: str | None = None) -> None:
    """Write `text` (UTF-8) to `path` atomically (see `save_image_atomic`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path, Path(tmp_dir) if tmp_dir is not None else None, tag)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj) -> None:
    """Write `obj` as indented JSON (non-ASCII kept readable) to `path` atomically."""
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def remove_partials(out_dir: str | Path, tag: str) -> None:
    """Delete the temporary files that writer `tag` left in `out_dir/.partial` when it was killed
    (only its own: other ranks may be writing theirs right now)."""
    folder = Path(out_dir) / PARTIAL_DIR
    if folder.is_dir():
        for tmp in folder.glob(f".{tag}-*.tmp"):
            tmp.unlink(missing_ok=True)


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursively, hidden files and folders skipped), sorted."""
    root = Path(folder)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def format_table(headers: list[str], rows: list[list]) -> str:
    """A plain-text table; floats print with 3 decimals."""
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])
