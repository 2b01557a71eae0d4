"""Image-text data sources behind one interface: `open_source(spec, resolution)`.

A spec is one of
- `shapes:N[:SEED]`       N MARS-Shapes training scenes, drawn on the fly;
- `shapes:N:SEED:reading-order`  the same scenes with relations stated in reading order
                          (`mars.data.captions.caption_scene`);
- `DIR` with captions.jsonl  a `mars data shapes` output (or any folder with that manifest);
- `FILE.jsonl`            a manifest of {"image": PATH, "text": ..., "text_zh": ...} lines
                          (relative paths are relative to the manifest's folder);
- `DIR`                   an image folder, searched recursively; each image NAME.EXT has a
                          sidecar caption NAME.txt or NAME.json ({"text": ..., "text_zh": ...});
- `x.tar`, a glob (`shards/*.tar`) or a brace range (`shards/{000..009}.tar`)
                          webdataset shards: files grouped by key (the path up to the first dot
                          of the basename), image from jpg/jpeg/png/webp, caption from txt/json.

Every source yields {"key", "image" (RGB PIL, resolution x resolution), "text", "text_zh"}.
The source is an index of records built once at open (so `len()` is known and tar members are
read by offset, not by streaming); each pass walks the records of one shard, chosen by
(rank, world_size) and the DataLoader worker, so every sample is seen by exactly one shard.
Unreadable, corrupt or too-small images and missing captions are skipped and counted in a
SkipReport; one bad file never ends an epoch.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from mars.data.captions import shapes_example
from mars.data.images import MIN_SIDE, UnusableImage, load_image, resize_center_crop
from mars.data.shapes import render_scene
from mars.errors import MarsError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # in order of preference


class SkippedSample(Exception):
    """A sample that cannot be used; the message is the reason shown in the report."""


@dataclass
class SkipReport:
    """How many samples were skipped out of how many, with the first few names and reasons."""

    total: int = 0
    skipped: int = 0
    examples: list[tuple[str, str]] = field(default_factory=list)
    max_examples: int = 5

    def add(self, name: str, reason: str) -> None:
        self.skipped += 1
        if len(self.examples) < self.max_examples:
            self.examples.append((name, reason))

    def copy(self) -> SkipReport:
        return SkipReport(self.total, self.skipped, list(self.examples), self.max_examples)

    def __str__(self) -> str:
        text = f"skipped {self.skipped} of {self.total} samples"
        if self.examples:
            text += ": " + ", ".join(f"{name} ({reason})" for name, reason in self.examples)
            if self.skipped > len(self.examples):
                text += ", ..."
        return text


class ImageTextSource(IterableDataset):
    """A list of records and a way to read one; subclasses define `read(record)`.

    `read` returns (key, image, text, text_zh), with image a PIL image, a path or bytes, or
    raises SkippedSample / UnusableImage.
    """

    def __init__(self, name: str, records: list, resolution: int, *, rank: int = 0, world_size: int = 1,
                 shuffle: bool = False, seed: int = 0, min_side: int = MIN_SIDE,
                 index_report: SkipReport | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if not records:
            detail = f" ({index_report})" if index_report and index_report.skipped else ""
            raise MarsError(f"no usable samples in data source {name}{detail}")
        self.name = name
        self.records = records
        self.resolution = resolution
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.min_side = min_side
        # Entries dropped while indexing count as skipped samples of every pass.
        self.index_report = index_report or SkipReport()
        self.index_report.total = self.index_report.skipped
        self.last_report = self.index_report.copy()

    def read(self, record) -> tuple[str, Image.Image | str | bytes, str | None, str | None]:
        raise NotImplementedError

    def close(self) -> None:
        """Release open files after a pass (tar shards keep theirs open while iterating)."""

    def __len__(self) -> int:
        """Number of samples of this rank (before skips)."""
        return len(range(self.rank, len(self.records), self.world_size))

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffle order of the next pass (only matters with shuffle=True)."""
        self.epoch = epoch

    def shard(self) -> list:
        """The records of this (rank, DataLoader worker), in a deterministic order."""
        order = list(range(len(self.records)))
        if self.shuffle:
            random.Random(f"{self.seed}/{self.epoch}").shuffle(order)
        mine = order[self.rank::self.world_size]
        worker = get_worker_info()
        if worker is not None:
            mine = mine[worker.id::worker.num_workers]
        return [self.records[i] for i in mine]

    def __iter__(self):
        report = self.index_report.copy()
        self.last_report = report
        try:
            for record in self.shard():
                report.total += 1
                try:
                    sample = self.read_sample(record)
                except (SkippedSample, UnusableImage) as err:
                    report.add(self.record_name(record), str(err))
                    continue
                yield sample
        finally:
            self.close()
            if report.skipped:
                logger.warning("%s: %s", self.name, report)

    def read_sample(self, record) -> dict:
        """One record read, checked and resized -> a sample dict; raises SkippedSample or
        UnusableImage when it cannot be used (callers count those)."""
        key, image, text, text_zh = self.read(record)
        if not text or not text.strip():
            raise SkippedSample("empty caption")
        if not isinstance(image, Image.Image):
            image = load_image(image, self.min_side)
        return {"key": key, "image": resize_center_crop(image, self.resolution),
                "text": text.strip(), "text_zh": text_zh.strip() if text_zh else None}

    def record_name(self, record) -> str:
        """How a record is named in skip reports."""
        return str(record[0])

    def report(self) -> str:
        """'skipped K of N samples: name (reason), ...' for the latest (or current) pass."""
        return str(self.last_report)


