"""VQ-GAN image tokenizer: convolutional encoder, vector quantizer, convolutional decoder.

Module structure and parameter names are those of taming-transformers' `VQModel`
(`encoder.down.{i}.block.{j}.conv1`, `encoder.mid.attn_1.q`, `decoder.up.{i}.upsample.conv`,
`quantize.embedding.weight`, `quant_conv`, `post_quant_conv`, ...), so public taming checkpoints
load strictly (see `mars.vq.io.import_taming_checkpoint`). The network is fully convolutional:
train on crops, run on any size that is a multiple of `config.downsample`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mars.errors import MarsError
from mars.vq.config import MODEL_TYPE, VQConfig
from mars.vq.quantizer import QuantizerOutput, VectorQuantizer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Config fields added after tokenizers (and the code shards that record their hash) were saved:
# hashed only when they differ from their default, so those hashes stay valid.
HASHED_ONLY_IF_CHANGED = ("norm_type", "mid_attention", "decoder_ch", "patch_local")
DECODER_SIDE = ("decoder", "post_quant_conv")  # modules that only draw; the rest makes the codes


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels at each position of a (B, C, H, W) map: unlike GroupNorm,
    whose statistics span the whole picture, an output depends only on its own position.
    Parameters `weight` / `bias` of shape (C,), as GroupNorm's."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def norm(channels: int, cfg: VQConfig) -> nn.Module:
    """The normalisation layer `cfg.norm_type` names ("group": taming's GroupNorm, "layer")."""
    if cfg.norm_type == "layer":
        return ChannelLayerNorm(channels)
    return nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Norm -> SiLU -> conv, twice, plus a (1x1-projected if needed) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, cfg: VQConfig):
        super().__init__()
        self.norm1 = norm(in_channels, cfg)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = norm(out_channels, cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map (1x1 conv projections)."""

    def __init__(self, channels: int, cfg: VQConfig):
        super().__init__()
        self.norm = norm(channels, cfg)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C), scale C ** -0.5 as taming
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with taming's asymmetric (right/bottom) zero padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, z_channels, H/f, W/f)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        levels = len(cfg.ch_mult)
        self.patch = cfg.downsample if cfg.patch_local else 0  # > 0: encode each patch on its own
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        in_mult = (1,) + cfg.ch_mult
        res = cfg.resolution
        self.down = nn.ModuleList()
        for i in range(levels):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_in = cfg.ch * in_mult[i]
            block_out = cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, cfg))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, cfg))
            if i != levels - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, cfg)
        self.mid.attn_1 = AttnBlock(block_in, cfg) if cfg.mid_attention else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in, cfg)
        self.norm_out = norm(block_in, cfg)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.patch:
            return self.encode_map(x)
        B, C, H, W = x.shape
        f, h, w = self.patch, H // self.patch, W // self.patch
        patches = x.reshape(B, C, h, f, w, f).permute(0, 2, 4, 1, 3, 5).reshape(B * h * w, C, f, f)
        z = self.encode_map(patches)  # (B*h*w, Z, 1, 1)
        return z.reshape(B, h, w, -1).permute(0, 3, 1, 2)  # (B, Z, h, w)

    def encode_map(self, x: torch.Tensor) -> torch.Tensor:
        """The convolutional encoder over a whole (B, 3, H, W) map -> (B, Z, H/f, W/f)."""
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))  # (B, C, H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h*f, w*f). `up[i]` mirrors encoder level i."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        levels = len(cfg.ch_mult)
        width = cfg.decoder_width
        block_in = width * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, cfg)
        self.mid.attn_1 = AttnBlock(block_in, cfg) if cfg.mid_attention else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in, cfg)
        self.up = nn.ModuleList()
        for i in reversed(range(levels)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_out = width * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, cfg))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, cfg))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            self.up.insert(0, level)  # keep up[i] <-> level i, as taming
        self.norm_out = norm(block_in, cfg)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)


class VQModel(nn.Module):
    """A VQ-GAN tokenizer: images in [-1, 1] <-> grids of code indices.

    >>> vq = VQModel.from_pretrained("runs/vq-shapes-small/final")
    >>> codes = vq.encode_to_codes(images)   # (B, 3, 256, 256) -> (B, 16, 16) long
    >>> images = vq.decode_codes(codes)      # -> (B, 3, 256, 256) in [-1, 1]
    """

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.codebook_size, config.codebook_embed_dim,
                                        config.beta, config.codebook_l2_norm)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    # ---- training-time path -------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> QuantizerOutput:
        """(B, 3, H, W) -> quantized latents, codes and the two quantizer losses."""
        self._check_size(images)
        return self.quantize(self.quant_conv(self.encoder(images)))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) code vectors -> (B, 3, h*f, w*f), unclamped."""
        return self.decoder(self.post_quant_conv(z_q.to(self.post_quant_conv.weight.dtype)))

    def forward(self, images: torch.Tensor, quantize: bool = True) -> tuple[torch.Tensor, QuantizerOutput]:
        """Reconstruct `images`; returns the reconstruction and the quantizer output.

        quantize=False decodes the continuous encoder output instead of the codes (the
        autoencoder warm-up of training); codes and losses are still computed.
        """
        quant = self.encode(images)
        return self.decode(quant.z_q if quantize else quant.z), quant

    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's output conv (the adaptive GAN weight is measured here)."""
        return self.decoder.conv_out.weight

    # ---- public tokenizer API -----------------------------------------------------------
    @torch.no_grad()
    def encode_to_codes(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) float in [-1, 1] -> codes (B, H/f, W/f) long."""
        images = images.to(device=self.quant_conv.weight.device, dtype=self.quant_conv.weight.dtype)
        return self.encode(images).codes

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) long -> images (B, 3, h*f, w*f) float in [-1, 1] (clamped)."""
        codes = codes.to(self.quant_conv.weight.device).long()
        return self.decode(self.quantize.lookup(codes)).clamp(-1.0, 1.0)

    def _check_size(self, images: torch.Tensor) -> None:
        f = self.config.downsample
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}")
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of {f}")

    # ---- persistence --------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write `config.json` and `model.safetensors` (float32) into `directory`."""
        from mars.vq.io import save_state_dict

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"model_type": MODEL_TYPE, **self.config.to_dict()}
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        save_state_dict({k: v.float() for k, v in self.state_dict().items()}, directory / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> VQModel:
        """Load a tokenizer written by `save_pretrained` (architecture read from config.json)."""
        from mars.vq.io import load_state_dict_strict, read_safetensors

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            raise MarsError(f"{directory} is not a tokenizer directory ({CONFIG_NAME} + {WEIGHTS_NAME})")
        model = cls(VQConfig.load(config_path))
        load_state_dict_strict(model, read_safetensors(weights_path), source=str(weights_path))
        return model.to(device).eval()

    def identity_hash(self) -> str:
        """Short sha256 of config + weights: equal hashes mean the same tokenizer."""
        return self._hash(self.config.to_dict(), self.state_dict())

    def codes_hash(self) -> str:
        """Short sha256 of what makes the codes (config and weights, the decoder side left out):
        a tokenizer whose decoder alone was trained further (`trainable: decoder`) keeps it, so
        codes it made are valid for it."""
        config = {**self.config.to_dict(), "decoder_ch": VQConfig.decoder_ch}  # any width draws the same codes
        state = {k: v for k, v in self.state_dict().items() if k.split(".")[0] not in DECODER_SIDE}
        return self._hash(config, state, prefix="codes:")

    @staticmethod
    def _hash(config: dict, state: dict[str, torch.Tensor], prefix: str = "") -> str:
        for name in HASHED_ONLY_IF_CHANGED:
            if config[name] == getattr(VQConfig, name):
                del config[name]
        digest = hashlib.sha256((prefix + json.dumps(config, sort_keys=True)).encode())
        for name, tensor in sorted(state.items()):
            t = tensor.detach().float().cpu().contiguous()
            digest.update(f"{name}:{tuple(t.shape)}".encode())
            digest.update(t.numpy().tobytes())
        return digest.hexdigest()[:16]
