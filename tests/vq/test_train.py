import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mars.data.images import pil_to_tensor
from mars.data.shapes import render_scene, scene_for_index
from mars.errors import MarsError
from mars.vq.config import VQConfig
from mars.vq.model import VQModel
from mars.vq.train import CropBatches, Trainer, VQTrainConfig, load_train_config, tensor_epochs, train

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "vq").glob("*.yaml"))
TINY_MODEL = ["model.ch=16", "model.ch_mult=[1,2,2]", "model.num_res_blocks=1", "model.attn_resolutions=[]",
              "model.z_channels=16", "model.norm_groups=8", "model.codebook_size=32", "model.codebook_embed_dim=4"]


def shapes_images(n: int, size: int = 32) -> torch.Tensor:
    return torch.stack([pil_to_tensor(render_scene(scene_for_index(7, i), size)) for i in range(n)])


def tiny_cfg(tmp_path, *overrides) -> VQTrainConfig:
    return load_train_config(None, TINY_MODEL + [
        f"out_dir={tmp_path}", "resolution=32", "crop_size=16", "batch_size=4", "steps=6", "lr=2e-3",
        "warmup_steps=1", "log_every=1", "ckpt_every=3", "image_every=3", "threads=1", "device=cpu",
        "restart_dead_codes_every=2", "disc_ndf=8", "disc_layers=2", "perceptual_stages=[0,1]", *overrides])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_decreases_reconstruction_loss(tmp_path):
    cfg = tiny_cfg(tmp_path, "steps=30", "perceptual_weight=0", "disc_weight=0", "crop_size=32",
                   "image_every=0", "ckpt_every=100", "quantize_after=10")
    model = train(cfg, images=shapes_images(8), progress=False)
    rec = [m["rec_loss"] for m in metrics(tmp_path)]
    assert sum(rec[-5:]) / 5 < 0.7 * sum(rec[:5]) / 5
    assert isinstance(model, VQModel)
    assert VQModel.from_pretrained(tmp_path / "final").identity_hash() == model.identity_hash()
    assert any(p.name.startswith("events") for p in (tmp_path / "tb").iterdir())


def test_resume_reproduces_the_next_losses_exactly(tmp_path, monkeypatch):
    images = shapes_images(6)
    # disc from step 2 and a warm-up of 2 steps: every piece of state is in play before step 3
    extra = ["disc_start=2", "quantize_after=2", "entropy_weight=0.1", "entropy_until=5"]
    full = tmp_path / "full"
    train(tiny_cfg(full, *extra), images=images, progress=False)

    part = tmp_path / "part"
    calls = {"n": 0}
    original = Trainer.train_step

    def dies_after_three_steps(self, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # killed during step 5; the last checkpoint is at step 3
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", dies_after_three_steps)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(part, *extra), images=images, progress=False)
    monkeypatch.setattr(Trainer, "train_step", original)
    assert [m["step"] for m in metrics(part)] == [1, 2, 3, 4]

    train(tiny_cfg(part, *extra, "resume=auto"), images=images, progress=False)
    resumed, reference = metrics(part), metrics(full)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]  # step 4 logged again, once
    for a, b in zip(resumed, reference, strict=True):
        for key in ("loss", "rec_loss", "codebook_loss", "g_loss", "d_loss"):
            assert a.get(key) == b.get(key), (a["step"], key)
    assert torch.equal(VQModel.from_pretrained(part / "final").decode_codes(torch.zeros(1, 4, 4, dtype=torch.long)),
                       VQModel.from_pretrained(full / "final").decode_codes(torch.zeros(1, 4, 4, dtype=torch.long)))


def test_init_from_a_saved_tokenizer(tmp_path):
    first = Trainer(tiny_cfg(tmp_path / "a"), images=shapes_images(4), progress=False)
    first.model.save_pretrained(tmp_path / "vq")
    second = Trainer(tiny_cfg(tmp_path / "b", f"init_from={tmp_path / 'vq'}", "seed=5"), images=shapes_images(4),
                     progress=False)
    assert second.model.identity_hash() == first.model.identity_hash()
    with pytest.raises(MarsError, match="different architecture"):
        Trainer(tiny_cfg(tmp_path / "c", f"init_from={tmp_path / 'vq'}", "model.codebook_size=16"),
                images=shapes_images(4), progress=False)
    # Patch codes are a way to apply the same weights: a trained tokenizer fine-tunes into them.
    patch = Trainer(tiny_cfg(tmp_path / "d", f"init_from={tmp_path / 'vq'}", "model.patch_local=true"),
                    images=shapes_images(4), progress=False)
    assert patch.model.config.patch_local
    assert all(torch.equal(a, b) for a, b in zip(patch.model.state_dict().values(), first.model.state_dict().values(),
                                                 strict=True))
    assert patch.model.codes_hash() != first.model.codes_hash()  # other codes, so shards can tell them apart


def test_patch_codes_config_fine_tunes_the_small_tokenizer_into_patch_codes():
    """configs/shapes-demo/vq-patch.yaml (the recipe's last VQ stage) parses: the shapes-small
    geometry of the stages before it, with patch codes, every part trained."""
    config = Path(__file__).resolve().parents[2] / "configs" / "shapes-demo" / "vq-patch.yaml"
    cfg = load_train_config(config, [])
    assert cfg.model.patch_local and cfg.trainable == "all"
    assert dataclasses.replace(cfg.model, patch_local=False) == VQConfig.from_name("shapes-small")


def test_bf16_autocast_step_on_cpu(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, "bf16=true", "disc_start=0"), images=shapes_images(4), progress=False)
    logs, recon = trainer.train_step(trainer.data.next_batch())
    assert recon.dtype == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(logs[k])) for k in ("loss", "d_loss", "perceptual_loss"))


def test_crop_batches_restore_replays_the_same_batches():
    images = shapes_images(5)
    a = CropBatches(tensor_epochs(images, seed=1, shuffle=True), batch_size=3, crop_size=16, seed=1)
    first = [a.next_batch() for _ in range(3)]  # crosses an epoch boundary
    state = a.state()
    expected = a.next_batch()
    b = CropBatches(tensor_epochs(images, seed=1, shuffle=True), batch_size=3, crop_size=16, seed=1)
    b.restore(state)
    assert torch.equal(b.next_batch(), expected)
    assert first[0].shape == (3, 3, 16, 16)


def test_config_overrides_and_errors(tmp_path):
    cfg = load_train_config(None, ["model=f16-8192", "model.codebook_size=1024", "steps=7"])
    assert cfg.model.codebook_size == 1024 and cfg.model.ch == 128 and cfg.steps == 7
    with pytest.raises(MarsError, match="unknown key"):
        load_train_config(None, ["stepz=3"])
    with pytest.raises(MarsError, match="unknown key"):
        load_train_config(None, ["model.chanels=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: shapes-small\nlearning_rate: 1\n")
    with pytest.raises(MarsError, match="learning_rate"):
        load_train_config(bad)
    with pytest.raises(MarsError, match="multiples"):
        load_train_config(None, ["crop_size=100"])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_train_config(path)
    assert cfg.model.downsample == 16
