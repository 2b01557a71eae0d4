"""Weight averaging of MARS models that share one architecture (checkpoint averaging, "model soups").

    mars average runs/a/final runs/b/final --out runs/soup [--weights 0.5 0.5]

Models fine-tuned from a common ancestor sit in one basin of the loss, and the average of their
weights often generalises better than either (Wortsman et al., 2022, "Model soups"). The built-in
model is such an average (docs/shapes-demo.md "The GPU preset").

The averaged folder gets the first model's config.json and its other files (tokenizer/, vq/,
generation_config.json); every model must have the same config and the same tensor names and
shapes. Floating-point tensors are averaged in fp32 and stored in the first model's dtypes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from mars.errors import MarsError
from mars.model.semvie import load_model_config
from mars.model.weights import SAFE_INDEX, load_weights, save_weights

def _check_same_tensors(state: dict[str, torch.Tensor], first: dict[str, torch.Tensor], name: str,
                        first_name: str) -> None:
    if state.keys() != first.keys():
        differ = sorted(state.keys() ^ first.keys())
        raise MarsError(f"{name} and {first_name} hold different tensors (e.g. {differ[0]})")
    for key, tensor in first.items():
        if state[key].shape != tensor.shape:
            raise MarsError(f"tensor {key} has shape {tuple(state[key].shape)} in {name} "
                            f"but {tuple(tensor.shape)} in {first_name}")
        if not tensor.is_floating_point() and not torch.equal(state[key], tensor):
            raise MarsError(f"integer tensor {key} differs between {name} and {first_name}: it cannot be averaged")


def average_weights(models: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_i weights[i] * (model i's tensors), accumulated in fp32 one model at a time (so memory
    holds two models, not all of them) and cast back to the first model's dtypes; integer tensors
    must be equal and are kept."""
    first = load_weights(models[0])
    total = {k: weights[0] * v.float() if v.is_floating_point() else v for k, v in first.items()}
    for model, weight in zip(models[1:], weights[1:]):
        state = load_weights(model)
        _check_same_tensors(state, first, str(model), str(models[0]))
        for key, tensor in state.items():
            if tensor.is_floating_point():
                total[key] += weight * tensor.float()
        del state
    return {k: v.to(first[k].dtype) for k, v in total.items()}


def average_models(models: list[str | Path], out: str | Path, weights: list[float] | None = None,
                   overwrite: bool = False) -> Path:
    """Write the weighted average of model folders `models` to `out` (weights default to uniform
    and must sum to 1). Returns `out`."""
    models = [Path(m) for m in models]
    out = Path(out)
    if len(models) < 2:
        raise MarsError("averaging needs at least two models")
    weights = [1.0 / len(models)] * len(models) if weights is None else [float(w) for w in weights]
    if len(weights) != len(models):
        raise MarsError(f"{len(weights)} weights for {len(models)} models")
    if any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
        raise MarsError(f"weights must be >= 0 and sum to 1, got {weights}")
    if out.exists() and not overwrite:
        raise MarsError(f"{out} exists; pass --overwrite to replace it")
    if out.resolve() in {m.resolve() for m in models}:
        raise MarsError(f"--out {out} is one of the models being averaged")
    configs = [load_model_config(m) for m in models]  # checks each is a MARS model folder
    for model, config in zip(models[1:], configs[1:]):
        if dataclasses.replace(config, name=configs[0].name) != configs[0]:  # the name is only a label
            raise MarsError(f"{model} and {models[0]} have different configs (config.json): "
                            "only models of one architecture can be averaged")
    state = average_weights(models, weights)

    tmp = out.parent / f".tmp-{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    top = str(models[0])

    def not_the_weights(folder: str, entries: list[str]) -> set[str]:  # vq/ keeps its own weights
        if folder != top:
            return set()
        return {e for e in entries if e.endswith(".safetensors") or e in (SAFE_INDEX, "eval.json")}

    shutil.copytree(models[0], tmp, ignore=not_the_weights)
    save_weights(state, tmp)
    (tmp / "averaged_from.json").write_text(
        json.dumps({"models": [str(m) for m in models], "weights": weights}, indent=1) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
