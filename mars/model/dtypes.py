"""Weight dtype names ("bf16", "float32", ...), readable without importing torch: the CLI builds its
parser, `--dtype` choices included, before torch loads."""

from __future__ import annotations

DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
               "fp16": "float16", "float16": "float16"}


def torch_dtype(name: str):
    """The torch dtype named `name` (a key of DTYPE_NAMES)."""
    import torch

    return getattr(torch, DTYPE_NAMES[name])
