"""Checkpoints: atomic (a kill never leaves a torn one), keep-last-K, exact resume after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mars.model.semvie import SemVIE
from mars.train import checkpoint, parallel
from mars.train.checkpoint import list_checkpoints, load_checkpoint_model

from .conftest import DEBUG, FAST, ROOT, read_metrics, run_stage, subprocess_env


def test_keep_last_and_every_checkpoint_loads(tmp_path):
    out = tmp_path / "run"
    run_stage("stage1", out, "max_steps=5", "save_every=1", "keep_last=2")
    names = [p.name for p in list_checkpoints(out / "checkpoints")]
    assert names == ["step_00000004", "step_00000005"]
    meta = checkpoint.read_meta(out / "checkpoints" / names[-1])
    assert meta["step"] == 5 and meta["stage"] == "stage1" and meta["data_position"] == {"step": 5}
    assert meta["train_config"]["max_steps"] == 5 and meta["world_size"] == 1
    saved = SemVIE.from_pretrained(out / "final").state_dict()
    loaded = load_checkpoint_model(out / "checkpoints" / names[-1]).state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)  # a checkpoint holds the full model


def test_crash_while_saving_leaves_no_checkpoint_and_resume_uses_the_previous(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = parallel.save_train_state
    calls = []

    def crash_on_second(directory, model, optimizer):
        calls.append(directory)
        real_save(directory, model, optimizer)  # the files are written ...
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")  # ... but the process dies before the rename

    monkeypatch.setattr(parallel, "save_train_state", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_stage("stage1", out, "max_steps=6", "save_every=2")
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000002"]
    assert (out / "checkpoints" / ".tmp-step_00000004").is_dir()  # the partial write is only a temp dir
    monkeypatch.setattr(parallel, "save_train_state", real_save)
    run_stage("stage1", out, "max_steps=6", "save_every=2", "resume=auto")
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert not any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir())


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    steps, every = 40, 4
    common = [f"max_steps={steps}", f"save_every={every}", "keep_last=3"]
    reference = run_stage("stage1", tmp_path / "ref", *common)[1]

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mars.cli", "train", str(DEBUG / "stage1.yaml"), f"out_dir={out}", *FAST, *common]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 10:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(read_metrics(out))
    assert 10 <= done < steps

    complete = list_checkpoints(out / "checkpoints")
    assert complete and 8 <= checkpoint.read_meta(complete[-1])["step"] <= done  # resume starts mid-run
    for path in complete:  # nothing torn: every complete-looking checkpoint loads
        load_checkpoint_model(path)

    run_stage("stage1", out, *common, "resume=auto")
    resumed = read_metrics(out)
    assert [m["step"] for m in resumed] == list(range(1, steps + 1))
    for a, b in zip(reference, resumed):
        assert a["task"] == b["task"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-6), a["step"]
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12)

