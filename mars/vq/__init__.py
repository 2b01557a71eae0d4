"""The VQ-GAN image tokenizer: images in [-1, 1] <-> grids of discrete codes (f16, 256 px -> 16x16)."""

from mars.vq.config import PRESETS, VQConfig
from mars.vq.io import load_tokenizer
from mars.vq.model import VQModel

__all__ = ["PRESETS", "VQConfig", "VQModel", "load_tokenizer"]
