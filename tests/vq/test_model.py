import json

import pytest
import torch

from mars.errors import MarsError
from mars.model_dir import resolve_model_path
from mars.vq import load_tokenizer
from mars.vq.config import PRESETS, VQConfig
from mars.vq.model import HASHED_ONLY_IF_CHANGED, VQModel

from .conftest import tiny_config


def narrow(preset: str) -> VQConfig:
    """The preset's geometry (levels, attention, codebook) with narrow channels, for real CPU runs."""
    return VQConfig.load({"preset": preset, "ch": 8, "z_channels": 8, "norm_groups": 4, "codebook_size": 64})


@pytest.mark.parametrize("preset", ["f16-8192", "shapes-small", "shapes-local", "shapes-patch"])
@pytest.mark.parametrize("size", [256, 512])
def test_preset_shapes_on_meta(preset, size):
    with torch.device("meta"):
        model = VQModel(VQConfig.from_name(preset))
        recon, quant = model(torch.empty(2, 3, size, size))
    f = model.config.downsample
    assert f == 16
    assert tuple(quant.codes.shape) == (2, size // f, size // f)
    assert tuple(recon.shape) == (2, 3, size, size)


@pytest.mark.parametrize("preset", ["f16-8192", "shapes-small", "shapes-local", "shapes-patch"])
@pytest.mark.parametrize("size", [256, 512])
def test_encode_decode_shapes_narrow(preset, size):
    torch.manual_seed(0)
    model = VQModel(narrow(preset)).eval()
    images = torch.rand(1, 3, size, size) * 2 - 1
    codes = model.encode_to_codes(images)
    assert codes.dtype == torch.long and tuple(codes.shape) == (1, size // 16, size // 16)
    assert 0 <= int(codes.min()) and int(codes.max()) < model.config.codebook_size
    out = model.decode_codes(codes)
    assert tuple(out.shape) == (1, 3, size, size)
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0


def test_f16_8192_geometry():
    cfg = VQConfig.from_name("f16-8192")
    assert (cfg.downsample, cfg.codebook_size, cfg.ch, cfg.ch_mult) == (16, 8192, 128, (1, 1, 2, 2, 4))
    assert cfg.num_res_blocks == 2 and cfg.attn_resolutions == (16,) and cfg.z_channels == 256
    with torch.device("meta"):
        model = VQModel(cfg)
    names = dict(model.named_parameters())
    assert "encoder.down.4.attn.1.proj_out.weight" in names  # attention at 16x16 (level 4)
    assert "decoder.up.4.attn.2.q.weight" in names
    assert "encoder.down.3.attn.0.q.weight" not in names


@pytest.mark.parametrize("preset, local", [("shapes-small", False), ("shapes-local", True)])
def test_codes_depend_on_the_whole_picture_only_with_group_norm(preset, local):
    """shapes-local's code at (0, 0) ignores pixels outside its receptive field (< 192 px); with
    GroupNorm statistics and mid-block attention (taming, shapes-small) every code sees everything."""
    torch.manual_seed(0)
    model = VQModel(narrow(preset)).eval()
    image = torch.rand(1, 3, 256, 256) * 2 - 1
    edited = image.clone()
    edited[..., 192:, 192:] = -1.0  # a black square in the far corner
    with torch.no_grad():
        z, z_edited = model.encoder(image), model.encoder(edited)  # (1, C, 16, 16)
    assert torch.equal(z[..., 0, 0], z_edited[..., 0, 0]) == local
    assert not torch.equal(z[..., 15, 15], z_edited[..., 15, 15])  # the edited corner itself changes
    names = dict(model.named_parameters())
    assert ("encoder.mid.attn_1.q.weight" in names) != local
    # Same parameter names and shapes for both norms (weight/bias per channel).
    assert names["encoder.down.0.block.0.norm1.weight"].shape == (8,)


@pytest.mark.parametrize("norm_type", ["group", "layer"])
def test_patch_codes_are_a_function_of_their_patch_alone(norm_type):
    """With `patch_local` a code reads only its own 16 x 16 pixels: editing the next patch changes
    nothing else, and equal patches anywhere in any picture get equal codes (whatever the norm)."""
    torch.manual_seed(0)
    cfg = VQConfig.load({"preset": "shapes-patch", "ch": 8, "z_channels": 8, "norm_groups": 4,
                         "codebook_size": 64, "norm_type": norm_type, "mid_attention": True})
    model = VQModel(cfg).eval()
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    image[1, :, 32:48, 16:32] = image[0, :, :16, :16]  # patch (0, 0) of image 0, copied to (2, 1) of image 1
    edited = image.clone()
    edited[0, :, :16, 16:32] = -1.0  # patch (0, 1) of image 0 turned black
    with torch.no_grad():
        z, z_edited = model.encoder(image), model.encoder(edited)  # (2, C, 4, 4)
    changed = (z != z_edited).any(dim=1)  # (2, 4, 4)
    assert changed[0, 0, 1] and int(changed.sum()) == 1
    torch.testing.assert_close(z[1, :, 2, 1], z[0, :, 0, 0])
    # The same weights applied to the whole map (patch_local off) see the neighbours.
    plain = VQModel(VQConfig.load({**cfg.to_dict(), "patch_local": False})).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(plain.encoder(image)[0, :, 0, 0], z[0, :, 0, 0])


def test_size_must_be_multiple_of_downsample(tiny_model):
    with pytest.raises(ValueError, match="multiple of 4"):
        tiny_model.encode_to_codes(torch.zeros(1, 3, 30, 32))


def test_save_load_roundtrip(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "vq")
    meta = json.loads((tmp_path / "vq" / "config.json").read_text())
    assert meta["model_type"] == "mars-vqgan" and meta["codebook_size"] == 32
    loaded = VQModel.from_pretrained(tmp_path / "vq")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = tiny_model.encode_to_codes(images)
    assert torch.equal(loaded.encode_to_codes(images), codes)
    assert torch.equal(loaded.decode_codes(codes), tiny_model.decode_codes(codes))
    assert loaded.identity_hash() == tiny_model.identity_hash()


def test_identity_hash_tracks_weights_and_config(tiny_model):
    before = tiny_model.identity_hash()
    assert len(before) == 16
    with torch.no_grad():
        tiny_model.decoder.conv_out.bias.add_(1e-3)
    assert tiny_model.identity_hash() != before
    assert VQModel(tiny_config(beta=0.5)).identity_hash() != VQModel(tiny_config()).identity_hash()
    layer_norm = VQModel(tiny_config(norm_type="layer"))
    layer_norm.load_state_dict(tiny_model.state_dict())  # same names and shapes, other function
    assert layer_norm.identity_hash() != tiny_model.identity_hash()


def test_identity_hash_of_a_saved_tokenizer_is_stable(tmp_path):
    """Shards record their tokenizer's hash: config fields added later (norm_type, mid_attention,
    decoder_ch, patch_local) must not change the hash of a tokenizer saved before them, when at
    their defaults (the shipped patch tokenizer sets only patch_local)."""
    shipped = load_tokenizer("shapes-demo")
    assert shipped.identity_hash() == "65cce799e64b57f7"  # the hash docs and shards name
    assert shipped.codes_hash() == "f86d2a4248f411d5"  # also the codes hash of vq-patch, before its decoder stage
    folder = resolve_model_path("shapes-demo") / "vq"
    config = json.loads((folder / "config.json").read_text())
    saved_before = {k: v for k, v in config.items() if k not in HASHED_ONLY_IF_CHANGED or v != getattr(VQConfig, k)}
    assert saved_before != config and saved_before["patch_local"]
    (tmp_path / "config.json").write_text(json.dumps(saved_before))
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    assert load_tokenizer(tmp_path).identity_hash() == shipped.identity_hash()


def test_load_tokenizer_accepts_vq_dir_and_model_dir(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "model" / "vq")
    (tmp_path / "model" / "config.json").write_text("{}")
    for path in (tmp_path / "model" / "vq", tmp_path / "model"):
        assert load_tokenizer(path).identity_hash() == tiny_model.identity_hash()
    with pytest.raises(MarsError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(MarsError, match="neither"):
        load_tokenizer(tmp_path)


def test_from_pretrained_rejects_mismatched_weights(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "vq")
    meta = json.loads((tmp_path / "vq" / "config.json").read_text())
    meta["codebook_size"] = 64
    (tmp_path / "vq" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(MarsError, match="quantize.embedding.weight"):
        VQModel.from_pretrained(tmp_path / "vq")


def test_config_errors():
    with pytest.raises(MarsError, match="unknown tokenizer preset"):
        VQConfig.from_name("f32-nope")
    with pytest.raises(MarsError, match="unknown key"):
        VQConfig.load({"preset": "shapes-small", "codebok_size": 5})
    with pytest.raises(MarsError, match="GroupNorm"):
        VQConfig(ch=12)
    VQConfig(ch=12, norm_type="layer")  # no groups to split into
    with pytest.raises(MarsError, match="norm_type must be 'group' or 'layer', got 'batch'"):
        VQConfig(norm_type="batch")
    assert set(PRESETS) >= {"f16-8192", "shapes-small", "shapes-local"}
