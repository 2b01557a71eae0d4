import numpy as np
import pytest
import scipy.linalg
import torch

from mars.vq.evaluate import ReconstructionReport, evaluate_reconstruction, frechet_metric
from mars.vq.perceptual import EfficientNetFeatures


def frechet_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook FID formula (pytorch-fid) on two feature sets, float64 numpy/scipy."""
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_rfid_proxy_equals_scipy_frechet():
    # Stage-2 features (40-d) so that 120 samples give well-conditioned covariances; the head
    # features (1280-d) go through the same torchmetrics code path.
    g = torch.Generator().manual_seed(0)
    real = torch.rand(120, 3, 32, 32, generator=g)
    fake = (real + 0.15 * torch.randn(real.shape, generator=g)).clamp(0, 1)
    metric = frechet_metric(image_size=32, stage=2)
    for i in range(0, 120, 40):
        metric.update(real[i:i + 40], real=True)
        metric.update(fake[i:i + 40], real=False)
    ours = float(metric.compute())
    feats = EfficientNetFeatures(image_size=32, stage=2)
    expected = frechet_numpy(feats(real).double().numpy(), feats(fake).double().numpy())
    assert ours == pytest.approx(expected, rel=1e-3)
    assert ours > 0


def test_rfid_proxy_default_features():
    metric = frechet_metric()
    assert metric.inception.num_features == 1280
    images = torch.rand(3, 3, 64, 64)
    metric.update(images, real=True)
    metric.update(images, real=False)
    assert float(metric.compute()) == pytest.approx(0.0, abs=1e-2)


def test_evaluate_reconstruction_report(tiny_model):
    images = [torch.rand(3, 32, 32) * 2 - 1 for _ in range(3)]
    report = evaluate_reconstruction(tiny_model, images, batch_size=2, rfid=False, checker=True, progress=False)
    assert isinstance(report, ReconstructionReport)
    assert report.images == 3 and report.tokens_per_image == 64
    assert 0 < report.codebook_usage <= 100
    assert 0 <= report.checker_agreement <= 1
    assert "PSNR" in report.table() and '"psnr"' in report.to_json()


def test_checker_misses_name_the_image_and_its_lost_objects(tiny_model, monkeypatch):
    """A "tokenizer" that returns the originals except a blank third image: exactly that image is a
    miss (index counted across batches), and it lost exactly the objects the checker sees in it."""
    from mars.data.checker import detect_objects
    from mars.data.images import pil_to_tensor
    from mars.data.shapes import render_scene, scene_for_index

    scenes = [render_scene(scene_for_index(3, i), 64) for i in range(3)]
    images = [pil_to_tensor(scene) for scene in scenes]
    batches = iter([torch.stack(images[:2]), torch.stack([torch.ones_like(images[2])])])
    monkeypatch.setattr(tiny_model, "decode_codes", lambda codes: next(batches))
    report = evaluate_reconstruction(tiny_model, images, batch_size=2, rfid=False, checker=True, progress=False)
    expected = sorted(f"{o.colour} {o.shape}" for o in detect_objects(scenes[2]))
    assert expected and report.checker_misses == [{"index": 2, "only_original": expected, "only_reconstruction": []}]
    assert report.checker_agreement == pytest.approx(2 / 3)


def test_psnr_of_perfect_tokenizer_is_high(tiny_model, monkeypatch):
    images = [torch.rand(3, 32, 32) * 2 - 1 for _ in range(2)]
    lookup = {}
    monkeypatch.setattr(tiny_model, "encode_to_codes", lambda x: lookup.setdefault("x", x)[:, 0, ::4, ::4].long() * 0)
    monkeypatch.setattr(tiny_model, "decode_codes", lambda c: lookup["x"])
    report = evaluate_reconstruction(tiny_model, images, rfid=False, progress=False)
    assert report.psnr >= 99 and report.ssim == pytest.approx(1.0)


def _cell_codes(images: torch.Tensor, global_bit: bool) -> torch.Tensor:
    """Stub tokenizer (f16): a cell's code is the sign of its mean; with `global_bit`, plus 2 if the
    picture's mean is positive (a code that depends on the whole picture, as with GroupNorm)."""
    cells = torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True), 16)[:, 0]  # (B, h, w)
    codes = (cells > 0).long()
    if global_bit:
        codes = codes + 2 * (images.mean(dim=(1, 2, 3)) > 0).long()[:, None, None]
    return codes


@pytest.mark.parametrize("global_bit, expected", [(False, 0.0), (True, 100.0)])
def test_far_code_changes_counts_codes_that_see_the_edit(tiny_model, monkeypatch, global_bit, expected):
    monkeypatch.setattr(tiny_model, "encode_to_codes", lambda x: _cell_codes(x, global_bit))
    monkeypatch.setattr(tiny_model, "decode_codes", lambda c: torch.zeros(c.shape[0], 3, 256, 256))
    monkeypatch.setattr(tiny_model.config, "codebook_size", 4)
    monkeypatch.setattr(tiny_model.config, "ch_mult", (1, 1, 1, 1, 1))  # f16
    images = [torch.full((3, 256, 256), -0.5) for _ in range(2)]  # grey; white right half flips the mean
    report = evaluate_reconstruction(tiny_model, images, rfid=False, progress=False)
    assert report.far_code_changes == expected
    assert "codes changed 96+ px from an edit" in report.table()


def test_far_code_changes_needs_wide_images(tiny_model):
    report = evaluate_reconstruction(tiny_model, [torch.zeros(3, 32, 32)], rfid=False, progress=False)
    assert report.far_code_changes is None  # no cell lies 96 px from the right half of 32 px


def test_code_entropy_is_the_entropy_of_the_code_histogram(tiny_model, monkeypatch):
    """Codes 0, 0, 1, 2 over the set -> p = (1/2, 1/4, 1/4): 1.5 ln 2 nats; one code only -> 0."""
    grids = iter([torch.tensor([[[0, 0], [1, 2]]]), torch.tensor([[[0, 0], [0, 0]]])])
    monkeypatch.setattr(tiny_model, "encode_to_codes", lambda x: next(grids))
    monkeypatch.setattr(tiny_model, "decode_codes", lambda c: torch.zeros(1, 3, 8, 8))
    images = [torch.zeros(3, 8, 8)]
    report = evaluate_reconstruction(tiny_model, images, rfid=False, progress=False)
    assert report.code_entropy == pytest.approx(1.5 * np.log(2))
    assert "code entropy" in report.table()
    assert evaluate_reconstruction(tiny_model, images, rfid=False, progress=False).code_entropy == 0.0
