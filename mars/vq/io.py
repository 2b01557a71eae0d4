"""Loading and saving tokenizers: safetensors, strict state-dict loads, taming checkpoint import.

Nothing here unpickles arbitrary objects: weights come from safetensors or from
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from mars.errors import MarsError
from mars.vq.config import VQConfig
from mars.vq.model import CONFIG_NAME, WEIGHTS_NAME, VQModel

# Keys of a taming training checkpoint that are not part of the tokenizer: the discriminator and
# the perceptual network live under `loss.` (VQLPIPSWithDiscriminator).
IGNORED_PREFIXES = ("loss.",)


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write tensors to a safetensors file atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(path)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several types for a truncated or foreign file
        raise MarsError(f"cannot read {path} as safetensors: {err}") from None


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model`, or raise `MarsError` naming the first key that does not fit."""
    expected = model.state_dict()
    for key in expected:
        if key not in state:
            raise MarsError(f"{source}: missing key {key!r} (expected shape {tuple(expected[key].shape)}); "
                            "the checkpoint does not match this tokenizer config")
    for key, value in state.items():
        if key not in expected:
            raise MarsError(f"{source}: unexpected key {key!r}; the checkpoint does not match this "
                            "tokenizer config")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise MarsError(f"{source}: key {key!r} has shape {tuple(value.shape)}, the config expects "
                            f"{tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=True)


def read_torch_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.ckpt`/`.pt`/`.pth` file: its `state_dict` entry, or the file itself."""
    path = Path(path)
    if not path.is_file():
        raise MarsError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MarsError(
            f"{path} holds pickled Python objects besides tensors (e.g. Lightning callbacks or "
            f"hyper-parameters), which are not loaded for safety ({first}). Re-save only the weights "
            "in a trusted environment: torch.save({'state_dict': torch.load(p, weights_only=False)"
            "['state_dict']}, 'weights.ckpt')") from None
    except Exception as err:
        raise MarsError(f"cannot read {path} as a torch checkpoint: {err}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MarsError(f"{path} holds no state_dict of tensors")
    return obj


def import_taming_checkpoint(path: str | Path, config: VQConfig) -> VQModel:
    """Build a `VQModel` from a taming-transformers VQGAN checkpoint (keys must fit exactly).

    The discriminator / perceptual keys (`loss.*`) are dropped; everything else must match
    `config` one-to-one. Safetensors files are read too.
    """
    path = Path(path)
    state = read_safetensors(path) if path.suffix == ".safetensors" else read_torch_checkpoint(path)
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    model = VQModel(config)
    load_state_dict_strict(model, {k: v.float() for k, v in state.items()}, source=str(path))
    return model.eval()


def load_tokenizer(path: str | Path, device: str | torch.device = "cpu") -> VQModel:
    """Load a tokenizer from a VQ directory, a MARS model directory with a `vq/` subfolder, or the
    name of a built-in MARS model."""
    path = Path(path)
    if not path.exists():
        from mars.model_dir import BUILTIN_MODELS, resolve_model_path

        if str(path) in BUILTIN_MODELS:
            path = resolve_model_path(str(path))
    if (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file() and not (path / "vq").is_dir():
        return VQModel.from_pretrained(path, device=device)
    if (path / "vq" / CONFIG_NAME).is_file():
        return VQModel.from_pretrained(path / "vq", device=device)
    if not path.exists():
        raise MarsError(f"tokenizer not found: {path}")
    raise MarsError(f"{path} is neither a tokenizer directory ({CONFIG_NAME} + {WEIGHTS_NAME}) "
                    "nor a MARS model directory with a vq/ subfolder")
