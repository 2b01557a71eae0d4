"""`VQConfig`: the architecture of a VQ-GAN image tokenizer, and its named presets.

The field names follow taming-transformers' `ddconfig` (ch, ch_mult, num_res_blocks,
attn_resolutions, z_channels, resolution) so a taming YAML translates one-to-one, plus the
quantizer settings (LlamaGen's `codebook_l2_norm` / `codebook_embed_dim`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mars.config import apply_overrides, from_dict, read_config_file
from mars.errors import MarsError


@dataclass
class VQConfig:
    """Encoder/decoder geometry and quantizer of a VQ-GAN (taming `VQModel` layout)."""

    ch: int = 128  # channels at full resolution
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # channel multiplier per level; f = 2 ** (levels - 1)
    num_res_blocks: int = 2  # ResNet blocks per encoder level (the decoder has one more)
    attn_resolutions: tuple[int, ...] = (16,)  # feature sizes (at `resolution` input) with attention
    resolution: int = 256  # nominal input size; only used to place `attn_resolutions` (as taming)
    z_channels: int = 256  # encoder output / decoder input channels
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    norm_groups: int = 32  # GroupNorm groups (taming: 32)
    # "group": taming's GroupNorm, whose statistics span the whole picture, so with `mid_attention`
    # every code depends on all of it; "layer": LayerNorm over channels at each position, which
    # (with mid_attention off) makes a code depend only on the pixels in its receptive field.
    norm_type: str = "group"
    mid_attention: bool = True  # self-attention over all positions in the encoder's and decoder's mid block
    # True: the encoder sees each f x f patch on its own, so a code is a function of its patch's
    # pixels alone and equal patches always get equal codes (a white background is one code, not
    # hundreds that hash the rest of the picture). The decoder still sees every code around it.
    # Changes no weight: a trained tokenizer can be fine-tuned into this mode.
    patch_local: bool = False
    # Decoder channels at full resolution; 0 = `ch` (taming: one width for both). A wider decoder
    # can be trained on the frozen codes of a finished tokenizer (`trainable: decoder`).
    decoder_ch: int = 0
    codebook_size: int = 8192
    codebook_embed_dim: int = 8  # code vector size (quant_conv maps z_channels -> this)
    codebook_l2_norm: bool = True  # LlamaGen: match on the unit sphere (cosine similarity)
    beta: float = 0.25  # commitment loss weight

    def __post_init__(self) -> None:
        self.ch_mult = tuple(self.ch_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        if not self.ch_mult:
            raise MarsError("VQConfig.ch_mult must not be empty")
        if self.norm_type not in ("group", "layer"):
            raise MarsError(f"VQConfig.norm_type must be 'group' or 'layer', got {self.norm_type!r}")
        if self.decoder_ch < 0:
            raise MarsError(f"VQConfig.decoder_ch must be >= 0 (0 = ch), got {self.decoder_ch}")
        if self.norm_type == "group":
            widths = {self.ch, self.decoder_width}
            for channels in (*(w * mult for w in widths for mult in self.ch_mult), self.z_channels):
                if channels % self.norm_groups:
                    raise MarsError(f"VQConfig: {channels} channels do not split into "
                                    f"{self.norm_groups} GroupNorm groups")
        if self.codebook_size < 2 or self.codebook_embed_dim < 1:
            raise MarsError("VQConfig: codebook_size must be >= 2 and codebook_embed_dim >= 1")

    @property
    def decoder_width(self) -> int:
        """The decoder's channels at full resolution."""
        return self.decoder_ch or self.ch

    @property
    def downsample(self) -> int:
        """Pixels per token side: 2 ** (len(ch_mult) - 1)."""
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VQConfig:
        """Build from a mapping; unknown keys and mistyped values raise `MarsError`."""
        return from_dict(cls, data)

    @classmethod
    def from_name(cls, name: str) -> VQConfig:
        """A named preset (see `PRESETS`)."""
        if name not in PRESETS:
            raise MarsError(f"unknown tokenizer preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return from_dict(cls, PRESETS[name])

    @classmethod
    def load(cls, spec: str | Path | dict[str, Any] | VQConfig) -> VQConfig:
        """A config from a preset name, a YAML/JSON file, a tokenizer folder, a mapping, or a config.

        A mapping (or file) may name a base with `preset:` and override single fields.
        """
        if isinstance(spec, VQConfig):
            return spec
        if isinstance(spec, dict):
            data = dict(spec)
            preset = data.pop("preset", None)
            base = cls.from_name(preset) if preset else cls()
            return apply_overrides(base, data)
        if isinstance(spec, str) and spec in PRESETS:
            return cls.from_name(spec)
        path = Path(spec)
        if path.is_dir() and (path / "config.json").is_file():  # a saved tokenizer
            path = path / "config.json"
        if not path.is_file():
            raise MarsError(f"{spec!r} is neither a tokenizer preset ({', '.join(sorted(PRESETS))}) "
                            "nor a config file")
        data = read_config_file(path)
        if data.pop("model_type", MODEL_TYPE) != MODEL_TYPE:  # a saved tokenizer's config.json has one
            raise MarsError(f"{path} does not describe a {MODEL_TYPE} tokenizer")
        return cls.load(data)


MODEL_TYPE = "mars-vqgan"  # the `model_type` of a saved tokenizer's config.json
PRESETS: dict[str, dict[str, Any]] = {
    # MARS's tokenizer: f16, 8192 codes, taming/LlamaGen geometry with LlamaGen's 8-d l2 codes.
    "f16-8192": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                     z_channels=256, codebook_size=8192, codebook_embed_dim=8, codebook_l2_norm=True),
    # Public taming-transformers ImageNet checkpoints (vqgan_imagenet_f16_1024 / _16384).
    "taming-f16-1024": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                            z_channels=256, codebook_size=1024, codebook_embed_dim=256,
                            codebook_l2_norm=False),
    "taming-f16-16384": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                             z_channels=256, codebook_size=16384, codebook_embed_dim=256,
                             codebook_l2_norm=False),
    # The built-in MARS-Shapes tokenizer: f16 (256 px -> 16x16 codes), small enough to train on CPU:
    # 16 channels at full resolution (flat colours need little), width where the grid is coarse.
    "shapes-small": dict(ch=16, ch_mult=(1, 1, 2, 4, 8), num_res_blocks=1, attn_resolutions=(),
                         z_channels=128, norm_groups=8, codebook_size=4096, codebook_embed_dim=8,
                         codebook_l2_norm=True),
    # The same with local codes: per-position LayerNorm and no mid-block attention, so a code
    # depends only on the 16 x 16 patch and its surroundings, not on the rest of the picture
    # (with shapes-small, removing one object changes ~47 % of the codes more than 96 px away).
    "shapes-local": dict(ch=16, ch_mult=(1, 1, 2, 4, 8), num_res_blocks=1, attn_resolutions=(),
                         z_channels=128, norm_type="layer", mid_attention=False, codebook_size=4096,
                         codebook_embed_dim=8, codebook_l2_norm=True),
    # The same with patch codes: the encoder reads one 16 x 16 patch at a time (`patch_local`).
    "shapes-patch": dict(ch=16, ch_mult=(1, 1, 2, 4, 8), num_res_blocks=1, attn_resolutions=(),
                         z_channels=128, norm_type="layer", mid_attention=False, patch_local=True,
                         codebook_size=4096, codebook_embed_dim=8, codebook_l2_norm=True),
}
