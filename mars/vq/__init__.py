"""The VQ-GAN image tokenizer: images in [-1, 1] <-> grids of discrete codes (f16, 256 px -> 16x16)."""

from mars.vq.config import PRESETS, VQConfig

__all__ = ["PRESETS", "VQConfig", "VQModel", "load_tokenizer"]

_LAZY = {"VQModel": "mars.vq.model", "load_tokenizer": "mars.vq.io"}


def __getattr__(name: str):
    # imported when asked for: the package's CLI (`mars tokenizer`) registers without torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mars.vq' has no attribute {name!r}")
