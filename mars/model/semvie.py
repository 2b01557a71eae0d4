"""SemVIE: a decoder-only LLM whose every layer holds a language expert and a visual expert.

One file, read top to bottom: RMSNorm, RoPE, the KV cache, the expert, routing, the block, the
fusion vocabulary, and the model (PAPER.md §1-2, DESIGN.md "Model rules").

- Each layer has a *language expert* (the pretrained LLM's QKV projection, output projection and
  SwiGLU FFN; frozen) and a *visual expert* (a copy of the same; trainable). Rows are routed by
  modality with `image_mask`: each expert runs only on its own rows.
- One joint causal attention (torch SDPA) runs over the whole mixed sequence, so text and image
  tokens attend to each other in every layer. RMSNorms are shared.
- Positions are 1-D RoPE over the flattened sequence (Qwen / Qwen2 / Llama `rotate_half` form).
- The KV cache holds projected keys/values, so it does not care which expert made them.
  Prefill and decode differ only in `input_pos`.
- Vocabulary: frozen pretrained text rows + trainable new rows (image codes, specials), both for
  the input embedding and for the output head (`mars.vocab.MultimodalVocab` owns the offsets).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mars.config import SemVIEConfig, from_dict
from mars.errors import MarsError
from mars.model.weights import atomic_write_text, check_state_dict, load_weights, save_weights
from mars.vocab import MultimodalVocab

MODEL_TYPE = "mars-semvie"

# `image_mask` is a (B, T) bool tensor, or a Python bool when every row has that modality
# (the image decode step passes True: no routing, no host sync).
ImageMask = torch.Tensor | bool


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, as Qwen / Llama do."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one op: decode steps are op-bound
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # x * rsqrt(mean(x^2) + eps)
        return self.weight * normed.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for integer `positions` (B, T), or (B, T, 2) (row, column) pairs, -> (cos, signed
    sin), two (B, 1, T, head_dim) tensors computed in fp32 and cast to `dtype` (the activations'
    type, as HF casts them).

    With pairs, even frequency pairs rotate by the row and odd ones by the column, so each axis gets
    high and low frequencies; a token whose row equals its column rotates exactly as in 1-D.
    The signed sin is sin with its first half negated, so that `apply_rope` can rotate with one
    roll. Computed on the fly (no buffers), so a model built on the meta device needs no re-init.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    if positions.dim() == 3:
        by_column = torch.arange(head_dim // 2, device=positions.device) % 2 == 1  # (D/2,)
        positions = torch.where(by_column, positions[..., 1:], positions[..., :1])  # (B, T, D/2)
    else:
        positions = positions[..., None]  # (B, T, 1)
    freqs = positions.float() * inv_freq  # (B, T, D/2)
    cos = torch.cat([freqs, freqs], dim=-1).cos()  # (B, T, D)
    signed_sin = torch.cat([-freqs.sin(), freqs.sin()], dim=-1)
    return cos[:, None].to(dtype), signed_sin[:, None].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by the half-split convention of HF Qwen2 / Llama:
    x * cos + rotate_half(x) * sin, where rotate_half(x) = [-x2, x1] = roll(x, D/2) * [-1, 1]."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def blend_rope(line: tuple[torch.Tensor, torch.Tensor], grid: tuple[torch.Tensor, torch.Tensor],
               blend: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables `blend` of the way from 1-D positions' (`line`) to 2-D positions' (`grid`).

    Rotations, not positions, are mixed: `apply_rope` is linear in (cos, sin), so a query or key is
    rotated by (1 - blend) R(1-D) + blend R(2-D), and every attention score moves smoothly with
    `blend` (a position moved even 5 % of the way from k to (k // 16, k % 16) turns the fastest
    frequencies by radians: the built-in model's held-out T2I loss 0.18 -> 1.28 nats per code).
    """
    return tuple((1.0 - blend) * a + blend * b for a, b in zip(line, grid))


NO_IMAGE = 2**40  # the image start of a row that holds no <img>: beyond any position


