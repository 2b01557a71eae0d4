"""Code shards: the on-disk form of a preprocessed data set, and the map-style dataset that reads it.

`mars preprocess` (mars/data/preprocess.py) writes

    OUT/preprocess.json          the settings of the run (written first; a resumed run must match)
    OUT/shard-00000/             one folder per shard, renamed into place when complete
        codes.npy                (N, h*w) uint16   VQ codes in raster order
        text.npy                 (sum of lengths,) int32   English caption ids, concatenated
        text_offsets.npy         (N + 1,) int64    sample j's ids are text[off[j]:off[j+1]]
        text_zh.npy              int32             Chinese caption ids (length 0 = no Chinese caption)
        text_zh_offsets.npy      (N + 1,) int64
        meta.json                count, keys, raw captions, the shard's skip report
    OUT/index.json               written last: settings + samples per shard + total + skip report

Every array is a plain .npy file, so a shard is memory-mapped (`np.load(mmap_mode="r")`) and only
the pages of the samples actually read are touched.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mars.errors import MarsError

FORMAT = "mars-code-shards"
VERSION = 1
INDEX_FILE = "index.json"
SETTINGS_FILE = "preprocess.json"
META_FILE = "meta.json"


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def _offsets(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged id lists -> (flat int32 ids, int64 offsets of length len(rows) + 1)."""
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((i for r in rows for i in r), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


def write_shard(out: Path, shard: int, samples: list[dict], skipped: int, skip_examples: list) -> None:
    """Write one complete shard atomically: build it under a temporary name, then rename it.

    `samples` are dicts with codes (h*w,) uint16, text_ids, text_zh_ids (list or None), key,
    text, text_zh. A killed run leaves at most a `.tmp` folder, which the next run deletes.
    """
    tmp = out / f"{shard_name(shard)}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    grid_len = samples[0]["codes"].shape[0] if samples else 0
    codes = np.stack([s["codes"] for s in samples]) if samples else np.zeros((0, grid_len), np.uint16)
    np.save(tmp / "codes.npy", codes.astype(np.uint16, copy=False))
    for field, name in (("text_ids", "text"), ("text_zh_ids", "text_zh")):
        flat, offsets = _offsets([s[field] or [] for s in samples])
        np.save(tmp / f"{name}.npy", flat)
        np.save(tmp / f"{name}_offsets.npy", offsets)
    meta = {
        "count": len(samples),
        "skipped": skipped,
        "skip_examples": [list(e) for e in skip_examples],
        "keys": [s["key"] for s in samples],
        "texts": [s["text"] for s in samples],
        "texts_zh": [s["text_zh"] for s in samples],
    }
    (tmp / META_FILE).write_text(json.dumps(meta, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / shard_name(shard))  # a folder rename is atomic; the target does not exist


def read_shard_meta(out: Path, shard: int) -> dict:
    return json.loads((out / shard_name(shard) / META_FILE).read_text(encoding="utf-8"))


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class _Shard:
    """The arrays of one shard, memory-mapped on first use (so DataLoader workers map their own)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        self.codes = np.load(folder / "codes.npy", mmap_mode="r")  # (N, h*w) uint16
        self.text = np.load(folder / "text.npy", mmap_mode="r")
        self.text_offsets = np.load(folder / "text_offsets.npy")  # small: read whole
        self.text_zh = np.load(folder / "text_zh.npy", mmap_mode="r")
        self.text_zh_offsets = np.load(folder / "text_zh_offsets.npy")


class CodeShardDataset(Dataset):
    """The samples of a preprocessed folder, in sample order (shard 0 first).

    `ds[i]` -> {"codes": LongTensor (h*w,) VQ codes (not vocabulary ids), "text_ids": list[int],
    "text_zh_ids": list[int] | None, "key": str, "text": str, "text_zh": str | None}.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index_path = self.directory / INDEX_FILE
        if not index_path.is_file():
            hint = (" (preprocessing has not finished: rerun `mars preprocess` with the same arguments)"
                    if (self.directory / SETTINGS_FILE).is_file() else "")
            raise MarsError(f"no {INDEX_FILE} in {self.directory}{hint}")
        self.index = json.loads(index_path.read_text(encoding="utf-8"))
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise MarsError(f"{index_path} is not a {FORMAT} v{VERSION} index")
        counts = [s["count"] for s in self.index["shards"]]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).tolist()  # sample index of each shard's first
        self._shards: dict[int, _Shard] = {}

    # --- what the folder holds ---------------------------------------------------------------
    @property
    def resolution(self) -> int:
        return self.index["resolution"]

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the code grid; each sample has h * w codes."""
        return tuple(self.index["grid"])

    @property
    def vq_hash(self) -> str:
        return self.index["vq_hash"]

    @property
    def text_tokenizer(self) -> dict:
        """{"kind", "vocab_size", "eos_id"} of the text tokenizer that made the ids."""
        return self.index["text_tokenizer"]

    def __len__(self) -> int:
        return self._starts[-1]

    def _shard(self, shard: int) -> _Shard:
        if shard not in self._shards:
            self._shards[shard] = _Shard(self.directory / self.index["shards"][shard]["name"])
        return self._shards[shard]

    def captions(self) -> list[tuple[str, str | None]]:
        """(English, Chinese or None) caption of every sample, in sample order, from the shards'
        metadata alone (no codes read)."""
        return [pair for k in range(len(self.index["shards"]))
                for pair in zip(self._shard(k).meta["texts"], self._shard(k).meta["texts_zh"])]

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        i %= len(self)
        shard = bisect.bisect_right(self._starts, i) - 1
        s, j = self._shard(shard), i - self._starts[shard]
        zh_lo, zh_hi = int(s.text_zh_offsets[j]), int(s.text_zh_offsets[j + 1])
        return {
            "codes": torch.from_numpy(s.codes[j].astype(np.int64)),  # (h*w,)
            "text_ids": s.text[s.text_offsets[j]:s.text_offsets[j + 1]].tolist(),
            "text_zh_ids": s.text_zh[zh_lo:zh_hi].tolist() if zh_hi > zh_lo else None,
            "key": s.meta["keys"][j],
            "text": s.meta["texts"][j],
            "text_zh": s.meta["texts_zh"][j],
        }


def open_shards(directory: str | Path, expect_vq_hash: str | None = None,
                expect_text_tokenizer=None, expect_image_tokens: int | None = None,
                expect_vq_codes_hash: str | None = None) -> CodeShardDataset:
    """Open a preprocessed folder, checking that it was made with the tokenizers in use.

    `expect_vq_hash` is the VQ tokenizer's `identity_hash()`; another tokenizer is accepted when
    `expect_vq_codes_hash` (its `codes_hash()`) equals the shards' (same codes, another decoder,
    e.g. after decoder-only tuning); `expect_text_tokenizer` a
    TextTokenizer; `expect_image_tokens` the model's codes per image. A mismatch raises MarsError:
    codes of another tokenizer would train garbage.
    """
    dataset = CodeShardDataset(directory)
    grid_len = dataset.grid[0] * dataset.grid[1]
    if expect_image_tokens is not None and grid_len != expect_image_tokens:
        raise MarsError(f"{directory} holds {grid_len} codes per image but the model is set for "
                        f"{expect_image_tokens}; use shards encoded at the model's image size (when "
                        "training, model_overrides.image_size can change the model's)")
    same_codes = expect_vq_codes_hash is not None and dataset.index.get("vq_codes_hash") == expect_vq_codes_hash
    if expect_vq_hash is not None and dataset.vq_hash != expect_vq_hash and not same_codes:
        raise MarsError(f"{directory} was encoded with VQ tokenizer {dataset.vq_hash}, but the model's "
                        f"tokenizer is {expect_vq_hash}; rerun `mars preprocess` with this tokenizer")
    if expect_text_tokenizer is not None:
        made = dataset.text_tokenizer
        now = expect_text_tokenizer.identity()
        if made != now:
            raise MarsError(f"{directory} was tokenized with text tokenizer {made}, but the model uses {now}")
    return dataset
