"""Helpers for the trainer tests: run a debug stage in this process and read what it wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mars.train.config import load_train_config
from mars.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "configs" / "debug"
# Small and quiet: a 16-scene synthetic data set, no tensorboard.
FAST = ["data.synthetic=16", "tensorboard=false"]


def run_stage(config: str, out: Path, *overrides: str) -> tuple[Path, list[dict]]:
    """Train `configs/debug/<config>.yaml` into `out`; returns (final folder, metrics lines)."""
    cfg = load_train_config(DEBUG / f"{config}.yaml", [f"out_dir={out}", *FAST, *overrides])
    final = Trainer(cfg).run()
    return final, read_metrics(out)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    """A writable copy of the shared tiny model folder (weights, tokenizer/, vq/)."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "init"))



def subprocess_env() -> dict:
    """Environment for `python -m mars.cli` / torchrun children: one thread each, no tqdm noise."""
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
