"""Image loading and the image <-> tensor conversions used by every data source and the VQ tokenizer."""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image, ImageOps

MIN_SIDE = 8


class UnusableImage(ValueError):
    """An image that cannot be used for training (unreadable, or too small)."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited on white, 16/32-bit is scaled to 8-bit."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High bit depth grayscale: Pillow's convert("L") would clip at 255, so rescale instead.
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or a.max() > 255:
            a = a / 257.0  # 0..65535 -> 0..255
        return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8)).convert("RGB")
    if (img.mode == "P" and "transparency" in img.info) or img.mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_image(source: str | os.PathLike | bytes, min_side: int = MIN_SIDE) -> Image.Image:
    """Open an image file (or its bytes) as an RGB PIL image, upright per its EXIF orientation.

    Raises UnusableImage when it cannot be decoded or its shorter side is below `min_side`.
    """
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        with Image.open(fp) as img:
            img.load()  # decode now, so truncated files fail here and not later
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
    except Exception as err:  # decoders of untrusted files raise many types; none may end an epoch
        reason = str(err) or type(err).__name__
        if not isinstance(source, (bytes, bytearray)):
            reason = reason.replace(f" {str(source)!r}", "")  # reports name the file already
        raise UnusableImage(reason) from err
    if min(rgb.size) < min_side:
        raise UnusableImage(f"too small: {rgb.size[0]}x{rgb.size[1]} < {min_side} px")
    return rgb


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution`, then cut the central resolution x resolution square.

    Shrinking uses LANCZOS (it filters, so fine detail does not alias); enlarging uses BICUBIC.
    """
    w, h = img.size
    if (w, h) == (resolution, resolution):
        return img
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        method = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        img = img.resize((new_w, new_h), method)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1]."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(a).permute(2, 0, 1).div(127.5).sub(1.0)


def tensor_to_pil(t: torch.Tensor) -> Image.Image:
    """Float tensor (3, H, W) in [-1, 1] -> RGB PIL image (values outside are clamped)."""
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(t.shape)}")
    a = t.detach().float().cpu().add(1.0).mul(127.5).round().clamp(0, 255)
    return Image.fromarray(a.to(torch.uint8).permute(1, 2, 0).contiguous().numpy())