def image_positions_2d(positions: torch.Tensor, image_start: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, T) 1-D positions and (B,) position of each row's `<img>` -> (B, T, 2) (row, column) positions.

    Tokens up to `<img>` keep p on both axes; code k of the image (raster order) sits at
    (s + 1 + k // grid, s + 1 + k % grid); tokens after the image continue from s + 1 + grid on both
    axes, so an image spans grid positions per axis instead of grid**2 (as in Qwen2-VL's M-RoPE).
    One image per sequence.
    """
    start = image_start[:, None]  # (B, 1)
    code = positions - start - 1  # (B, T): index of the code at each position, if it is one
    n = grid * grid
    text = torch.where(code >= n, positions - n + grid, positions)
    inside = (code >= 0) & (code < n)
    row = torch.where(inside, start + 1 + torch.div(code, grid, rounding_mode="floor"), text)
    column = torch.where(inside, start + 1 + torch.remainder(code, grid), text)
    return torch.stack([row, column], dim=-1)


class KVCache:
    """Static, pre-allocated keys and values of every layer, for a batch of left-padded sequences.

    `pad_lengths[b]` leading slots of row b are padding: they are never attended to, and the
    positions of row b start at 0 after them. `image_start[b]` is the position of row b's `<img>`
    once a forward has written it (NO_IMAGE before): 2-D image positions need it in decode steps.
    """

    def __init__(
        self,
        config: SemVIEConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        pad_lengths: torch.Tensor | None = None,
    ) -> None:
        if max_len > config.max_seq_len:
            raise MarsError(f"sequence of {max_len} tokens exceeds the model's context of {config.max_seq_len}")
        shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)  # (B, Hkv, S, D)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.max_len = max_len
        if pad_lengths is None:
            pad_lengths = torch.zeros(batch_size, dtype=torch.long)
        self.pad_lengths = pad_lengths.to(device=device, dtype=torch.long)  # (B,)
        self.image_start = torch.full((batch_size,), NO_IMAGE, device=device, dtype=torch.long)  # (B,)

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, Hkv, T, D) at slots `input_pos` (T,); return the full (B, Hkv, S, D) cache."""
        self.k[layer].index_copy_(2, input_pos, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, input_pos, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]


def route(x: torch.Tensor, image_mask: ImageMask, text_fn: Callable, visual_fn: Callable) -> torch.Tensor:
    """Apply `text_fn` to the text rows of x (B, T, C) and `visual_fn` to its image rows.

    Each function sees only its own rows, so an expert costs nothing on the other modality's tokens.
    """
    if image_mask is True:
        return visual_fn(x)
    if image_mask is False:
        return text_fn(x)
    B, T, _ = x.shape
    flat = x.reshape(B * T, -1)
    is_image = image_mask.reshape(B * T)
    image_rows = is_image.nonzero().squeeze(1)
    text_rows = (~is_image).nonzero().squeeze(1)
    image_out = visual_fn(flat.index_select(0, image_rows))  # (N_img, C_out)
    text_out = text_fn(flat.index_select(0, text_rows))  # (N_txt, C_out)
    out = text_out.new_empty(B * T, text_out.shape[-1])
    out = out.index_copy(0, image_rows, image_out.to(out.dtype)).index_copy(0, text_rows, text_out)
    return out.view(B, T, -1)


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's vendor id from Linux's cpuinfo ("AuthenticAMD", "GenuineIntel", ...), else ""."""
    try:
        with open(cpuinfo, encoding="utf-8") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# A decode step multiplies 1-4 rows (one image plus its CFG row) by every weight matrix. On AMD
# CPUs MKL's sgemm streams W (out, in) 1.3-1.9x faster as W @ x.T than as x @ W.T for such rows
# (2-core AMD EPYC); on an Intel Xeon (AVX-512, AMX) the usual x @ W.T is 2-5x faster than
# W @ x.T (BENCHMARKS.md: "Few-row products in the weight-streaming layout" on the AMD host, "CPU:
# 2-core Intel Xeon" on the Intel one). So the weight-first layout is used only on AMD.
FEW_ROWS = 4 if cpu_vendor() == "AuthenticAMD" else 0


def few_cpu_rows(x: torch.Tensor) -> bool:
    return x.numel() <= FEW_ROWS * x.shape[-1] and x.device.type == "cpu"


def matmul_t(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ weight (out, in).T -> (..., out), in the faster layout for few CPU rows."""
    if not few_cpu_rows(x):
        return x @ weight.t()
    flat = x.reshape(-1, x.shape[-1])  # (N, in)
    return torch.mm(weight, flat.t()).t().contiguous().view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state dict) that uses `matmul_t` for few CPU rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not few_cpu_rows(x):
            return F.linear(x, self.weight, self.bias)
        y = matmul_t(x, self.weight)
        return y if self.bias is None else y + self.bias


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Expert(nn.Module):
    """One modality's weights in one layer: fused QKV projection, output projection, SwiGLU FFN."""

    def __init__(self, config: SemVIEConfig) -> None:
        super().__init__()
        qkv_dim = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        self.qkv = Linear(config.hidden_size, qkv_dim, bias=config.qkv_bias)
        self.o_proj = Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)


