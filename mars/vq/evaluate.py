"""Reconstruction quality of a tokenizer: PSNR, SSIM, codebook usage, an rFID proxy and (for
MARS-Shapes) whether the shapes checker still sees the same objects.

The rFID proxy is the Frechet distance between EfficientNet-Lite0 pooled features (1280-d) of
originals and reconstructions, computed by torchmetrics' `FrechetInceptionDistance` with a
custom feature module (no torch-fidelity, no Inception weights). It ranks tokenizers like rFID
but its values are not comparable to published rFID numbers.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm import tqdm

from mars.data.images import tensor_to_pil
from mars.vq.model import VQModel
from mars.vq.perceptual import EfficientNetFeatures


@dataclass
class ReconstructionReport:
    images: int
    psnr: float  # dB, mean over images, on 8-bit reconstructions
    ssim: float  # mean over images
    codebook_usage: float  # % of the codebook used on this set
    rfid_proxy: float | None  # EfficientNet-Lite0 Frechet distance (None if skipped)
    checker_agreement: float | None  # fraction of images with the same (colour, shape) multiset
    # % of the codes at least FAR_PX left of a whited-out right half that change when it is whited
    # out: 0 for a tokenizer whose codes see only their surroundings (None: images too narrow)
    far_code_changes: float | None
    tokens_per_image: int
    # Entropy of the code histogram over the set, in nats per code: what a model that knows only
    # the code frequencies pays per token. Low when equal content gets equal codes.
    code_entropy: float
    # Every image the checker reads differently (with the checker on): its index in the set, the
    # "colour shape" objects seen only in the original and those seen only in the reconstruction.
    checker_misses: list[dict] | None = None

    def table(self) -> str:
        rows = [("images", f"{self.images}"), ("tokens / image", f"{self.tokens_per_image}"),
                ("PSNR (dB)", f"{self.psnr:.2f}"), ("SSIM", f"{self.ssim:.4f}"),
                ("codebook usage (%)", f"{self.codebook_usage:.1f}"),
                ("rFID proxy (EffNet-Lite0)", "-" if self.rfid_proxy is None else f"{self.rfid_proxy:.3f}"),
                ("shapes checker agreement", "-" if self.checker_agreement is None
                 else f"{100 * self.checker_agreement:.1f}%"),
                (f"codes changed {FAR_PX}+ px from an edit", "-" if self.far_code_changes is None
                 else f"{self.far_code_changes:.1f}%"),
                ("code entropy (nats / code)", f"{self.code_entropy:.2f}")]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


FAR_PX = 96  # distance from the edit at which `far_code_changes` counts codes


def far_codes_changed(model: VQModel, images: torch.Tensor, codes: torch.Tensor) -> tuple[int, int]:
    """(changed, counted): codes whose cell ends at least FAR_PX pixels left of the right half,
    compared before and after that half is made white. Non-zero means a code depends on pixels
    far away (GroupNorm statistics, attention), which an autoregressive model must then predict."""
    f, width = model.config.downsample, images.shape[-1]
    far_columns = (width // 2 - FAR_PX) // f  # cells c with (c + 1) * f <= width / 2 - FAR_PX
    if far_columns <= 0:
        return 0, 0
    edited = images.clone()
    edited[..., width // 2:] = 1.0
    after = model.encode_to_codes(edited)
    return int((after[..., :far_columns] != codes[..., :far_columns]).sum()), codes[..., :far_columns].numel()


def frechet_metric(image_size: int = 224, stage: int | None = None) -> FrechetInceptionDistance:
    """torchmetrics FID over EfficientNet-Lite0 features; update with float images in [0, 1]."""
    return FrechetInceptionDistance(feature=EfficientNetFeatures(image_size, stage), normalize=True)


def object_differences(original, reconstruction) -> tuple[list[str], list[str]]:
    """The "colour shape" objects the MARS-Shapes checker finds only in the original, and only in
    the reconstruction (both empty: the same multiset)."""
    from mars.data.checker import detect_objects

    def seen(image) -> Counter:
        return Counter(f"{o.colour} {o.shape}" for o in detect_objects(image))

    a, b = seen(original), seen(reconstruction)
    return sorted((a - b).elements()), sorted((b - a).elements())


def batched(images: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    batch: list[torch.Tensor] = []
    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


@torch.no_grad()
def evaluate_reconstruction(model: VQModel, images: Iterable[torch.Tensor], *, batch_size: int = 8,
                            rfid: bool = True, checker: bool = False, progress: bool = True,
                            total: int | None = None) -> ReconstructionReport:
    """Round-trip `images` ((3, H, W) in [-1, 1]) through the tokenizer and measure the result."""
    device = model.quant_conv.weight.device
    fid = frechet_metric().to(device) if rfid else None
    counts = torch.zeros(model.config.codebook_size, dtype=torch.long)
    n, psnr_sum, ssim_sum, tokens, far_changed, far_counted = 0, 0.0, 0.0, 0, 0, 0
    misses: list[dict] = []
    bar = tqdm(total=total, desc="eval", disable=not progress, dynamic_ncols=True)
    for batch in batched(images, batch_size):
        batch = batch.to(device)
        codes = model.encode_to_codes(batch)  # (B, h, w)
        recon = model.decode_codes(codes)
        counts += torch.bincount(codes.flatten().cpu(), minlength=model.config.codebook_size)
        changed, counted = far_codes_changed(model, batch, codes)
        far_changed, far_counted = far_changed + changed, far_counted + counted
        tokens = codes.shape[1] * codes.shape[2]
        # Measure what a user gets: 8-bit images in [0, 1].
        real = ((batch.float() + 1) * 127.5).round().clamp(0, 255) / 255.0
        fake = ((recon.float() + 1) * 127.5).round().clamp(0, 255) / 255.0
        mse = (real - fake).square().mean(dim=(1, 2, 3)).clamp_min(1e-10)
        psnr_sum += float((10 * torch.log10(1.0 / mse)).sum())
        ssim_sum += float(structural_similarity_index_measure(fake, real, data_range=1.0,
                                                              reduction="none").sum())
        if fid is not None:
            fid.update(real, real=True)
            fid.update(fake, real=False)
        if checker:
            for i, (a, b) in enumerate(zip(batch, recon, strict=True)):
                lost, added = object_differences(tensor_to_pil(a), tensor_to_pil(b))
                if lost or added:
                    misses.append({"index": n + i, "only_original": lost, "only_reconstruction": added})
        n += batch.shape[0]
        bar.update(batch.shape[0])
    bar.close()
    if n == 0:
        raise ValueError("no images to evaluate")
    rfid_value = float(fid.compute()) if fid is not None and n >= 2 else None
    freq = counts[counts > 0].double() / counts.sum()
    return ReconstructionReport(
        images=n, psnr=psnr_sum / n, ssim=ssim_sum / n,
        codebook_usage=100.0 * float((counts > 0).double().mean()), rfid_proxy=rfid_value,
        checker_agreement=1.0 - len(misses) / n if checker else None, tokens_per_image=tokens,
        far_code_changes=100.0 * far_changed / far_counted if far_counted else None,
        code_entropy=float(-(freq * freq.log()).sum()), checker_misses=misses if checker else None)


def source_images(spec: str, resolution: int, n: int | None) -> tuple[Iterator[torch.Tensor], int | None]:
    """The first `n` images of an `open_source` spec as tensors, and how many there will be."""
    from itertools import islice

    from mars.data.datasets import open_source
    from mars.data.images import pil_to_tensor

    source = open_source(spec, resolution)
    total = len(source) if n is None else min(n, len(source))
    return (pil_to_tensor(s["image"]) for s in islice(source, total)), total


def write_report(report: ReconstructionReport, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(report.to_json() + "\n", encoding="utf-8")
