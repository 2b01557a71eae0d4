"""torchrun with 2 CPU ranks (gloo, FSDP2) reproduces one process with the same global batch.

About 15-30 s on the shared 2-core machine (two extra Python processes)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mars.train.checkpoint import list_checkpoints, load_checkpoint_model

from .conftest import DEBUG, FAST, ROOT, read_metrics, run_stage, subprocess_env


def test_torchrun_two_ranks_matches_one_process(tmp_path):
    common = ["max_steps=6", "save_every=3"]
    _, single = run_stage("stage1", tmp_path / "one", *common)  # micro_batch_size 8: one micro-batch

    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "mars.cli", "train",
           str(DEBUG / "stage1.yaml"), f"out_dir={out}", *FAST, *common, "micro_batch_size=4"]
    result = subprocess.run(cmd, check=False, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    double = read_metrics(out)
    assert [m["step"] for m in double] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(single, double):
        assert a["task"] == b["task"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)

    # The sharded (2-rank) checkpoint loads in one process and matches the one-process run.
    two = load_checkpoint_model(list_checkpoints(out / "checkpoints")[-1]).state_dict()
    one = load_checkpoint_model(list_checkpoints(tmp_path / "one" / "checkpoints")[-1]).state_dict()
    assert two.keys() == one.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
