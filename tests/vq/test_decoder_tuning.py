"""Decoder-only fine-tuning (`trainable: decoder`) and the palette loss of flat-colour worlds."""

import pytest
import torch

from mars.errors import MarsError
from mars.vq.config import VQConfig
from mars.vq.losses import palette_loss
from mars.vq.train import Trainer, parse_palette

from .test_train import shapes_images, tiny_cfg

WHITE, ORANGE, YELLOW = (255, 255, 255), (245, 140, 30), (240, 210, 40)


def rgb(*colours) -> torch.Tensor:
    """A (1, 3, 1, N) image of these 0..255 colours in [-1, 1]."""
    return (torch.tensor(colours, dtype=torch.float32) / 127.5 - 1.0).T[None, :, None, :]


def test_palette_loss_lands_on_fringe_pixels():
    palette = rgb(WHITE, ORANGE, YELLOW)[0, :, 0, :].T  # (3, 3)
    target = rgb(ORANGE, WHITE)
    exact = palette_loss(target, target, palette, 0.02)
    # Half orange, half white: nearer yellow than either colour, as the shapes checker sees it.
    blend = tuple((a + b) // 2 for a, b in zip(ORANGE, WHITE, strict=True))
    fringe = palette_loss(target, rgb(ORANGE, blend), palette, 0.02)
    slightly_off = palette_loss(target, rgb((240, 145, 35), (250, 250, 250)), palette, 0.02)
    assert exact < 1e-6 and slightly_off < 1e-3 and fringe > 1.0


def test_decoder_only_training_keeps_every_code(tmp_path):
    images = shapes_images(6)
    cfg = tiny_cfg(tmp_path, "trainable=decoder", "restart_dead_codes_every=0", "perceptual_weight=0",
                   "disc_weight=0", "palette=shapes", "palette_weight=0.1", "steps=4", "crop_size=32")
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


def test_bad_palette_and_decoder_settings_are_named(tmp_path):
    assert len(parse_palette("shapes")) == 8 and parse_palette("0,0,0 255,255,255") == [(0, 0, 0), (255, 255, 255)]
    with pytest.raises(MarsError, match="not R,G,B"):
        tiny_cfg(tmp_path, "palette=1,2", "palette_weight=1")
    with pytest.raises(MarsError, match="at least two"):
        tiny_cfg(tmp_path, "palette=1,2,3", "palette_weight=1")
    with pytest.raises(MarsError, match="keeps the codes fixed"):
        tiny_cfg(tmp_path, "trainable=decoder")  # tiny_cfg restarts dead codes
    with pytest.raises(MarsError, match="trainable must be"):
        tiny_cfg(tmp_path, "trainable=encoder")