class SemVIEBlock(nn.Module):
    """Pre-norm decoder layer with two experts and one joint causal attention."""

    def __init__(self, config: SemVIEConfig, layer_index: int) -> None:
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.text = Expert(config)
        self.visual = Expert(config)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        image_mask: ImageMask,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | None,  # (B, 1, T, S) bool, or None for plain causal
        kv_cache: KVCache | None,
        input_pos: torch.Tensor | None,  # (T,) cache slots
    ) -> torch.Tensor:
        cfg = self.config
        B, T, _ = x.shape
        H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        qkv = route(self.attn_norm(x), image_mask, self.text.qkv, self.visual.qkv)  # (B, T, (H + 2Hkv) D)
        heads = qkv.view(B, T, H + 2 * Hkv, D).transpose(1, 2)  # (B, H + 2Hkv, T, D)
        q, k = apply_rope(heads[:, : H + Hkv], *rope).split([H, Hkv], dim=1)  # (B, H, T, D), (B, Hkv, T, D)
        v = heads[:, H + Hkv :]  # (B, Hkv, T, D)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_index, input_pos, k, v)  # (B, Hkv, S, D)
            k, v = k.to(q.dtype), v.to(q.dtype)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, enable_gqa=H != Hkv
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        x = x + route(y, image_mask, self.text.o_proj, self.visual.o_proj)
        x = x + route(self.mlp_norm(x), image_mask, self.text.mlp, self.visual.mlp)
        return x


