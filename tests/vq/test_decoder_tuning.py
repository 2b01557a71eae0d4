"""Decoder-only fine-tuning (`trainable: decoder`): every image keeps exactly its codes."""

import pytest
import torch

from mars.errors import MarsError
from mars.vq.config import VQConfig
from mars.vq.train import Trainer

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
