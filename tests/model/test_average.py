"""`mars average`: the weight average of MARS models of one architecture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mars.cli import main
from mars.errors import MarsError
from mars.model.average import average_models
from mars.model.semvie import SemVIE
from mars.model.weights import load_weights


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tiny_builders):
    root = tmp_path_factory.mktemp("average")
    a = tiny_builders.write_dir(root / "a", tiny_builders.model(1), tiny_builders.vq(0))
    b = tiny_builders.write_dir(root / "b", tiny_builders.model(2), tiny_builders.vq(5))
    (a / "generation_config.json").write_text(json.dumps({"cfg_scale": 2.0, "top_k": 3}))
    return a, b


def test_the_average_is_the_weighted_mean_of_every_tensor(tmp_path, two_models):
    a, b = two_models
    out = average_models([a, b], tmp_path / "soup", weights=[0.25, 0.75])
    first, second, soup = load_weights(a), load_weights(b), load_weights(out)
    assert soup.keys() == first.keys()
    for name, tensor in soup.items():
        assert tensor.dtype == first[name].dtype
        torch.testing.assert_close(tensor, 0.25 * first[name] + 0.75 * second[name], rtol=1e-6, atol=1e-7)
    # the first model's other files come along unchanged: its VQ (with its own weights), tokenizer, sampling
    assert load_weights(out / "vq").keys() == load_weights(a / "vq").keys()
    assert all(torch.equal(t, load_weights(a / "vq")[k]) for k, t in load_weights(out / "vq").items())
    assert (out / "tokenizer").is_dir() and json.loads((out / "generation_config.json").read_text())["top_k"] == 3
    assert json.loads((out / "averaged_from.json").read_text()) == {"models": [str(a), str(b)], "weights": [0.25, 0.75]}
    SemVIE.from_pretrained(out)  # a loadable model folder


def test_a_model_averaged_with_itself_is_unchanged(tmp_path, two_models):
    a, _ = two_models
    out = average_models([a, a, a], tmp_path / "same")
    original = load_weights(a)
    for name, tensor in load_weights(out).items():
        torch.testing.assert_close(tensor, original[name], rtol=1e-6, atol=1e-7)


def test_bad_averages_are_refused_with_a_reason(tmp_path, two_models, tiny_builders):
    a, b = two_models
    wider = tiny_builders.write_dir(tmp_path / "wider", tiny_builders.model(3, num_layers=3), tiny_builders.vq(0))
    with pytest.raises(MarsError, match="different configs"):
        average_models([a, wider], tmp_path / "x")
    with pytest.raises(MarsError, match="sum to 1"):
        average_models([a, b], tmp_path / "x", weights=[0.5, 0.6])
    with pytest.raises(MarsError, match="2 weights for 3 models"):
        average_models([a, b, a], tmp_path / "x", weights=[0.5, 0.5])
    with pytest.raises(MarsError, match="at least two"):
        average_models([a], tmp_path / "x")
    with pytest.raises(MarsError, match="is one of the models"):
        average_models([a, b], a, overwrite=True)
    (tmp_path / "taken").mkdir()
    with pytest.raises(MarsError, match="exists; pass --overwrite"):
        average_models([a, b], tmp_path / "taken")
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())  # nothing half-written


def test_cli_writes_the_average_and_reports_errors_in_one_line(tmp_path, two_models, capsys):
    a, b = two_models
    assert main(["average", str(a), str(b), "--out", str(tmp_path / "soup")]) == 0
    assert (tmp_path / "soup" / "model.safetensors").is_file()
    assert main(["average", str(a), str(b), "--out", str(tmp_path / "soup")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists; pass --overwrite" in err[0]


def test_models_named_differently_average_and_a_missing_tensor_is_named(tmp_path, two_models):
    import shutil

    from mars.model.weights import save_weights

    a, b = two_models
    renamed = Path(shutil.copytree(b, tmp_path / "renamed"))
    config = json.loads((renamed / "config.json").read_text())
    (renamed / "config.json").write_text(json.dumps({**config, "name": "another-label"}))
    assert average_models([a, renamed], tmp_path / "soup").is_dir()  # the name is only a label
    state = load_weights(renamed)
    missing = sorted(state)[0]
    save_weights({k: v for k, v in state.items() if k != missing}, renamed)
    with pytest.raises(MarsError, match=f"hold different tensors \\(e.g. {missing}\\)"):
        average_models([a, renamed], tmp_path / "broken")
