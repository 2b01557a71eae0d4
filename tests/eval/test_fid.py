"""Frechet distance against direct computations, feature statistics, folder/npz FID, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy import linalg

from mars.cli import main
from mars.errors import MarsError
from mars.eval.fid import EffNetLite0Features, fid, frechet_distance, save_statistics, set_statistics, statistics


def _random_features(rng: np.random.Generator, n: int, d: int, shift: float) -> np.ndarray:
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + shift


def _pytorch_fid_formula(mu1, s1, mu2, s2):
    """The reference: |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrtm(S1 S2)), as pytorch-fid computes it."""
    covmean = linalg.sqrtm(s1 @ s2)
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)


@pytest.mark.parametrize("n1, n2", [(200, 300), (40, 30)])  # full-rank and (d=64) singular covariances
def test_frechet_distance_matches_direct_scipy_computation(n1, n2):
    rng = np.random.default_rng(0)
    d = 16 if n1 == 200 else 64
    a, b = _random_features(rng, n1, d, 0.0), _random_features(rng, n2, d, 0.5)
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    want = _pytorch_fid_formula(mu1, s1, mu2, s2)
    # and once more through the symmetric form: Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2)
    r1 = linalg.sqrtm(s1).real
    via_sym = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(r1 @ s2 @ r1).real)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, rel=1e-6)
    assert got == pytest.approx(via_sym, rel=1e-6)


def test_frechet_distance_closed_forms():
    # identical Gaussians: 0; diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    rng = np.random.default_rng(1)
    mu, s = rng.normal(size=8), np.cov(rng.normal(size=(50, 8)), rowvar=False)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-6)
    va, vb = rng.uniform(0.5, 2, 8), rng.uniform(0.5, 2, 8)
    m1, m2 = rng.normal(size=8), rng.normal(size=8)
    want = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
    assert frechet_distance(m1, np.diag(va), m2, np.diag(vb)) == pytest.approx(want, rel=1e-9)


def test_statistics_need_two_images_and_sizes_must_agree():
    with pytest.raises(MarsError, match="at least 2"):
        statistics(np.zeros((1, 4)))
    with pytest.raises(MarsError, match="differ in size"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


class _MeanColour:
    """A stand-in feature network for folder plumbing tests: mean RGB of the image (D = 3)."""

    name, dim = "mean-colour", 3

    def prepare(self, image):
        import torch
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).mean(axis=(0, 1)))

    def __call__(self, batch):
        return batch.numpy()


def _write_images(folder, colours, size=(24, 16)):
    folder.mkdir(parents=True)
    for i, c in enumerate(colours):
        Image.new("RGB", size, c).save(folder / f"{i:03d}.png")


def test_folder_and_saved_statistics_agree(tmp_path):
    rng = np.random.default_rng(3)
    real = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(12)]
    fake = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(9)]
    _write_images(tmp_path / "real", real)
    _write_images(tmp_path / "fake" / "nested", fake, size=(10, 30))  # recursive, other size
    feats = _MeanColour()
    result = fid(tmp_path / "real", tmp_path / "fake", feats, batch_size=5)
    want = frechet_distance(*statistics(np.array(real, float)), *statistics(np.array(fake, float)))
    assert result["fid"] == pytest.approx(want, rel=1e-9)
    assert (result["n_real"], result["n_fake"]) == (12, 9)

    mu, sigma, n = set_statistics(tmp_path / "real", feats)
    save_statistics(tmp_path / "real.npz", mu, sigma, n, feats.name)
    again = fid(tmp_path / "real.npz", tmp_path / "fake", feats)
    assert again["fid"] == pytest.approx(result["fid"], rel=1e-12) and again["n_real"] == 12


def test_statistics_of_another_network_are_refused(tmp_path):
    save_statistics(tmp_path / "s.npz", np.zeros(3), np.eye(3), 4, "inception")
    with pytest.raises(MarsError, match="inception statistics"):
        set_statistics(tmp_path / "s.npz", _MeanColour())


def test_effnet_features_shape_and_fid_cli(tmp_path, capsys):
    feats = EffNetLite0Features()
    x = feats.prepare(Image.new("RGB", (64, 48), (200, 30, 30)))
    assert tuple(x.shape) == (3, 224, 224)
    assert feats(x[None]).shape == (1, 1280)

    # the same set against itself through the CLI: 0 (up to rounding), with the table and the JSON
    _write_images(tmp_path / "a", [(255, 0, 0), (0, 255, 0), (0, 0, 255)], size=(32, 32))
    assert main(["eval", "fid", "--real", str(tmp_path / "a"), "--fake", str(tmp_path / "a"),
                 "--json", str(tmp_path / "same.json")]) == 0
    same = json.loads((tmp_path / "same.json").read_text())
    assert same["fid"] == pytest.approx(0.0, abs=1e-3) and same["features"] == "effnet-lite0"
    assert same["n_real"] == same["n_fake"] == 3
    assert "FD" in capsys.readouterr().out


def test_fid_cli_errors(tmp_path, capsys):
    assert main(["eval", "fid", "--real", str(tmp_path / "missing"), "--fake", str(tmp_path)]) == 2
    assert "neither a folder" in capsys.readouterr().err
    assert main(["eval", "fid", "--real", str(tmp_path), "--fake", str(tmp_path), "--features", "inception"]) == 2
    assert "pt_inception-2015-12-05-6726825d.pth" in capsys.readouterr().err
