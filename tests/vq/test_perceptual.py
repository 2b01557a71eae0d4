import pytest
import torch

from mars.vq.perceptual import EfficientNetFeatures, EfficientNetLite0, PerceptualLoss, weights_path

WINDOW_SCREEN, RADIATOR = 904, 753  # ImageNet classes


@pytest.fixture(scope="module")
def net() -> EfficientNetLite0:
    return EfficientNetLite0.pretrained()


def test_weights_load_strictly(net):
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    ours = net.state_dict()
    assert set(ours) == set(state)
    assert all(torch.equal(ours[k], state[k]) for k in state)
    assert not any(p.requires_grad for p in net.parameters())


def test_classifies_textures_sensibly(net):
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 224), torch.linspace(-1, 1, 224), indexing="ij")
    checker = torch.sign(torch.sin(xx * 20) * torch.sin(yy * 20)).expand(3, -1, -1)
    stripes = torch.sin(xx * 40).expand(3, -1, -1)
    with torch.no_grad():
        logits = net(torch.stack([checker, stripes]))
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    assert int(logits[0].argmax()) == WINDOW_SCREEN
    assert int(logits[1].argmax()) == RADIATOR


def test_constant_image_is_finite_and_deterministic(net):
    x = torch.full((1, 3, 224, 224), 0.3)
    with torch.no_grad():
        a, b = net(x), net(x)
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_features_shape_and_input_types():
    feats = EfficientNetFeatures(image_size=64)
    images = torch.rand(2, 3, 48, 48)
    out = feats(images)
    assert out.shape == (2, 1280) and torch.isfinite(out).all()
    as_uint8 = feats((images * 255).round().to(torch.uint8))
    assert (out - as_uint8).abs().max() < 0.05 * out.abs().max()  # 8-bit rounding only
    assert torch.equal(out, feats(images))


def test_perceptual_loss_zero_for_equal_and_has_gradient():
    loss = PerceptualLoss()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    assert loss(x, x).abs().max() < 1e-5
    d = loss(y, x)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert y.grad.abs().sum() > 0
