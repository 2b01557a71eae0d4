"""Offline preprocessing: images -> VQ codes, captions -> text ids, written as code shards.

    mars preprocess --tokenizer runs/vq/final --text-tokenizer qwen --data shapes:100000 --out data/codes

Sample i of the data source (its i-th record, in the source's fixed order) belongs to shard
i // shard_size, and each shard is encoded in fixed batches of its own samples. So a shard's bytes
depend only on (data, settings, shard number): a resumed run, a run split over torchrun ranks
(rank r takes the shards s with s % world == r) and a single-process run write identical shards.
Finished shards are kept; the one a kill interrupted is redone from scratch. The layout is in
mars/data/shards.py.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mars.data.datasets import ImageTextSource, SkippedSample, SkipReport, open_source
from mars.data.images import UnusableImage, pil_to_tensor
from mars.data.shards import (FORMAT, INDEX_FILE, SETTINGS_FILE, VERSION, read_shard_meta, shard_name,
                              write_json_atomic, write_shard)
from mars.errors import MarsError
from mars.text_tokenizer import TextTokenizer


# Names of what a run writes (incl. temporary names); --overwrite deletes these and nothing else.
OWN_PREFIXES = (INDEX_FILE, SETTINGS_FILE, "shard-")


@dataclass
class PreprocessResult:
    """What one call did: shards it wrote, images it encoded, time spent, and the skip report
    (of the whole data set when `index_written`, else of the shards this call wrote)."""

    shards_written: int
    images: int
    seconds: float
    skips: SkipReport
    index_written: bool

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class _Records(Dataset):
    """Record i of a source, read and resized: a sample dict, or {"index", "skip": (name, reason)}.

    Map-style so DataLoader workers can read any batch of records in parallel; the source's own
    iteration splits records round-robin, which would not keep shards contiguous.
    """

    def __init__(self, source: ImageTextSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source.records)

    def __getitem__(self, i: int) -> dict:
        record = self.source.records[i]
        try:
            sample = self.source.read_sample(record)
        except (SkippedSample, UnusableImage) as err:
            return {"index": i, "skip": (self.source.record_name(record), str(err))}
        return {"index": i, "key": sample["key"], "image": pil_to_tensor(sample["image"]),  # (3, H, W)
                "text": sample["text"], "text_zh": sample["text_zh"]}


SETTINGS_ADDED_LATER = ("vq_codes_hash",)  # a run started before a setting existed still resumes


def _settings(vq, text_tokenizer: TextTokenizer, data: str, resolution: int, shard_size: int,
              num_records: int) -> dict:
    """Everything the shards' bytes depend on; a resumed run must have the same."""
    downsample = vq.config.downsample
    if resolution % downsample:
        raise MarsError(f"--resolution {resolution} is not a multiple of the tokenizer's downsampling {downsample}")
    if vq.config.codebook_size > 2 ** 16:
        raise MarsError(f"codebook of {vq.config.codebook_size} codes does not fit the uint16 shards")
    grid = resolution // downsample
    return {
        "format": FORMAT, "version": VERSION, "data": data, "num_records": num_records,
        "resolution": resolution, "grid": [grid, grid], "shard_size": shard_size,
        "num_shards": math.ceil(num_records / shard_size),
        "codebook_size": vq.config.codebook_size, "vq_hash": vq.identity_hash(),
        "vq_codes_hash": vq.codes_hash(),
        "text_tokenizer": text_tokenizer.identity(),
    }