# --------------------------------------------------------------------------- files on disk

def _caption_from_json(data: dict) -> tuple[str | None, str | None]:
    text, text_zh = data.get("text", data.get("caption")), data.get("text_zh")
    return (text if isinstance(text, str) else None), (text_zh if isinstance(text_zh, str) else None)


class FileSource(ImageTextSource):
    """Records (key, image path, text, text_zh, sidecar path or None); sidecars are read lazily."""

    def read(self, record):
        key, path, text, text_zh, sidecar = record
        if sidecar is not None:
            try:
                raw = Path(sidecar).read_text(encoding="utf-8")
                text, text_zh = _caption_from_json(json.loads(raw)) if sidecar.endswith(".json") else (raw, None)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
                raise SkippedSample(f"unreadable caption {os.path.basename(sidecar)}: {err}") from err
        return key, path, text, text_zh

    def record_name(self, record) -> str:
        return os.path.basename(record[1])


def index_folder(root: str) -> tuple[list, SkipReport]:
    """Every image under `root` with a NAME.txt or NAME.json caption beside it."""
    records, report = [], SkipReport()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        names = set(files)
        for file in sorted(files):
            stem, ext = os.path.splitext(file)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            sidecar = next((stem + e for e in (".json", ".txt") if stem + e in names), None)
            if sidecar is None:
                report.add(file, "missing caption")
                continue
            key = os.path.relpath(os.path.join(folder, stem), root)
            records.append((key, os.path.join(folder, file), None, None, os.path.join(folder, sidecar)))
    return records, report


