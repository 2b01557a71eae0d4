"""Decoder-only fine-tuning (`trainable: decoder`): every image keeps exactly its codes."""

import pytest
import torch

from mars.errors import MarsError
from mars.vq.config import VQConfig
from mars.vq.model import VQModel
from mars.vq.train import Trainer
from mars.vq.widen import copy_index

from .test_train import shapes_images, tiny_cfg


def test_decoder_only_training_keeps_every_code(tmp_path):
    images = shapes_images(6)
    cfg = tiny_cfg(tmp_path, "trainable=decoder", "restart_dead_codes_every=0", "perceptual_weight=0",
                   "disc_weight=0", "steps=4", "crop_size=32")
    trainer = Trainer(cfg, images=images, progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    codes_before = trainer.model.encode_to_codes(images)
    model = trainer.fit()
    after = model.state_dict()
    frozen = [k for k in before if not k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert torch.equal(model.encode_to_codes(images), codes_before)
    assert VQConfig.load(tmp_path / "final") == model.config  # a saved tokenizer names its architecture


def test_bad_decoder_settings_are_named(tmp_path):
    with pytest.raises(MarsError, match="keeps the codes fixed"):
        tiny_cfg(tmp_path, "trainable=decoder")  # tiny_cfg restarts dead codes
    with pytest.raises(MarsError, match="trainable must be"):
        tiny_cfg(tmp_path, "trainable=encoder")


def test_a_wider_decoder_trains_on_the_frozen_codes_of_a_finished_tokenizer(tmp_path):
    images = shapes_images(6)
    decoder_only = ["trainable=decoder", "restart_dead_codes_every=0", "perceptual_weight=0", "disc_weight=0",
                    "steps=3", "crop_size=32"]
    finished = Trainer(tiny_cfg(tmp_path / "a", *decoder_only), images=images, progress=False).model
    finished.save_pretrained(tmp_path / "vq")
    codes = finished.encode_to_codes(images)
    wide = Trainer(tiny_cfg(tmp_path / "b", *decoder_only, f"init_from={tmp_path / 'vq'}", "model.decoder_ch=24"),
                   images=images, progress=False)  # 24 is no whole multiple of 16: a fresh decoder
    assert wide.model.decoder.conv_out.weight.shape[1] == 24
    model = wide.fit()
    assert torch.equal(model.encode_to_codes(images), codes)  # the codes, and so any LM on them, stay valid
    reloaded = VQModel.from_pretrained(tmp_path / "b" / "final")
    assert reloaded.config.decoder_width == 24 and torch.equal(reloaded.encode_to_codes(images), codes)
    # the width is the only thing that may change, and only when just the decoder trains
    with pytest.raises(MarsError, match="only decoder_ch may differ"):
        Trainer(tiny_cfg(tmp_path / "c", *decoder_only, f"init_from={tmp_path / 'vq'}", "model.decoder_ch=24",
                         "model.codebook_size=16"), images=images, progress=False)
    with pytest.raises(MarsError, match="different architecture"):
        Trainer(tiny_cfg(tmp_path / "d", f"init_from={tmp_path / 'vq'}", "model.decoder_ch=24"),
                images=images, progress=False)


@pytest.mark.parametrize("norm_type", ["group", "layer"])
def test_a_decoder_widened_by_a_whole_factor_draws_the_same_pictures_then_its_copies_part(tmp_path, norm_type):
    images = shapes_images(6)
    decoder_only = ["trainable=decoder", "restart_dead_codes_every=0", "perceptual_weight=0", "disc_weight=0",
                    "steps=3", "crop_size=32", f"model.norm_type={norm_type}", "model.attn_resolutions=[8]"]
    finished = Trainer(tiny_cfg(tmp_path / "a", *decoder_only), images=images, progress=False).fit()
    codes = finished.encode_to_codes(images)
    wide = Trainer(tiny_cfg(tmp_path / "b", *decoder_only, f"init_from={tmp_path / 'a' / 'final'}",
                            "model.decoder_ch=32"), images=images, progress=False)
    full_resolution = wide.model.decoder.up[0].block[-1]  # 32 channels, two copies of each old one
    first, second = (copy_index(16, 2, 8 if norm_type == "group" else 1) == 0).nonzero().flatten().tolist()
    seen = []
    full_resolution.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    with torch.no_grad():
        torch.testing.assert_close(wide.model.decode_codes(codes), finished.decode_codes(codes), atol=2e-5, rtol=0)
    torch.testing.assert_close(seen[-1][:, first], seen[-1][:, second])
    model = wide.fit()
    with torch.no_grad():
        model.decode_codes(codes)
    assert not torch.allclose(seen[-1][:, first], seen[-1][:, second], atol=1e-4)  # the random shares broke the tie
    assert torch.equal(model.encode_to_codes(images), codes)
