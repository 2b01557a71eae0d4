"""`mars eval loss`: held-out T2I / I2T loss with the training loss functions."""

from __future__ import annotations

import math

import pytest

from mars.cli import main
from mars.config import SemVIEConfig
from mars.data.shards import open_shards
from mars.eval.loss_eval import heldout_loss
from mars.model.semvie import SemVIE
from mars.text_tokenizer import ByteTokenizer
from mars.train.data import synthetic_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("shards"), 10, 5, SemVIEConfig.from_name("debug"), ByteTokenizer())


def test_freshly_initialised_model_scores_log_codebook_on_t2i(shards):
    """MARS initialisation gives every new vocabulary row (codes + specials) the same head row, so
    they all get the same logit and the T2I loss over those rows is exactly ln(their number),
    whatever the data; the targets are the codes and `</img>` of every image."""
    model = SemVIE(SemVIEConfig.from_name("debug")).eval()
    result = heldout_loss(model, ByteTokenizer(), open_shards(shards), n=10, batch_size=4)
    assert result["t2i"]["loss"] == pytest.approx(math.log(model.vocab.num_new_rows), abs=1e-5)
    assert result["t2i"]["tokens"] == 10 * (model.config.image_tokens + 1)
    assert result["t2i"]["images"] == result["i2t"]["images"] == 10
    assert result["i2t"]["tokens"] > 0 and math.isfinite(result["i2t"]["loss"])


def test_loss_does_not_depend_on_the_batch_size(tiny_model, shards):
    dataset = open_shards(shards)
    one = heldout_loss(tiny_model, ByteTokenizer(), dataset, n=10, batch_size=10)
    split = heldout_loss(tiny_model, ByteTokenizer(), dataset, n=10, batch_size=3)
    for task in ("t2i", "i2t"):
        assert split[task]["loss"] == pytest.approx(one[task]["loss"], rel=1e-5)
        assert split[task]["tokens"] == one[task]["tokens"]


def test_cli_prints_every_task_and_the_prompts_worth_and_rejects_bad_input(tiny_model_dir, shards, tmp_path, capsys):
    assert main(["eval", "loss", "--model", str(tiny_model_dir), "--shards", str(shards), "--n", "6",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "t2i" in out and "t2i-null" in out and "i2t" in out and "perplexity" in out
    assert "the prompt lowers the T2I loss by" in out
    assert main(["eval", "loss", "--model", str(tiny_model_dir), "--shards", str(tmp_path / "nope")]) != 0
    assert "no index.json in" in capsys.readouterr().err
    assert main(["eval", "loss", "--model", str(tiny_model_dir), "--shards", str(shards), "--tasks", "lm"]) != 0
    assert "unknown task 'lm'" in capsys.readouterr().err


def test_null_prompt_loss_ignores_the_captions(tiny_model, shards):
    """`t2i-null` scores the images after the null prompt, so other captions change `t2i` only."""
    dataset = open_shards(shards)
    recaptioned = [dict(dataset[i], text_ids=[7, 8, 9] * (i + 1), text_zh_ids=[5] * (i + 2)) for i in range(10)]
    before = heldout_loss(tiny_model, ByteTokenizer(), dataset, n=10, batch_size=4, tasks=("t2i", "t2i-null"))
    after = heldout_loss(tiny_model, ByteTokenizer(), recaptioned, n=10, batch_size=4, tasks=("t2i", "t2i-null"))
    assert after["t2i-null"]["loss"] == pytest.approx(before["t2i-null"]["loss"], rel=1e-6)
    assert after["t2i"]["loss"] != pytest.approx(before["t2i"]["loss"], rel=1e-4)
    assert before["t2i-null"]["tokens"] == before["t2i"]["tokens"]
