"""CPU training runs treat subnormal floats as zero (they slow x86 arithmetic ~100x)."""

from __future__ import annotations

import torch

from mars.cpu import flush_denormals
from mars.vq.train import Trainer as VQTrainer

from .train.conftest import run_stage
from .vq.test_train import shapes_images, tiny_cfg

SUBNORMAL = torch.finfo(torch.float32).tiny / 4


def _flushes() -> bool:
    return (torch.tensor([SUBNORMAL]) * 1.0).item() == 0.0


def test_flush_denormals_turns_subnormal_results_into_zero():
    try:
        torch.set_flush_denormal(False)
        assert not _flushes()
        assert flush_denormals()
        assert _flushes()
        assert (torch.tensor([1e-30]) * 1e-3).item() > 0  # normal results are untouched
    finally:
        torch.set_flush_denormal(False)


def test_a_cpu_training_run_flushes_denormals(tmp_path):
    try:
        torch.set_flush_denormal(False)
        run_stage("stage1", tmp_path / "run", "max_steps=1", "save_every=0")
        assert _flushes()
    finally:
        torch.set_flush_denormal(False)


def test_a_cpu_vq_trainer_flushes_denormals(tmp_path):
    try:
        torch.set_flush_denormal(False)
        VQTrainer(tiny_cfg(tmp_path), images=shapes_images(4), progress=False)
        assert _flushes()
    finally:
        torch.set_flush_denormal(False)
