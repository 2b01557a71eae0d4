"""Training checkpoints: written under a temporary name and renamed, so a kill never leaves a torn one.

    OUT/checkpoints/step_00000100/
        state/              model + optimizer, DCP format (one file per rank + .metadata)
        rng/rank00000.json  python, numpy, torch and CUDA RNG states of each rank
        meta.json           step, stage, data position, scheduler, model config, train config

A checkpoint holds the FULL model, frozen weights included: it resumes without `init_from` (which
may have moved or changed) and loads on its own (`load_checkpoint_model`); the price is disk space
(about 2x the trainable part). A folder named `step_*` is complete by construction: it is
written as `.tmp-step_*` and renamed only after every rank finished writing. Our files are JSON;
tensors are DCP's (loaded with `weights_only=True`), but DCP's own `.metadata` index is a pickle
written by torch: resume only from checkpoints you wrote (released models use `save_pretrained`).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from mars.config import SemVIEConfig, from_dict
from mars.errors import MarsError
from mars.model.weights import atomic_write_text
from mars.train import parallel
from mars.train.parallel import DistEnv

PREFIX = "step_"
TMP_PREFIX = ".tmp-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


# --- RNG states as JSON --------------------------------------------------------------------------


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *[float(x) if isinstance(x, float) else int(x) for x in np_state[2:]]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# --- save / load -----------------------------------------------------------------------------------


def save_checkpoint(root: str | Path, step: int, model, optimizer, scheduler, meta: dict, env: DistEnv,
                    keep_last: int) -> Path:
    """Write checkpoint `step` atomically (a collective: every rank calls it), keep the last K."""
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if env.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
    parallel.barrier(env)
    parallel.save_train_state(str(tmp / "state"), model, optimizer)
    atomic_write_text(tmp / "rng" / f"rank{env.rank:05d}.json", json.dumps(rng_state()))
    parallel.barrier(env)  # every rank's files are in place
    if env.is_main:
        full_meta = {**meta, "step": step, "world_size": env.world_size, "scheduler": scheduler.state_dict()}
        atomic_write_text(tmp / "meta.json", json.dumps(full_meta, indent=1, ensure_ascii=False) + "\n")
        if final.exists():  # re-saving a step (a run resumed from an older checkpoint)
            shutil.rmtree(final)
        tmp.rename(final)  # the commit point
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    parallel.barrier(env)
    return final


def load_checkpoint(path: str | Path, model, optimizer, scheduler, env: DistEnv) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from `path`; returns its meta."""
    path = Path(path)
    meta = read_meta(path)
    parallel.load_train_state(str(path / "state"), model, optimizer)
    scheduler.load_state_dict(meta["scheduler"])
    rng_file = path / "rng" / f"rank{env.rank:05d}.json"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: data does not use RNG
        set_rng_state(json.loads(rng_file.read_text(encoding="utf-8")))
    return meta


def read_meta(path: str | Path) -> dict:
    file = Path(path) / "meta.json"
    if not file.is_file():
        raise MarsError(f"{path} is not a complete training checkpoint (no meta.json)")
    return json.loads(file.read_text(encoding="utf-8"))


def load_checkpoint_model(path: str | Path, device: str = "cpu"):
    """The model of a training checkpoint, in one process, whatever number of ranks wrote it."""
    from mars.model.semvie import SemVIE

    config = from_dict(SemVIEConfig, read_meta(path)["model_config"])
    model = SemVIE(config).to(device)
    parallel.load_train_state(str(Path(path) / "state"), model, None)
    return model


def clean_partial(root: str | Path) -> None:
    """Remove `.tmp-*` folders a killed run left behind (rank 0, before training)."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p)
