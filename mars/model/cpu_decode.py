"""The image decode step on the CPU, with the visual expert's weights prepared once per batch.

A decode step feeds one image code per row (an image and its CFG row) through every layer. On a
CPU such a step is bound by the number of ops and by reading the weights, not by arithmetic
(BENCHMARKS.md, "The image decode step on the CPU"). `CPUImageStep` computes what the model's
cached step computes (`mars.generate.image_step`: the visual expert alone, the image rows of the
head) with less work per step:

- the RMS norms' scales are folded into the products after them, the attention scale into the
  query rows, and the gate and up projections are stacked into one product;
- RoPE tables and the padding mask are made once for every slot of the cache, not per step;
- attention of a few queries per row (one code, or a window of them: `window`) is written out
  (two batched products and a softmax), which costs a fraction of SDPA's general kernel at this size;
- each product is one `mm` / `addmm` (bias and residual included) in the layout that is faster for
  few rows on this CPU (`WEIGHT_FIRST_ROWS`).

It is the model's computation up to float rounding: tests/model/test_cpu_decode.py checks the
logits and the cache against the model's step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mars.model.semvie import FEW_ROWS, KVCache, SemVIE


def linear(x: torch.Tensor, weight: torch.Tensor, add: torch.Tensor | None, weight_first: bool) -> torch.Tensor:
    """x (R, in) @ weight (out, in).T, plus `add` (broadcast to (R, out)) when given, as one product.

    `weight_first` computes it as weight @ x.T (the result is then a transposed view): faster for a
    few rows on AMD CPUs, slower on Intel ones (see `WEIGHT_FIRST_ROWS`).
    """
    if weight_first:
        product = torch.mm(weight, x.t()) if add is None else torch.addmm(add.t(), weight, x.t())  # (out, R)
        return product.t()
    return x @ weight.t() if add is None else torch.addmm(add, x, weight.t())


# Rows up to which the step's products run weight-first: on AMD CPUs (`FEW_ROWS` > 0) they are
# faster so up to 16 rows with two threads (ms per step of the built-in model, weight-first /
# x @ W.T: 5.9 / 11.0 at 2 rows, 10.3 / 13.1 at 8, 13.1 / 16.2 at 16; even from 32 rows); with one
# thread, 16 rows: 19.4 / 18.9. On Intel CPUs never.
WEIGHT_FIRST_ROWS = 16 if FEW_ROWS else 0


@dataclass
class _VisualLayer:
    qkv: torch.Tensor  # (Hq D + 2 Hkv D, C): attention norm folded in, query rows scaled by D**-0.5
    qkv_bias: torch.Tensor | None  # (1, Hq D + 2 Hkv D), query part scaled alike
    o: torch.Tensor  # (C, Hq D)
    gate_up: torch.Tensor  # (2 I, C): gate rows, then up rows; MLP norm folded in
    down: torch.Tensor  # (C, I)


def _visual_layer(block, query_width: int, head_dim: int) -> _VisualLayer:
    expert = block.visual
    attn_scale = block.attn_norm.weight.float()  # (C,)
    query_scale = torch.ones(expert.qkv.weight.shape[0])
    query_scale[:query_width] = head_dim**-0.5
    bias = expert.qkv.bias
    mlp = expert.mlp
    return _VisualLayer(
        qkv=expert.qkv.weight.float() * attn_scale * query_scale[:, None],
        qkv_bias=None if bias is None else (bias.float() * query_scale)[None],
        o=expert.o_proj.weight.float(),
        gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).float() * block.mlp_norm.weight.float(),
        down=mlp.down_proj.weight.float(),
    )


class CPUImageStep:
    """`(ids (R, 1), t) -> image logits (R, K)` for code t fed at slot `slot + t - 1` of `cache`;
    `window(ids (R, T), t) -> (R, T, K)` feeds codes t .. t + T - 1 at once (causal among them),
    with t one int for all rows or one per row ((R,) long: rows at different codes).

    Built after the prefill (the cache holds the prompts, their padding and, for 2-D positions,
    each row's `<img>`); writes each step's keys and values into `cache`, as the model does, so
    text can continue in it. Its weights are made from the model's when it is built: a model
    whose weights change afterwards needs a new step.
    """

    @torch.no_grad()
    def __init__(self, model: SemVIE, cache: KVCache, slot: int) -> None:
        cfg = model.config
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.hidden, self.eps = cfg.hidden_size, cfg.rms_norm_eps
        self.cache, self.slot = cache, slot
        self.layers = [_visual_layer(block, cfg.num_heads * cfg.head_dim, cfg.head_dim) for block in model.layers]
        self.text_rows = model.embed.text_rows
        self.embedding = model.embed.new_weight.float()  # image ids are new rows
        head = model.lm_head if model.lm_head is not None else model.embed
        image_rows = slice(model.vocab.image_ids.start - head.text_rows, model.vocab.image_ids.stop - head.text_rows)
        self.head = (head.new_weight[image_rows].float() * model.norm.weight.float()).contiguous()  # (K, C)

        self.slots = torch.arange(cache.max_len)
        positions = (self.slots[None] - cache.pad_lengths[:, None]).clamp(min=0)  # (R, S), as forward_hidden
        cos, sin = model.rotary(positions, cache.image_start)  # (R, 1, S, D) each
        self.cos = cos[:, 0].transpose(0, 1).contiguous()  # (S, R, D): one slice per step
        self.sin = sin[:, 0].transpose(0, 1).contiguous()
        padding = self.slots[None] < cache.pad_lengths[:, None]  # (R, S)
        rows = cache.k[0].shape[0]
        self.mask = torch.zeros(rows, 1, 1, 1, cache.max_len).masked_fill(padding[:, None, None, None], float("-inf"))

    def __call__(self, ids: torch.Tensor, t: int) -> torch.Tensor:
        return self.window(ids, t)[:, 0]

    def _at_slots(self, t: int | torch.Tensor, R: int, T: int):
        """Where codes t .. t + T - 1 go (t an int, or one per row, (R,)): RoPE tables (R, T, 1, D)
        each, the attention mask (R, 1, 1, T, keys), the number of slots attended to, and the cache
        index the new keys and values are written at."""
        if isinstance(t, int):  # every row at the same slots: slices
            first = self.slot + t - 1
            keys = first + T
            mask = self.mask[..., :keys]  # (R, 1, 1, 1, keys)
            if T > 1:  # each fed code sees the codes before it, not those after
                mask = mask.masked_fill(self.slots[first:keys, None] < self.slots[None, :keys], float("-inf"))
            cos, sin = (table[first:keys].transpose(0, 1)[:, :, None] for table in (self.cos, self.sin))
            return cos, sin, mask, keys, (slice(None), slice(None), slice(first, keys))
        fed = self.slot + t[:, None] - 1 + torch.arange(T)  # (R, T): each row's slots
        rows = torch.arange(R)[:, None]
        keys = int(fed.max()) + 1
        later = self.slots[None, None, :keys] > fed[..., None]  # (R, T, keys)
        mask = self.mask[..., :keys].masked_fill(later[:, None, None], float("-inf"))
        cos, sin = (table[fed, rows][:, :, None] for table in (self.cos, self.sin))
        return cos, sin, mask, keys, (rows, slice(None), fed)

    @torch.no_grad()
    def window(self, ids: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        H, Hkv, D, C = self.heads, self.kv_heads, self.head_dim, self.hidden
        R, T = ids.shape
        wf = R * T <= WEIGHT_FIRST_ROWS
        cos, sin, mask, keys, written = self._at_slots(t, R, T)
        per_row = not isinstance(t, int)
        x = F.embedding(ids.reshape(R * T) - self.text_rows, self.embedding)  # (R T, C)
        for i, layer in enumerate(self.layers):
            qkv = linear(F.rms_norm(x, (C,), eps=self.eps), layer.qkv, layer.qkv_bias, wf)  # (R T, (H + 2Hkv) D)
            heads = qkv.reshape(R, T, H + 2 * Hkv, D)
            qk = heads[:, :, : H + Hkv]
            qk = qk * cos + qk.roll(D // 2, dims=-1) * sin  # RoPE, as `apply_rope`
            k_cache, v_cache = self.cache.k[i], self.cache.v[i]  # (R, Hkv, S, D)
            new_k, new_v = qk[:, :, H:], heads[:, :, H + Hkv :]  # (R, T, Hkv, D)
            # indexed by (rows, :, slots) the cache's (R, T) positions come first; by slices, Hkv does
            k_cache[written] = new_k if per_row else new_k.transpose(1, 2)
            v_cache[written] = new_v if per_row else new_v.transpose(1, 2)
            # query heads grouped by the key head they share: (R, Hkv, G T, D), rows (g, t)
            q = qk[:, :, :H].reshape(R, T, Hkv, H // Hkv, D).permute(0, 2, 3, 1, 4).reshape(R, Hkv, H // Hkv * T, D)
            scores = q @ k_cache[:, :, :keys].transpose(-1, -2)  # (R, Hkv, G T, keys)
            scores = (scores.view(R, Hkv, H // Hkv, T, keys) + mask).view(R, Hkv, H // Hkv * T, keys)
            attended = scores.softmax(dim=-1) @ v_cache[:, :, :keys]  # (R, Hkv, G T, D)
            attended = attended.view(R, Hkv, H // Hkv, T, D).permute(0, 3, 1, 2, 4).reshape(R * T, H * D)
            x = linear(attended, layer.o, x, wf)
            gate_up = linear(F.rms_norm(x, (C,), eps=self.eps), layer.gate_up, None, wf)  # (R T, 2I)
            width = gate_up.shape[1] // 2
            # contiguous rows: the next product reads them in its fast layout
            act = (F.silu(gate_up[:, :width]) * gate_up[:, width:]).contiguous()  # (R T, I)
            x = linear(act, layer.down, x, wf)
        return linear(F.rms_norm(x, (C,), eps=self.eps), self.head, None, wf).view(R, T, -1)  # (R, T, K)


def uses_cpu_step(model: SemVIE, cache: KVCache) -> bool:
    """Whether `CPUImageStep` can run this decode: a CPU cache and fp32 weights."""
    return cache.k[0].device.type == "cpu" and model.norm.weight.dtype == torch.float32
