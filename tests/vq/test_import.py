"""Import of taming-transformers VQGAN checkpoints.

`taming_shapes` re-derives taming's parameter names and shapes from its constructor logic
(taming/modules/diffusionmodules/model.py Encoder/Decoder, taming/models/vqgan.py VQModel),
independently of mars.vq.model, so a renamed or reshaped module in our code fails here.
"""

import argparse

import pytest
import torch

from mars.errors import MarsError
from mars.vq.cli import add_commands
from mars.vq.config import VQConfig
from mars.vq.io import import_taming_checkpoint
from mars.vq.model import VQModel

from .conftest import tiny_config


def _resnet(prefix, c_in, c_out):
    shapes = {f"{prefix}.norm1.weight": (c_in,), f"{prefix}.norm1.bias": (c_in,),
              f"{prefix}.conv1.weight": (c_out, c_in, 3, 3), f"{prefix}.conv1.bias": (c_out,),
              f"{prefix}.norm2.weight": (c_out,), f"{prefix}.norm2.bias": (c_out,),
              f"{prefix}.conv2.weight": (c_out, c_out, 3, 3), f"{prefix}.conv2.bias": (c_out,)}
    if c_in != c_out:
        shapes |= {f"{prefix}.nin_shortcut.weight": (c_out, c_in, 1, 1), f"{prefix}.nin_shortcut.bias": (c_out,)}
    return shapes


def _attn(prefix, c):
    shapes = {f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,)}
    for name in ("q", "k", "v", "proj_out"):
        shapes |= {f"{prefix}.{name}.weight": (c, c, 1, 1), f"{prefix}.{name}.bias": (c,)}
    return shapes


def taming_shapes(ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, n_embed, embed_dim):
    """Parameter name -> shape of taming's VQModel (Encoder with double_z=False)."""
    s = {"encoder.conv_in.weight": (ch, 3, 3, 3), "encoder.conv_in.bias": (ch,)}
    in_ch_mult, curr_res, levels = (1,) + tuple(ch_mult), resolution, len(ch_mult)
    for i in range(levels):
        block_in, block_out = ch * in_ch_mult[i], ch * ch_mult[i]
        for j in range(num_res_blocks):
            s |= _resnet(f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if curr_res in attn_resolutions:
                s |= _attn(f"encoder.down.{i}.attn.{j}", block_in)
        if i != levels - 1:
            s |= {f"encoder.down.{i}.downsample.conv.weight": (block_in, block_in, 3, 3),
                  f"encoder.down.{i}.downsample.conv.bias": (block_in,)}
            curr_res //= 2
    s |= _resnet("encoder.mid.block_1", block_in, block_in) | _attn("encoder.mid.attn_1", block_in)
    s |= _resnet("encoder.mid.block_2", block_in, block_in)
    s |= {"encoder.norm_out.weight": (block_in,), "encoder.norm_out.bias": (block_in,),
          "encoder.conv_out.weight": (z_channels, block_in, 3, 3), "encoder.conv_out.bias": (z_channels,)}

    block_in, curr_res = ch * ch_mult[-1], resolution // 2 ** (levels - 1)
    s |= {"decoder.conv_in.weight": (block_in, z_channels, 3, 3), "decoder.conv_in.bias": (block_in,)}
    s |= _resnet("decoder.mid.block_1", block_in, block_in) | _attn("decoder.mid.attn_1", block_in)
    s |= _resnet("decoder.mid.block_2", block_in, block_in)
    for i in reversed(range(levels)):
        block_out = ch * ch_mult[i]
        for j in range(num_res_blocks + 1):
            s |= _resnet(f"decoder.up.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if curr_res in attn_resolutions:
                s |= _attn(f"decoder.up.{i}.attn.{j}", block_in)
        if i != 0:
            s |= {f"decoder.up.{i}.upsample.conv.weight": (block_in, block_in, 3, 3),
                  f"decoder.up.{i}.upsample.conv.bias": (block_in,)}
            curr_res *= 2
    s |= {"decoder.norm_out.weight": (block_in,), "decoder.norm_out.bias": (block_in,),
          "decoder.conv_out.weight": (3, block_in, 3, 3), "decoder.conv_out.bias": (3,)}
    s |= {"quantize.embedding.weight": (n_embed, embed_dim),
          "quant_conv.weight": (embed_dim, z_channels, 1, 1), "quant_conv.bias": (embed_dim,),
          "post_quant_conv.weight": (z_channels, embed_dim, 1, 1), "post_quant_conv.bias": (z_channels,)}
    return s


def shapes_for(cfg: VQConfig):
    return taming_shapes(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.attn_resolutions, cfg.resolution,
                         cfg.z_channels, cfg.codebook_size, cfg.codebook_embed_dim)


@pytest.mark.parametrize("preset", ["taming-f16-16384", "f16-8192", "shapes-small"])
def test_our_names_and_shapes_are_tamings(preset):
    cfg = VQConfig.from_name(preset)
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in VQModel(cfg).state_dict().items()}
    assert ours == shapes_for(cfg)


def _taming_ckpt(cfg: VQConfig, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=g) * 0.1 for k, shape in shapes_for(cfg).items()}
    # what VQLPIPSWithDiscriminator adds to a taming training checkpoint
    state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4, generator=g)
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(64, 3, 3, 3, generator=g)
    state["loss.logvar"] = torch.zeros(())
    return {"state_dict": state, "global_step": 1234, "epoch": 3}