def index_jsonl(manifest: str) -> tuple[list, SkipReport]:
    """Records of a jsonl manifest; bad lines and lines without image or text are skipped."""
    base = os.path.dirname(os.path.abspath(manifest))
    records, report = [], SkipReport()
    with open(manifest, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            name = f"{os.path.basename(manifest)}:{lineno}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                report.add(name, "invalid JSON")
                continue
            image = entry.get("image") if isinstance(entry, dict) else None
            if not isinstance(image, str):
                report.add(name, "no image path")
                continue
            text, text_zh = _caption_from_json(entry)
            if not text:
                report.add(image, "missing caption")
                continue
            records.append((image, os.path.join(base, image), text, text_zh, None))
    return records, report


# --------------------------------------------------------------------------- webdataset tars

@dataclass(frozen=True)
class TarMember:
    tar: str
    name: str
    offset: int
    size: int

    def read(self, handles: dict) -> bytes:
        f = handles.get(self.tar)
        if f is None:
            f = handles[self.tar] = open(self.tar, "rb")
        f.seek(self.offset)
        return f.read(self.size)


class TarSource(ImageTextSource):
    """Records (key, image TarMember, caption TarMember); members are read by offset."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._handles: dict = {}

    def read(self, record):
        key, image, caption = record
        try:
            raw = caption.read(self._handles).decode("utf-8")
            text, text_zh = _caption_from_json(json.loads(raw)) if caption.name.endswith(".json") else (raw, None)
            return key, image.read(self._handles), text, text_zh
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
            raise SkippedSample(f"unreadable sample: {err}") from err

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles = {}

    def record_name(self, record) -> str:
        return f"{os.path.basename(record[1].tar)}:{record[1].name}"

    def __getstate__(self):  # open files do not travel to DataLoader workers
        return {**self.__dict__, "_handles": {}}


def _split_key(member_name: str) -> tuple[str, str]:
    """webdataset convention: 'dir/000123.seg.jpg' -> ('dir/000123', 'seg.jpg')."""
    folder, base = os.path.split(member_name)
    stem, _, ext = base.partition(".")
    return os.path.join(folder, stem), ext.lower()


def index_tars(paths: list[str]) -> tuple[list, SkipReport]:
    """Group the members of each shard by key; keep samples with an image and a caption."""
    records, report = [], SkipReport()
    for path in paths:
        groups: dict[str, dict[str, TarMember]] = {}
        try:
            with tarfile.open(path, "r:") as tf:
                for m in tf:
                    if m.isfile():
                        key, ext = _split_key(m.name)
                        groups.setdefault(key, {})[ext] = TarMember(path, m.name, m.offset_data, m.size)
        except (tarfile.TarError, OSError) as err:
            report.add(os.path.basename(path), f"unreadable tar: {err}")
            continue
        for key, members in groups.items():
            image = next((members[e] for e in TAR_IMAGE_EXTENSIONS if e in members), None)
            caption = members.get("json", members.get("txt"))
            if image is None or caption is None:
                report.add(f"{os.path.basename(path)}:{key}", "no image" if image is None else "missing caption")
                continue
            records.append((key, image, caption))
    return records, report


def expand_braces(pattern: str) -> list[str]:
    """'a{00..02}b' -> ['a00b', 'a01b', 'a02b'] (zero padding kept); 'a{x,y}' -> ['ax', 'ay']."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}|\{([^{}]*,[^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    if m.group(3) is not None:
        options = m.group(3).split(",")
    else:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        options = [str(i).zfill(width) for i in range(lo, hi + 1)]
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [p for o in options for p in expand_braces(head + o + tail)]


def _tar_paths(spec: str) -> list[str]:
    if "{" in spec:
        paths = expand_braces(spec)
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise MarsError(f"data shard not found: {missing[0]} (from {spec})")
    elif any(c in spec for c in "*?["):
        paths = sorted(glob.glob(spec))
    else:
        paths = [spec] if os.path.isfile(spec) else []
    if not paths:
        raise MarsError(f"data source matches nothing: {spec}")
    not_tar = [p for p in paths if not p.endswith(".tar")]
    if not_tar:
        raise MarsError(f"expected webdataset .tar shards, got {not_tar[0]} (from {spec})")
    return paths


# --------------------------------------------------------------------------- MARS-Shapes on the fly

READING_ORDER_SUFFIX = ":reading-order"


class ShapesSource(ImageTextSource):
    """Records are indices of the seeded training stream (same samples as `mars data shapes`)."""

    def __init__(self, n: int, data_seed: int, resolution: int, reading_order: bool = False, **kwargs):
        name = f"shapes:{n}:{data_seed}" + (READING_ORDER_SUFFIX if reading_order else "")
        super().__init__(name, list(range(n)), resolution, **kwargs)
        self.data_seed = data_seed
        self.reading_order = reading_order

    def read(self, index):
        scene, text, text_zh = shapes_example(self.data_seed, index, "train", self.reading_order)
        return f"shapes-{self.data_seed}-{index:08d}", render_scene(scene, self.resolution), text, text_zh

    def record_name(self, record) -> str:
        return f"shapes sample {record}"


def parse_shapes_spec(spec: str, prefix: str = "shapes") -> tuple[int, int]:
    """(N, SEED) of a `shapes:N[:SEED]` spec (SEED defaults to 0); `prefix` names other sources of
    the same form (`canonical:N:SEED` prompts of `mars preferences`)."""
    parts = spec.split(":")
    form = f"{prefix}:N or {prefix}:N:SEED"
    if prefix == "shapes":
        form += f" (or {prefix}:N:SEED{READING_ORDER_SUFFIX})"
    try:
        n, seed = int(parts[1]), int(parts[2]) if len(parts) > 2 else 0
    except (ValueError, IndexError):
        raise MarsError(f"bad {prefix} spec {spec!r}; expected {form}") from None
    if parts[0] != prefix or len(parts) > 3 or n <= 0:
        raise MarsError(f"bad {prefix} spec {spec!r}; expected {form} with N > 0")
    return n, seed


# --------------------------------------------------------------------------- entry point

def open_source(spec: str, resolution: int, *, rank: int = 0, world_size: int = 1, shuffle: bool = False,
                seed: int = 0, min_side: int = MIN_SIDE) -> ImageTextSource:
    """Open a data source (see the module docstring for the spec forms).

    rank / world_size select this process's share; DataLoader workers split it further.
    shuffle permutes all records with random.Random(f"{seed}/{epoch}") before sharding
    (call `set_epoch` for a new order), so the shards still cover every sample exactly once.
    """
    options = dict(rank=rank, world_size=world_size, shuffle=shuffle, seed=seed, min_side=min_side)
    if spec.startswith("shapes:"):
        reading_order = spec.endswith(READING_ORDER_SUFFIX)
        n, data_seed = parse_shapes_spec(spec.removesuffix(READING_ORDER_SUFFIX))
        return ShapesSource(n, data_seed, resolution, reading_order=reading_order, **options)
    if os.path.isdir(spec):
        manifest = os.path.join(spec, "captions.jsonl")
        if os.path.isfile(manifest):
            records, report = index_jsonl(manifest)
        else:
            records, report = index_folder(spec)
        return FileSource(spec, records, resolution, index_report=report, **options)
    if spec.endswith(".jsonl"):
        if not os.path.isfile(spec):
            raise MarsError(f"data source not found: {spec}")
        records, report = index_jsonl(spec)
        return FileSource(spec, records, resolution, index_report=report, **options)
    if spec.endswith(".tar") or any(c in spec for c in "*?[{"):
        records, report = index_tars(_tar_paths(spec))
        return TarSource(spec, records, resolution, index_report=report, **options)
    raise MarsError(f"data source not found: {spec} (expected a folder, a .jsonl manifest, "
                    f".tar shards or shapes:N[:SEED])")
