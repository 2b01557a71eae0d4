"""`mars export`: a training checkpoint becomes the same model folder as the run's final/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mars.cli import main
from mars.errors import MarsError
from mars.model.semvie import SemVIE
from mars.model.weights import load_weights
from mars.train.checkpoint import load_checkpoint_model
from mars.train.export import export_checkpoint

from .conftest import run_stage

SAMPLING = {"cfg_scale": 2.5, "top_k": 3}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != "model.safetensors"}


@pytest.fixture
def run(model_copy, tmp_path) -> Path:
    """A 4-step stage II from a model with sampling defaults; checkpoints at steps 2 and 4."""
    (model_copy / "generation_config.json").write_text(json.dumps(SAMPLING))
    run_stage("stage2", tmp_path / "run", "max_steps=4", "save_every=2", "keep_last=2", f"init_from={model_copy}")
    return tmp_path / "run"


def test_the_last_checkpoint_exports_to_the_runs_final_folder(run, tmp_path):
    final = run / "final"
    assert json.loads((final / "generation_config.json").read_text()) == SAMPLING  # a fine-tune keeps them
    exported = export_checkpoint(run / "checkpoints" / "step_00000004", tmp_path / "m4")
    assert _files(exported) == _files(final)  # config, tokenizer/, vq/, generation_config.json
    ours, theirs = load_weights(exported), load_weights(final)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_mars_export_writes_a_loadable_model_of_an_earlier_step(run, tmp_path, capsys):
    from mars.pipeline import MarsPipeline

    step2 = run / "checkpoints" / "step_00000002"
    assert main(["export", str(step2), "--out", str(tmp_path / "m2")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m2")
    pipe = MarsPipeline.from_pretrained(tmp_path / "m2")
    expected = load_checkpoint_model(step2).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in pipe.model.state_dict().items())
    final = SemVIE.from_pretrained(run / "final").state_dict()
    assert not all(torch.equal(v, final[k]) for k, v in pipe.model.state_dict().items())  # step 2, not 4


def test_export_refuses_to_overwrite_and_names_what_is_not_a_checkpoint(run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(MarsError, match="exists and is not an empty folder.*--overwrite"):
        export_checkpoint(run / "checkpoints" / "step_00000002", out)
    assert (out / "notes.txt").read_text() == "keep me"
    with pytest.raises(MarsError, match="exists and is not an empty folder"):
        export_checkpoint(run / "checkpoints" / "step_00000002", out / "notes.txt")
    assert (out / "notes.txt").read_text() == "keep me"
    export_checkpoint(run / "checkpoints" / "step_00000002", out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    assert main(["export", str(run / "final"), "--out", str(tmp_path / "x")]) == 2
    assert "is not a complete training checkpoint (no meta.json)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_checkpoint_taken_during_a_positions_ramp_is_refused(model_copy, tmp_path):
    out = tmp_path / "ramp"
    run_stage("stage2", out, "max_steps=4", "save_every=1", "keep_last=4", f"init_from={model_copy}",
              "model_overrides={image_positions: 2d}", "image_positions_ramp_steps=2")
    with pytest.raises(MarsError, match="step 1 of a 2-step ramp into 2-D.*from step 2 on"):
        export_checkpoint(out / "checkpoints" / "step_00000001", tmp_path / "m1")
    assert not (tmp_path / "m1").exists()
    exported = export_checkpoint(out / "checkpoints" / "step_00000002", tmp_path / "m2")
    assert SemVIE.from_pretrained(exported).config.image_positions == "2d"


def _shapes_shards(model_dir: Path, spec: str, out: Path) -> Path:
    """`spec` (a shapes:N:SEED data spec) preprocessed into code shards by the model in `model_dir`."""
    from mars.data.preprocess import preprocess
    from mars.model_dir import load_model_text_tokenizer
    from mars.vq import load_tokenizer

    config = SemVIE.from_pretrained(model_dir).config
    preprocess(load_tokenizer(model_dir / "vq"), load_model_text_tokenizer(model_dir, config.text_tokenizer), spec, out,
               resolution=config.image_size, shard_size=8, batch_size=8, progress=False)
    return out


def _prompt_order(folder: Path) -> str:
    from mars.pipeline import load_prompt_order

    return load_prompt_order(folder)


def test_a_run_on_reading_order_captions_saves_a_model_that_restates_prompts(model_copy, tmp_path):
    (model_copy / "generation_config.json").write_text(json.dumps(SAMPLING))  # an as-written model
    shards = _shapes_shards(model_copy, "shapes:8:0:reading-order", tmp_path / "codes")
    data = [f"init_from={model_copy}", f"data.shards={shards}", "data.synthetic=0", "max_steps=2", "save_every=1"]
    final, _ = run_stage("stage2", tmp_path / "run", *data)
    settings = json.loads((final / "generation_config.json").read_text())
    assert settings["prompt_order"] == "reading"
    assert {key: settings[key] for key in SAMPLING} == SAMPLING  # the sampling defaults stay
    exported = export_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000001", tmp_path / "m1")
    assert _prompt_order(exported) == "reading"
    # stated in the config, it wins; as-written captions make an as-written model of a reading-order one
    final, _ = run_stage("stage2", tmp_path / "asked", *data, "prompt_order=as-written")
    assert json.loads((final / "generation_config.json").read_text()) == SAMPLING
    plain = _shapes_shards(model_copy, "shapes:8:0", tmp_path / "plain-codes")
    final, _ = run_stage("stage2", tmp_path / "plain", f"init_from={tmp_path / 'run' / 'final'}",
                         f"data.shards={plain}", "data.synthetic=0", "max_steps=1")
    assert _prompt_order(final) == "as-written"


def test_other_data_keep_the_start_models_prompt_order_and_a_bad_one_is_refused(model_copy, tmp_path):
    (model_copy / "generation_config.json").write_text(json.dumps({**SAMPLING, "prompt_order": "reading"}))
    final, _ = run_stage("stage2", tmp_path / "run", f"init_from={model_copy}", "max_steps=1")  # synthetic data
    assert _prompt_order(final) == "reading"
    with pytest.raises(MarsError, match="prompt_order must be one of as-written, reading, got 'sideways'"):
        run_stage("stage2", tmp_path / "bad", f"init_from={model_copy}", "prompt_order=sideways")
