"""Widen a trained decoder k-fold without changing what it draws (Net2WiderNet, Chen et al. 2016).

Every decoder feature map of C channels becomes k*C channels: each old channel is copied k times,
and each layer that reads a copied channel splits the old weight between the k copies with random
positive shares that sum to one. Every activation is then an exact copy of the old one, so the
wider decoder starts with the trained decoder's output (to float rounding), and the random shares
let the copies drift apart once training starts (equal halves would give them equal gradients
forever). The copies of a channel are laid out inside its own GroupNorm group, so every group's
mean and variance are the old group's; the attention logits are kept by scaling the queries
by 1/sqrt(k) (the dot product runs over k times as many channels, the scale only falls by sqrt(k)).
"""

from __future__ import annotations

import torch

from mars.errors import MarsError
from mars.vq.config import VQConfig


def copy_index(old_channels: int, factor: int, groups: int) -> torch.Tensor:
    """(factor * old_channels,) old channel of each new channel, copies kept in their GroupNorm group."""
    size = old_channels // groups  # channels per group before widening
    new = torch.arange(old_channels * factor)
    return (new // (size * factor)) * size + new % size


def widen_decoder(trained: dict[str, torch.Tensor], target: dict[str, torch.Tensor], old: VQConfig,
                  new: VQConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """The `decoder.*` weights of a `new.decoder_width`-wide decoder that computes what `trained`'s does.

    trained: a state dict with `old`'s decoder; target: the wider model's state dict (for shapes).
    `new.decoder_width` must be a whole multiple of `old.decoder_width`, and the normalisation the same."""
    factor, rest = divmod(new.decoder_width, old.decoder_width)
    if rest:
        raise MarsError(f"a decoder can only be widened by a whole factor: {old.decoder_width} -> "
                        f"{new.decoder_width} channels")
    generator = torch.Generator().manual_seed(seed)
    groups = old.norm_groups if old.norm_type == "group" else 1  # LayerNorm: the whole map is one group
    widened = {}
    for name, weight in trained.items():
        if not name.startswith("decoder."):
            continue
        shape = tuple(target[name].shape)
        w = weight.float()
        if shape[0] != w.shape[0]:  # output channels (or a norm / bias vector): copy
            w = w[copy_index(w.shape[0], factor, groups)]
        if w.dim() > 1 and shape[1] != w.shape[1]:  # input channels: split between the copies
            index = copy_index(w.shape[1], factor, groups)
            w = w[:, index]
            shares = torch.rand(shape, generator=generator) + 0.5  # positive, so no copy flips sign
            totals = torch.zeros(shape[0], w.shape[1] // factor, *shape[2:]).index_add_(1, index, shares)
            w = w * shares / totals[:, index]
        if name.endswith((".q.weight", ".q.bias")):  # attention: keep q.k / sqrt(C) as before
            w = w / factor ** 0.5
        if tuple(w.shape) != shape:
            raise MarsError(f"cannot widen {name}: {tuple(weight.shape)} -> {shape}")
        widened[name] = w.to(weight.dtype)
    return widened
