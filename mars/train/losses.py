"""Per-task training losses: T2I (with the no-autograd text prefix), I2T and text LM.

Each function returns `(sum of token cross-entropies, number of loss tokens)`, so the trainer can
normalise by the token count of the whole global batch (all micro-batches, all ranks) and get the
same loss and gradients however the batch is split.

Logits are computed only at positions that carry a target (`targets != -100`). The softmax runs
over the full multimodal vocabulary by default: that is the faithful objective (the model must
also learn not to emit text inside an image). `vocab="visual"` restricts T2I to the new rows
(image codes + specials), which matches inference (it samples among image ids only) and skips the
151,936 text rows of the head; it is an option, not the default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mars.data.sequences import IGNORE, I2TBatch, LMBatch, T2IBatch
from mars.model.semvie import KVCache


class PrefixKVCache(KVCache):
    """A KV cache holding the K/V of a frozen text prefix (slots [0, P)), filled without autograd.

    After `freeze()`, `update` does not write in place: it returns the prefix K/V concatenated with
    the new ones, so the suffix forward is a pure function of its inputs (safe for autograd,
    activation checkpointing and torch.compile) and reads the prefix from the cache.
    """

    def __init__(self, config, batch_size: int, prefix_len: int, total_len: int, device, dtype, pad_lengths):
        super().__init__(config, batch_size, total_len, device=device, dtype=dtype, pad_lengths=pad_lengths)
        self.prefix_len = prefix_len
        self.frozen = False

    def freeze(self) -> None:
        self.frozen = True

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if not self.frozen:
            return super().update(layer, input_pos, k, v)
        P = self.prefix_len  # the suffix occupies slots [P, T) in order
        k_all = torch.cat([self.k[layer][:, :, :P].to(k.dtype), k], dim=2)  # (B, Hkv, T, D)
        v_all = torch.cat([self.v[layer][:, :, :P].to(v.dtype), v], dim=2)
        return k_all, v_all


def token_ce_sum(model, hidden: torch.Tensor, targets: torch.Tensor, rows: slice | None = None):
    """Sum of cross-entropies at the positions of `hidden` (B, T, C) whose target is set.

    `rows` restricts the softmax to a vocabulary slice (targets must all lie in it)."""
    keep = targets != IGNORE  # (B, T)
    h = hidden[keep]  # (N, C)
    y = targets[keep]  # (N,)
    logits = model.logits(h, rows)  # (N, V) or (N, |rows|)
    if rows is not None:
        y = y - rows.start
    return F.cross_entropy(logits.float(), y, reduction="sum"), y.numel()


def t2i_loss(model, batch: T2IBatch, prefix_no_grad: bool = True, vocab: str = "full", cache_dtype=torch.float32):
    """`prompt <img> c_1..c_N </img>`, left-padded so `<img>` sits at column P for every row.

    With `prefix_no_grad` the text prefix (columns [0, P), text only, frozen, causal: it never
    sees an image token) runs once under `torch.no_grad()` into a KV cache; only columns [P, T)
    (all visual) run with autograd. This gives the same loss and gradients as the full forward
    because nothing trainable is on the prefix's path (the caller checks that).
    """
    ids, targets, pad = batch.input_ids, batch.targets, batch.pad_lengths  # (B, T) (B, T) (B,)
    P = batch.prefix_len
    B, T = ids.shape
    rows = slice(model.vocab.text_size, model.vocab.size) if vocab == "visual" else None
    if not prefix_no_grad:
        hidden = model.forward_hidden(ids, model.image_mask(ids), pad_lengths=pad)  # (B, T, C)
        return token_ce_sum(model, hidden, targets, rows)

    if bool((targets[:, :P] != IGNORE).any()) or bool(model.image_mask(ids[:, :P]).any()):
        raise ValueError("a T2I prefix must be text only and carry no targets")
    cache = PrefixKVCache(model.config, B, P, T, ids.device, cache_dtype, pad)
    if P > 0:
        with torch.no_grad():
            model.forward_hidden(ids[:, :P], False, input_pos=torch.arange(P, device=ids.device), kv_cache=cache)
    cache.freeze()
    suffix_pos = torch.arange(P, T, device=ids.device)
    hidden = model.forward_hidden(ids[:, P:], True, input_pos=suffix_pos, kv_cache=cache)  # (B, T-P, C)
    return token_ce_sum(model, hidden, targets[:, P:], rows)


def i2t_loss(model, batch: I2TBatch):
    """`<img> c_1..c_N </img> instruction caption <eos>`, right-padded: one full forward with
    autograd. The loss is on the caption; its gradient reaches the visual expert through attention."""
    hidden = model.forward_hidden(batch.input_ids, batch.image_mask)  # (B, T, C)
    return token_ce_sum(model, hidden, batch.targets)


def lm_loss(model, batch: LMBatch):
    """Plain next-token loss on text-only sequences (stage 0)."""
    hidden = model.forward_hidden(batch.input_ids, False)
    return token_ce_sum(model, hidden, batch.targets)


def task_loss(model, batch: T2IBatch | I2TBatch | LMBatch, *, prefix_no_grad: bool = True, vocab: str = "full",
              cache_dtype=torch.float32):
    """Dispatch on the batch type; returns (ce_sum, n_tokens)."""
    if isinstance(batch, T2IBatch):
        return t2i_loss(model, batch, prefix_no_grad, vocab, cache_dtype)
    if isinstance(batch, I2TBatch):
        return i2t_loss(model, batch)
    if isinstance(batch, LMBatch):
        return lm_loss(model, batch)
    raise TypeError(f"unknown batch type {type(batch).__name__}")