def test_import_taming_checkpoint(tmp_path):
    cfg = VQConfig.load({"preset": "taming-f16-1024", "ch": 8, "z_channels": 8, "norm_groups": 4,
                         "codebook_size": 16, "codebook_embed_dim": 8})
    ckpt = _taming_ckpt(cfg)
    torch.save(ckpt, tmp_path / "last.ckpt")
    model = import_taming_checkpoint(tmp_path / "last.ckpt", cfg)
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt["state_dict"][key]), key
    # the imported tokenizer round-trips through save_pretrained / from_pretrained unchanged
    model.save_pretrained(tmp_path / "vq")
    again = VQModel.from_pretrained(tmp_path / "vq")
    images = torch.rand(1, 3, 256, 256) * 2 - 1
    codes = model.encode_to_codes(images)
    assert tuple(codes.shape) == (1, 16, 16)
    assert torch.equal(again.encode_to_codes(images), codes)
    assert torch.equal(again.decode_codes(codes), model.decode_codes(codes))


def test_import_tiny_compare_outputs_with_cli(tmp_path, tiny_model):
    cfg = tiny_config()
    ckpt = {"state_dict": {**tiny_model.state_dict(), "loss.discriminator.main.0.weight": torch.zeros(1)}}
    torch.save(ckpt, tmp_path / "model.ckpt")
    (tmp_path / "cfg.yaml").write_text("".join(f"{k}: {v}\n" for k, v in cfg.to_dict().items()))
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tokenizer", "import", str(tmp_path / "model.ckpt"), "--config",
                              str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "out")])
    args.func(args)
    imported = VQModel.from_pretrained(tmp_path / "out")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(imported.decode_codes(imported.encode_to_codes(images)),
                       tiny_model.decode_codes(tiny_model.encode_to_codes(images)))


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.pop("decoder.up.1.block.0.conv1.weight"), "missing key 'decoder.up.1.block.0.conv1.weight'"),
    (lambda s: s.__setitem__("quantize.embedding.weight", torch.zeros(17, 8)),
     r"'quantize.embedding.weight' has shape \(17, 8\)"),
    (lambda s: s.__setitem__("quantize.cluster_size", torch.zeros(16)), "unexpected key 'quantize.cluster_size'"),
])
def test_mismatched_checkpoint_names_the_key(tmp_path, mutate, message):
    cfg = VQConfig.load({"preset": "taming-f16-1024", "ch": 8, "z_channels": 8, "norm_groups": 4,
                         "codebook_size": 16, "codebook_embed_dim": 8})
    ckpt = _taming_ckpt(cfg)
    mutate(ckpt["state_dict"])
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(MarsError, match=message):
        import_taming_checkpoint(tmp_path / "bad.ckpt", cfg)


class Callback:  # stands in for the Lightning objects a full training checkpoint pickles
    pass


def test_checkpoint_with_pickled_objects_is_refused_with_explanation(tmp_path):
    torch.save({"state_dict": {}, "callbacks": Callback()}, tmp_path / "lightning.ckpt", pickle_protocol=2)
    with pytest.raises(MarsError, match="pickled Python objects"):
        import_taming_checkpoint(tmp_path / "lightning.ckpt", VQConfig.from_name("shapes-small"))


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"not a zip or pickle")
    with pytest.raises(MarsError, match="junk.ckpt"):
        import_taming_checkpoint(tmp_path / "junk.ckpt", VQConfig.from_name("shapes-small"))
