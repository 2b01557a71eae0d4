"""Reading and writing weight files: safetensors (single or sharded with an index) and `.bin`.

Nothing here unpickles arbitrary objects: `.bin` files load with `torch.load(weights_only=True)`.
Writes go to a temporary name first and are renamed into place, so a kill never leaves a torn file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mars.errors import MarsError

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


def _load_one(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            return load_file(str(file))
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MarsError(f"cannot read weights file {file}: {reason}") from None
    except Exception as err:  # unpickling refused by weights_only, or a format we do not know
        raise MarsError(f"cannot read weights file {file} safely ({type(err).__name__}): {str(err).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MarsError(f"{file} does not hold a flat mapping of names to tensors")
    return state


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files of a checkpoint folder (or a single file), in index order."""
    path = Path(folder)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise MarsError(f"checkpoint folder not found: {path}")
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise MarsError(f"{index} is not a valid weight index (no weight_map)") from None
            files = [path / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise MarsError(f"{index} names shard {missing[0]}, which is missing")
            return files
    for single in (SAFE_SINGLE, BIN_SINGLE):
        if (path / single).is_file():
            return [path / single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise MarsError(f"no weights in {path} (expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX})")


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder or file, merged into one state dict."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        part = _load_one(file)
        clash = next((k for k in part if k in state), None)
        if clash is not None:
            raise MarsError(f"tensor {clash} appears in more than one shard of {folder}")
        state.update(part)
    return state


def save_weights(state: dict[str, torch.Tensor], folder: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Save `state` as `model.safetensors`, or as shards + `model.safetensors.index.json` when it is
    larger than `max_shard_bytes`. Every file is written under a temporary name and renamed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        _atomic_save(shards[0], folder / SAFE_SINGLE)
        (folder / SAFE_INDEX).unlink(missing_ok=True)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save(shard, folder / name)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_text(folder / SAFE_INDEX, json.dumps(index, indent=2) + "\n")
    (folder / SAFE_SINGLE).unlink(missing_ok=True)


def _atomic_save(tensors: dict[str, torch.Tensor], file: Path) -> None:
    tmp = file.with_name(file.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, file)


def atomic_write_text(file: str | Path, text: str) -> None:
    file = Path(file)
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, file)


def check_state_dict(expected: dict[str, torch.Size], got: dict[str, torch.Tensor], source: str) -> None:
    """Raise a one-line MarsError naming the first missing, unexpected or mis-shaped tensor."""
    missing = [k for k in expected if k not in got]
    if missing:
        raise MarsError(f"{source}: missing tensor {missing[0]} ({len(missing)} missing in all)")
    unexpected = [k for k in got if k not in expected]
    if unexpected:
        raise MarsError(f"{source}: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected in all)")
    for name, shape in expected.items():
        if tuple(got[name].shape) != tuple(shape):
            raise MarsError(f"{source}: tensor {name} has shape {tuple(got[name].shape)}, expected {tuple(shape)}")