def _prepare_out(out: Path, settings: dict, overwrite: bool, world: int) -> None:
    """Create `out`, or check that it holds a run with the same settings (to resume it)."""
    settings_path = out / SETTINGS_FILE
    if overwrite and out.exists():
        if world > 1:
            raise MarsError("--overwrite with several ranks would race; clear the folder with one "
                            "process first (or delete it)")
        for path in out.iterdir():
            if path.name.startswith(OWN_PREFIXES):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    if settings_path.is_file():
        before = json.loads(settings_path.read_text(encoding="utf-8"))
        compared = [k for k in settings if k in before or k not in SETTINGS_ADDED_LATER]
        changed = [k for k in compared if before.get(k) != settings[k]]
        if changed:
            k = changed[0]
            raise MarsError(f"{out} holds a preprocessing run with {k}={before.get(k)!r}, not {settings[k]!r}; "
                            "pass --overwrite to start over, or choose another --out")
        return
    # Ranks start together: another rank may be writing the settings right now (its temporary
    # file is all there is), so only files that are not ours make the folder someone else's.
    if not overwrite and out.exists() and any(not p.name.startswith(OWN_PREFIXES) for p in out.iterdir()):
        raise MarsError(f"{out} is not empty and holds no preprocessing run; choose another --out "
                        "or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(settings_path, settings)


def _shard_batches(shard: int, shard_size: int, num_records: int, batch_size: int) -> list[list[int]]:
    """Record indices of each encoder batch of one shard: fixed runs that never cross shards."""
    start, stop = shard * shard_size, min((shard + 1) * shard_size, num_records)
    return [list(range(i, min(i + batch_size, stop))) for i in range(start, stop, batch_size)]


def _encode_batch(vq, text_tokenizer: TextTokenizer, items: list[dict], grid_len: int) -> list[dict]:
    """Readable items of one batch -> shard samples (codes uint16 (h*w,), text ids)."""
    if not items:
        return []
    images = torch.stack([x["image"] for x in items])  # (B, 3, H, W) in [-1, 1]
    codes = vq.encode_to_codes(images).reshape(len(items), -1).cpu()  # (B, h*w) raster order
    if codes.shape[1] != grid_len:
        raise MarsError(f"the tokenizer made {codes.shape[1]} codes per image, expected {grid_len}")
    codes = codes.numpy().astype(np.uint16)
    return [{"codes": c, "key": x["key"], "text": x["text"], "text_zh": x["text_zh"],
             "text_ids": text_tokenizer.encode(x["text"]),
             "text_zh_ids": text_tokenizer.encode(x["text_zh"]) if x["text_zh"] else None}
            for c, x in zip(codes, items)]


def _write_index(out: Path, settings: dict, index_report: SkipReport) -> SkipReport | None:
    """Write index.json if every shard is done (whichever rank finishes last does it)."""
    num_shards = settings["num_shards"]
    if not all((out / shard_name(s)).is_dir() for s in range(num_shards)):
        return None
    metas = [read_shard_meta(out, s) for s in range(num_shards)]
    report = index_report.copy()
    report.total = index_report.skipped + settings["num_records"]
    for meta in metas:
        report.skipped += meta["skipped"]
        room = report.max_examples - len(report.examples)
        report.examples += [tuple(e) for e in meta["skip_examples"][:max(room, 0)]]
    index = {
        **settings,
        "num_samples": sum(m["count"] for m in metas),
        "shards": [{"name": shard_name(s), "count": m["count"]} for s, m in enumerate(metas)],
        "skips": {"total": report.total, "skipped": report.skipped, "examples": [list(e) for e in report.examples]},
    }
    write_json_atomic(out / INDEX_FILE, index)
    return report


def preprocess(vq, text_tokenizer: TextTokenizer, data: str, out: str | Path, *, resolution: int = 256,
               shard_size: int = 4096, batch_size: int = 32, workers: int = 0, rank: int = 0,
               world_size: int = 1, overwrite: bool = False, progress: bool = True) -> PreprocessResult:
    """Encode the data source `data` (any `open_source` spec) into code shards under `out`.

    `vq` needs `encode_to_codes`, `identity_hash()`, `codes_hash()` and `config.codebook_size/downsample`.
    This process handles the shards s with s % world_size == rank that are not finished yet;
    `workers` DataLoader processes read and resize images. Re-running with the same arguments
    resumes; `overwrite` deletes an earlier run's shards first.
    """
    if shard_size < 1 or batch_size < 1 or workers < 0:
        raise MarsError("--shard-size and --batch-size must be >= 1 and --workers >= 0")
    if not 0 <= rank < world_size:
        raise MarsError(f"rank {rank} is not in [0, {world_size})")
    out = Path(out)
    source = open_source(data, resolution)
    num_records = len(source.records)
    settings = _settings(vq, text_tokenizer, data, resolution, shard_size, num_records)
    _prepare_out(out, settings, overwrite, world_size)
    grid_len = settings["grid"][0] * settings["grid"][1]

    todo = [s for s in range(rank, settings["num_shards"], world_size) if not (out / shard_name(s)).is_dir()]
    plan = {s: _shard_batches(s, shard_size, num_records, batch_size) for s in todo}
    batches = [b for s in todo for b in plan[s]]
    loader = DataLoader(_Records(source), batch_sampler=batches, num_workers=workers, collate_fn=list)
    bar = tqdm(total=sum(len(b) for b in batches), unit="img", desc=f"preprocess rank {rank}" if world_size > 1
               else "preprocess", disable=not progress)

    was_training = getattr(vq, "training", False)
    if was_training:
        vq.eval()
    report, images, start = SkipReport(), 0, time.perf_counter()
    try:
        batch_iter = iter(loader)
        for s in todo:
            samples, skipped, examples = [], 0, []
            for _ in plan[s]:
                items = next(batch_iter)  # the loader yields the batches of `plan` in order
                for x in items:
                    if "skip" in x:
                        skipped += 1
                        report.add(*x["skip"])
                        if len(examples) < report.max_examples:
                            examples.append(x["skip"])
                readable = [x for x in items if "skip" not in x]
                with torch.inference_mode():
                    samples += _encode_batch(vq, text_tokenizer, readable, grid_len)
                images += len(readable)
                bar.update(len(items))
            write_shard(out, s, samples, skipped, examples)
    finally:
        bar.close()
        source.close()
        if was_training:
            vq.train()
    seconds = time.perf_counter() - start
    report.total = sum(len(b) for b in batches)
    full_report = _write_index(out, settings, source.index_report)
    return PreprocessResult(len(todo), images, seconds, full_report or report, full_report is not None)
