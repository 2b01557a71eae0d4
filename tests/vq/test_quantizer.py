import pytest
import torch
import torch.nn.functional as F

from mars.vq.model import VQModel
from mars.vq.quantizer import CodeUsage, VectorQuantizer

from .conftest import tiny_config


@pytest.mark.parametrize("l2_norm", [False, True])
def test_codes_are_nearest_entries(l2_norm):
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=50, embed_dim=6, l2_norm=l2_norm)
    vq.embedding.weight.data.normal_()
    z = torch.randn(3, 6, 4, 5)
    out = vq(z)
    z_flat = vq.prepare(z).permute(0, 2, 3, 1).reshape(-1, 6)
    dist = torch.cdist(z_flat.double(), vq.codebook().double())  # brute force, float64
    chosen = dist.gather(1, out.codes.reshape(-1, 1)).squeeze(1)
    assert torch.allclose(chosen, dist.min(dim=1).values, atol=1e-5)
    assert torch.equal(out.codes.reshape(-1), dist.argmin(dim=1))
    # the forward value is exactly the chosen code vector
    assert torch.allclose(out.z_q.permute(0, 2, 3, 1).reshape(-1, 6), vq.codebook()[out.codes.reshape(-1)], atol=1e-6)


def test_losses_match_definitions():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, beta=0.25)
    z = torch.randn(2, 4, 3, 3)
    out = vq(z)
    e = vq.codebook()[out.codes].permute(0, 3, 1, 2)
    assert torch.allclose(out.codebook_loss, F.mse_loss(e, z))
    assert torch.allclose(out.commit_loss, 0.25 * F.mse_loss(z, e))


def test_straight_through_gradient_reaches_encoder():
    torch.manual_seed(0)
    model = VQModel(tiny_config()).train()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, quant = model(images)
    (recon - images).abs().mean().backward()  # reconstruction only: no commitment term
    grad = model.encoder.conv_in.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.quant_conv.weight.grad.abs().sum() > 0


def test_straight_through_is_identity_for_gradients():
    vq = VectorQuantizer(8, 3)
    z = torch.randn(1, 3, 2, 2, requires_grad=True)
    out = vq(z)
    upstream = torch.randn_like(out.z_q)
    (out.z_q * upstream).sum().backward()
    assert torch.allclose(z.grad, upstream)


def test_codebook_loss_moves_codes_not_encoder():
    vq = VectorQuantizer(8, 3)
    z = torch.randn(1, 3, 2, 2, requires_grad=True)
    vq(z).codebook_loss.backward()
    assert z.grad is None or z.grad.abs().sum() == 0
    assert vq.embedding.weight.grad.abs().sum() > 0


def test_restart_dead_codes_moves_them_onto_candidates():
    torch.manual_seed(0)
    vq = VectorQuantizer(10, 4)
    usage = CodeUsage(10)
    usage.update(torch.tensor([[0, 1, 1, 2]]))
    assert usage.fraction_used() == pytest.approx(0.3)
    candidates = torch.randn(5, 4)
    before = vq.embedding.weight.detach().clone()
    moved = vq.restart_codes(usage.dead(), candidates, torch.Generator().manual_seed(0))
    assert moved == 7
    after = vq.embedding.weight.detach()
    assert torch.equal(after[:3], before[:3])  # used codes stay
    for row in after[3:]:
        assert any(torch.equal(row, c) for c in candidates)


def test_entropy_loss_prefers_spread_confident_assignments():
    vq = VectorQuantizer(4, 2, l2_norm=True)
    vq.embedding.weight.data = torch.tensor([[1.0, 0], [0, 1.0], [-1.0, 0], [0, -1.0]])
    vq.entropy_temperature = 0.05
    spread = vq.codebook()  # one token on each code
    collapsed = vq.codebook()[:1].expand(4, 2)  # every token on code 0
    assert vq.entropy_loss(vq.distances(spread)) < vq.entropy_loss(vq.distances(collapsed))