class FusionRows(nn.Module):
    """A (vocab, C) table split into frozen pretrained text rows and trainable new rows.

    Used for the input embedding and for the output head (when embeddings are untied).
    """

    def __init__(self, text_rows: int, new_rows: int, dim: int) -> None:
        super().__init__()
        self.text_rows = text_rows
        self.text_weight = nn.Parameter(torch.empty(text_rows, dim))
        self.new_weight = nn.Parameter(torch.empty(new_rows, dim))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, C); a row's gradient reaches only the table it came from."""
        is_new = ids >= self.text_rows
        text = F.embedding(ids.clamp(max=self.text_rows - 1), self.text_weight)
        new = F.embedding((ids - self.text_rows).clamp(min=0), self.new_weight)
        return torch.where(is_new[..., None], new, text)

    def project(self, h: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """Logits h @ W.T for all rows, or only for the vocabulary slice `rows`."""
        if rows is None:
            return torch.cat([matmul_t(h, self.text_weight), matmul_t(h, self.new_weight)], dim=-1)
        if rows.start >= self.text_rows:
            return matmul_t(h, self.new_weight[rows.start - self.text_rows : rows.stop - self.text_rows])
        if rows.stop <= self.text_rows:
            return matmul_t(h, self.text_weight[rows])
        raise ValueError(f"row slice {rows} straddles text and new rows")


class SemVIE(nn.Module):
    """The MARS transformer: `logits = model(input_ids, image_mask)`."""

    def __init__(self, config: SemVIEConfig) -> None:
        super().__init__()
        self.config = config
        self.vocab = MultimodalVocab.from_config(config)
        new_rows = self.vocab.num_new_rows
        self.embed = FusionRows(config.text_vocab_size, new_rows, config.hidden_size)
        self.layers = nn.ModuleList(SemVIEBlock(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else FusionRows(config.text_vocab_size, new_rows, config.hidden_size)
        # with image_positions 2d: how far the rotations are moved from 1-D to 2-D positions (1 = all
        # the way; only a trainer ramping a 1-D model into 2-D sets less; not saved: a model is 2-D)
        self.image_position_blend = 1.0
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # --- initialisation ----------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Random text side (std `init_std`), then the MARS initialisation of the visual side."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for table in self.output_tables():
            nn.init.normal_(table.text_weight, std=std)
        self.init_visual_side()

    @torch.no_grad()
    def init_visual_side(self) -> None:
        """Visual experts := copies of the language experts; new vocabulary rows := mean of the
        text rows (PAPER.md §1-2). Right after this, an image token is processed exactly as the
        language expert would process it."""
        for block in self.layers:
            block.visual.load_state_dict(block.text.state_dict())
        for table in self.output_tables():
            table.new_weight.copy_(self.vocab.new_rows_init(table.text_weight))

    def output_tables(self) -> list[FusionRows]:
        """The embedding table and, when untied, the output head."""
        return [self.embed] if self.lm_head is None else [self.embed, self.lm_head]

    # --- forward -----------------------------------------------------------------------------
    def forward_hidden(
        self,
        input_ids: torch.Tensor,  # (B, T)
        image_mask: ImageMask,  # (B, T) bool, or a bool for all rows
        input_pos: torch.Tensor | None = None,  # (T,) cache slots; None = positions 0..T-1, no cache
        kv_cache: KVCache | None = None,
        pad_lengths: torch.Tensor | None = None,  # (B,) left padding, only without a cache
    ) -> torch.Tensor:
        """Final normed hidden states (B, T, C)."""
        B, T = input_ids.shape
        device = input_ids.device
        if kv_cache is not None:
            if input_pos is None:
                raise ValueError("a kv_cache needs input_pos (the cache slots of the new tokens)")
            if pad_lengths is not None:
                raise ValueError("with a kv_cache, padding is given to the cache, not to forward")
            pad_lengths = kv_cache.pad_lengths
            key_slots = torch.arange(kv_cache.max_len, device=device)
        else:
            if input_pos is not None:
                raise ValueError("input_pos is only meaningful with a kv_cache")
            input_pos = torch.arange(T, device=device)
            key_slots = input_pos

        positions = input_pos[None, :].expand(B, T)  # (B, T)
        attn_mask = None
        if pad_lengths is not None:
            positions = (positions - pad_lengths[:, None]).clamp(min=0)
        if pad_lengths is not None:  # always set with a cache
            attn_mask = self._attention_mask(input_pos, key_slots, pad_lengths)
        x = self.embed.embed(input_ids)  # (B, T, C)
        start = self._image_start(input_ids, positions, kv_cache) if self.config.image_positions == "2d" else None
        rope = self.rotary(positions, start, x.dtype)
        for block in self.layers:
            x = block(x, image_mask, rope, attn_mask, kv_cache, input_pos)
        return self.norm(x)

    def rotary(self, positions: torch.Tensor, image_start: torch.Tensor | None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables (cos, signed sin), each (B, 1, T, head_dim), of 1-D `positions` (B, T).

        With 2-D image positions, `image_start` (B,) (each row's `<img>` position, NO_IMAGE if
        none) places the image codes on their grid (`image_positions_2d`), `image_position_blend`
        of the way from their 1-D rotations.
        """
        rope_of = functools.partial(rope_cos_sin, head_dim=self.config.head_dim, theta=self.config.rope_theta,
                                    dtype=dtype)
        if self.config.image_positions != "2d":
            return rope_of(positions)
        rope = rope_of(image_positions_2d(positions, image_start, self.config.image_grid))  # (B, T, 2) positions
        if self.image_position_blend < 1.0:
            rope = blend_rope(rope_of(positions), rope, self.image_position_blend)
        return rope

    def _image_start(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache | None):
        """(B,) position of each row's `<img>`: in this input, else remembered by the cache, else NO_IMAGE.
        A cache remembers it (in place, without a host sync: CUDA graphs replay this)."""
        is_boi = input_ids == self.vocab.boi_id  # (B, T)
        here = positions.gather(1, is_boi.long().argmax(1, keepdim=True)).squeeze(1)  # first <img>, if any
        before = kv_cache.image_start if kv_cache is not None else torch.full_like(here, NO_IMAGE)
        start = torch.where(is_boi.any(1), here, before)
        if kv_cache is not None:
            kv_cache.image_start.copy_(start)
        return start

    @staticmethod
    def _attention_mask(query_slots: torch.Tensor, key_slots: torch.Tensor, pad_lengths: torch.Tensor):
        """(B, 1, T, S) bool: causal over slots, padding keys hidden. A query always sees itself,
        so padding rows never get an all-masked (NaN) softmax."""
        causal = key_slots[None, :] <= query_slots[:, None]  # (T, S)
        valid = key_slots[None, :] >= pad_lengths[:, None]  # (B, S)
        itself = key_slots[None, :] == query_slots[:, None]  # (T, S)
        return ((causal[None] & valid[:, None]) | itself[None])[:, None]

    def logits(self, hidden: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """Output logits for all vocabulary rows, or only for `rows` (e.g. `vocab.image_ids`)."""
        head = self.lm_head if self.lm_head is not None else self.embed
        return head.project(hidden, rows)

    def forward(
        self,
        input_ids: torch.Tensor,
        image_mask: ImageMask,
        input_pos: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        pad_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size)."""
        return self.logits(self.forward_hidden(input_ids, image_mask, input_pos, kv_cache, pad_lengths))

    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The routing mask of `input_ids`: True where the visual expert runs."""
        return self.vocab.is_visual(input_ids)

    # --- parameter groups --------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """Every parameter in exactly one group: text_expert, visual_expert, text_vocab,
        new_vocab, norms. Stages choose which groups train (`mars.train.stages.set_trainable`)."""
        groups: dict[str, dict[str, nn.Parameter]] = {
            "text_expert": {}, "visual_expert": {}, "text_vocab": {}, "new_vocab": {}, "norms": {},
        }
        for name, param in self.named_parameters():
            if ".text." in name:
                groups["text_expert"][name] = param
            elif ".visual." in name:
                groups["visual_expert"][name] = param
            elif name.endswith("text_weight"):
                groups["text_vocab"][name] = param
            elif name.endswith("new_weight"):
                groups["new_vocab"][name] = param
            elif "norm" in name:
                groups["norms"][name] = param
            else:
                raise AssertionError(f"parameter {name} belongs to no group")
        return groups

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # --- save / load -------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write `config.json` + `model.safetensors` (sharded with an index when large)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_weights(self.state_dict(), directory, max_shard_bytes)
        config = {"model_type": MODEL_TYPE, **self.config.to_dict()}
        atomic_write_text(directory / "config.json", json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> "SemVIE":
        """Load a model saved by `save_pretrained`; the architecture comes from its `config.json`."""
        directory = Path(directory)
        config = load_model_config(directory)
        state = load_weights(directory)
        with torch.device("meta"):
            model = cls(config)
        check_state_dict({k: v.shape for k, v in model.state_dict().items()}, state, str(directory))
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        model.load_state_dict(state, assign=True)
        return model.to(device)


def load_model_config(directory: str | Path) -> SemVIEConfig:
    """The `SemVIEConfig` stored in a model folder's `config.json`."""
    file = Path(directory) / "config.json"
    if not file.is_file():
        raise MarsError(f"no MARS model at {directory} (config.json missing)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MarsError(f"{file} is not valid JSON: {err}") from None
    if data.pop("model_type", None) != MODEL_TYPE:
        raise MarsError(f"{file} is not a MARS model config (model_type {MODEL_TYPE!r} expected); "
                        f"to convert a Hugging Face checkpoint run `mars init --backbone DIR --out OUT`")
    return from_dict(SemVIEConfig, data)
