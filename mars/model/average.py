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

import json
import shutil
from pathlib import Path

import torch

from mars.errors import MarsError
from mars.model.semvie import load_model_config
from mars.model.weights import SAFE_INDEX, load_weights, save_weights

def average_state_dicts(states: list[dict[str, torch.Tensor]], weights: list[float],
                        names: list[str]) -> dict[str, torch.Tensor]:
    """sum_i weights[i] * states[i], tensor by tensor (in fp32, cast back to the first state's
    dtypes); integer tensors must be equal and are kept. `names` label the states in errors."""
    first = states[0]
    for state, name in zip(states[1:], names[1:]):
        if state.keys() != first.keys():
            differ = sorted(state.keys() ^ first.keys())
            raise MarsError(f"{name} and {names[0]} hold different tensors (e.g. {differ[0]})")
        shape = next((k for k in first if state[k].shape != first[k].shape), None)
        if shape is not None:
            raise MarsError(f"tensor {shape} has shape {tuple(state[shape].shape)} in {name} "
                            f"but {tuple(first[shape].shape)} in {names[0]}")
    averaged = {}
    for key, tensor in first.items():
        if not tensor.is_floating_point():
            if any(not torch.equal(state[key], tensor) for state in states[1:]):
                raise MarsError(f"integer tensor {key} differs between the models: it cannot be averaged")
            averaged[key] = tensor
            continue
        total = sum(w * state[key].float() for w, state in zip(weights, states))
        averaged[key] = total.to(tensor.dtype)
    return averaged


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
        if config != configs[0]:
            raise MarsError(f"{model} and {models[0]} have different configs (config.json): "
                            "only models of one architecture can be averaged")
    names = [str(m) for m in models]
    state = average_state_dicts([load_weights(m) for m in models], weights, names)

    tmp = out.parent / f".tmp-{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    top = str(models[0])

    def not_the_weights(folder: str, names: list[str]) -> set[str]:  # vq/ keeps its own weights
        if folder != top:
            return set()
        return {n for n in names if n.endswith(".safetensors") or n in (SAFE_INDEX, "eval.json")}

    shutil.copytree(models[0], tmp, ignore=not_the_weights)
    save_weights(state, tmp)
    (tmp / "averaged_from.json").write_text(
        json.dumps({"models": names, "weights": weights}, indent=1) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
