"""The FID Inception network: published architecture, parameter count, key names, strict loading."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mars.cli import main
from mars.errors import MarsError
from mars.eval.inception import WEIGHTS_FILE, FIDInceptionV3, _avg_pool_tf

# torchvision documents 27,161,264 parameters for Inception3 (1000 classes, with the AuxLogits head).
# The FID graph has no AuxLogits head (conv0 768->128 1x1 + BN, conv1 128->768 5x5 + BN, fc 768->1000)
# and 1008 classes instead of 1000.
TORCHVISION_INCEPTION_V3 = 27_161_264
AUX_HEAD = (768 * 128 + 2 * 128) + (128 * 768 * 25 + 2 * 768) + (768 * 1000 + 1000)
FID_INCEPTION_PARAMS = TORCHVISION_INCEPTION_V3 - AUX_HEAD + 8 * (2048 + 1)

# Names and shapes of tensors in pt_inception-2015-12-05-6726825d.pth (torchvision's Inception3 names).
PUBLISHED = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.bn.bias": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}
N_CONV_BLOCKS = 5 + 3 * 7 + 4 + 4 * 10 + 6 + 2 * 9  # stem, A x3, B, C x4, D, E x2


@pytest.fixture(scope="module")
def net() -> FIDInceptionV3:
    torch.manual_seed(0)
    return FIDInceptionV3().eval()


@pytest.fixture(scope="module")
def published(net) -> dict[str, torch.Tensor]:
    """A random state dict shaped and named like the published file (without the BatchNorm
    counters, which old PyTorch versions did not save)."""
    gen = torch.Generator().manual_seed(1)
    state = {}
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        fresh = torch.rand(value.shape, generator=gen) if key.endswith("running_var") else \
            torch.randn(value.shape, generator=gen) * 0.05
        state[key] = fresh + (0.5 if key.endswith("running_var") else 0.0)
    return state


def test_architecture_matches_the_published_network(net):
    assert sum(p.numel() for p in net.parameters()) == FID_INCEPTION_PARAMS == 23_850_960
    state = net.state_dict()
    for key, shape in PUBLISHED.items():
        assert tuple(state[key].shape) == shape, key
    assert len([k for k in state if not k.endswith("num_batches_tracked")]) == N_CONV_BLOCKS * 5 + 2
    assert not any(k.startswith("AuxLogits") for k in state)
    # pytorch-fid's patches: TF average pools ignore padding; Mixed_7c max-pools its pool branch
    assert not net.Mixed_7b.max_pool and net.Mixed_7c.max_pool
    ones = torch.ones(1, 2, 5, 5)
    assert torch.equal(_avg_pool_tf(ones), ones)  # count_include_pad=True would give 4/9 in the corners


def test_forward_gives_2048_pool_features_at_any_input_size(net):
    with torch.no_grad():
        feats = net(torch.rand(2, 3, 64, 48))
    assert feats.shape == (2, 2048)
    assert (feats >= 0).all()  # a mean of ReLU outputs


def test_loads_the_published_key_names_strictly(published, tmp_path, capsys):
    path = tmp_path / WEIGHTS_FILE
    torch.save(published, path)
    loaded = FIDInceptionV3.from_file(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for key, value in published.items():
        assert torch.equal(loaded.state_dict()[key], value), key

    # the standard FID through the CLI with that file: a set against itself is 0
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (200, 20, 20)).save(images / "a.png")
    Image.new("RGB", (32, 32), (20, 20, 200)).save(images / "b.png")
    assert main(["eval", "fid", "--real", str(images), "--fake", str(images), "--features", "inception",
                 "--weights", str(path), "--json", str(tmp_path / "fid.json")]) == 0
    result = json.loads((tmp_path / "fid.json").read_text())
    assert result["features"] == "inception" and result["fid"] == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("Mixed_6c.branch7x7_3.bn.running_mean"), "missing key 'Mixed_6c.branch7x7_3.bn.running_mean'"),
    (lambda s: s.__setitem__("AuxLogits.fc.weight", torch.zeros(1008, 768)), "unexpected key 'AuxLogits.fc.weight'"),
    (lambda s: s.__setitem__("fc.weight", torch.zeros(1000, 2048)), "'fc.weight' has shape"),
])
def test_a_state_dict_that_does_not_fit_is_refused(published, edit, message):
    state = dict(published)
    edit(state)
    with pytest.raises(MarsError, match=message.replace("(", r"\(")):
        FIDInceptionV3().load_published(state)


def test_missing_weights_file_says_which_file_and_where(tmp_path):
    for path in (None, tmp_path / "nope.pth"):
        with pytest.raises(MarsError) as err:
            FIDInceptionV3.from_file(path)
        assert WEIGHTS_FILE in str(err.value) and "github.com/mseitzer/pytorch-fid/releases" in str(err.value)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(MarsError, match="cannot read"):
        FIDInceptionV3.from_file(bad)
