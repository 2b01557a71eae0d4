"""Every stage config loads; overrides and mistakes give clear results."""

from __future__ import annotations

from pathlib import Path

import pytest

from mars.errors import MarsError
from mars.train.config import load_train_config
from mars.train.stages import TRAINABLE_GROUPS

from .conftest import DEBUG, ROOT

CONFIGS = sorted((ROOT / "configs" / "debug").glob("*.yaml")) + sorted((ROOT / "configs" / "stages").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_loads_and_names_its_command(path: Path):
    cfg = load_train_config(path, ["out_dir=/tmp/x", "max_steps=7", "save_every=3", "resume=auto"])
    assert (cfg.out_dir, cfg.max_steps, cfg.save_every, cfg.resume) == ("/tmp/x", 7, 3, "auto")
    assert cfg.stage == path.stem and cfg.stage in TRAINABLE_GROUPS
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "mars" in first and "train" in first and f"{path.parent.name}/{path.name}" in first


def test_stage_templates_build_their_models():
    from mars.train.trainer import resolve_model_config

    stage0 = resolve_model_config(load_train_config(ROOT / "configs/stages/stage0.yaml"))
    assert (stage0.num_layers, stage0.hidden_size, stage0.text_vocab_size) == (24, 2048, 151936)


@pytest.mark.parametrize("override, message", [
    (["bogus=1"], "unknown key 'bogus'"),
    (["data.shardz=x"], "unknown key 'data.shardz'"),
    (["max_steps=ten"], "expected an integer"),
    (["stage=stage9"], "stage must be one of"),
    (["tasks={lm: 1.0}"], "stage1 tasks must be"),
    (["init_from=somewhere"], "exactly one of init_from"),
    (["model_overrides={num_layers: 3}"], "only change image_size"),
    (["batch_size=12", "micro_batch_size=8"], "not a multiple of micro_batch_size"),
    (["t2i_contrast_weight=-1"], "t2i_contrast_weight and t2i_contrast_margin must be >= 0"),
    (["t2i_contrast_steps=-1"], "t2i_contrast_steps must be >= 0"),
    (["t2i_contrast_swaps=[[left, right]]"], "set t2i_contrast_weight > 0"),
    (["t2i_contrast_weight=1", "t2i_contrast_swaps=[[left]]"], "swap group must be a list of at least 2"),
    (["distill_skip_counterfactual=true"], "needs distill_from and t2i_contrast_swaps"),
    (["distill_from=x", "distill_weight=1", "distill_skip_counterfactual=true"], "needs distill_from and t2i_contrast_swaps"),
    (["t2i_contrast_repeat=0"], "t2i_contrast_repeat must be >= 1"),
    (["t2i_contrast_repeat=4"], "oversamples the captions that t2i_contrast_swaps matches"),
    (["tasks={i2t: 1.0}", "t2i_contrast_weight=1", "t2i_contrast_swaps=[[left, right]]", "t2i_contrast_repeat=4"],
     "in a stage with a t2i task"),
])
def test_config_errors_are_one_line(override, message):
    with pytest.raises(MarsError, match=message) as err:
        load_train_config(DEBUG / "stage1.yaml", override)
    assert "\n" not in str(err.value)


def test_batch_must_split_over_ranks():
    cfg = load_train_config(DEBUG / "stage1.yaml", ["batch_size=8", "micro_batch_size=4"])
    assert cfg.accumulation(1) == 2 and cfg.accumulation(2) == 1
    with pytest.raises(MarsError, match="4 rank"):
        cfg.accumulation(4)
