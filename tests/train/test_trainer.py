"""Every stage trains on the debug preset; frozen weights stay bit-identical; a tiny batch overfits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mars.model.semvie import SemVIE, load_model_config
from mars.train.checkpoint import latest_checkpoint, load_checkpoint_model
from mars.train.stages import TRAINABLE_GROUPS

from .conftest import run_stage


def _groups(model: SemVIE) -> dict[str, dict[str, torch.Tensor]]:
    return {g: {k: p.detach().clone() for k, p in params.items()} for g, params in model.parameter_groups().items()}


def test_a_1d_model_continues_with_2d_image_positions(model_copy, tmp_path):
    final, metrics = run_stage("stage2", tmp_path / "run", "max_steps=2", "save_every=0", f"init_from={model_copy}",
                               "model_overrides={image_positions: 2d}")
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert load_model_config(final).image_positions == "2d"  # the saved model keeps its positions


def test_a_ramp_moves_a_1d_model_into_2d_positions_step_by_step(model_copy, tmp_path):
    args = ("max_steps=4", "save_every=0", f"init_from={model_copy}")
    _, line = run_stage("stage2", tmp_path / "1d", *args)
    final, ramp = run_stage("stage2", tmp_path / "ramp", *args, "model_overrides={image_positions: 2d}",
                            "image_positions_ramp_steps=2")
    assert [m.get("image_position_blend") for m in ramp] == [0.0, 0.5, None, None]  # then all the way
    assert ramp[0]["loss"] == pytest.approx(line[0]["loss"], rel=1e-5)  # step 0 rotates as in 1-D
    assert ramp[1]["loss"] != pytest.approx(line[1]["loss"], rel=1e-5)
    assert load_model_config(final).image_positions == "2d"


@pytest.mark.parametrize("overrides, message", [
    (["image_positions_ramp_steps=5", "model_overrides={image_positions: 2d}"], "must lie in \\[0, max_steps=4\\]"),
    (["image_positions_ramp_steps=2"], "needs a 1-D model and model_overrides.*has image_positions 1d, the run 1d"),
])
def test_a_ramp_is_refused_without_a_2d_switch_or_past_the_end(model_copy, tmp_path, overrides, message):
    from mars.errors import MarsError

    with pytest.raises(MarsError, match=message):
        run_stage("stage2", tmp_path / "run", "max_steps=4", f"init_from={model_copy}", *overrides)


def test_a_ramp_is_refused_on_a_model_already_2d(model_copy, tmp_path):
    from mars.errors import MarsError

    final, _ = run_stage("stage2", tmp_path / "2d", "max_steps=1", "save_every=0", f"init_from={model_copy}",
                         "model_overrides={image_positions: 2d}")
    with pytest.raises(MarsError, match="needs a 1-D model.*has image_positions 2d, the run 2d"):
        run_stage("stage2", tmp_path / "run", "max_steps=4", f"init_from={final}",
                  "model_overrides={image_positions: 2d}", "image_positions_ramp_steps=2")


def test_distilling_from_the_starting_model_leaves_step_0_alone_then_pulls_back(model_copy, tmp_path):
    args = ("max_steps=3", "save_every=0", "model=null", f"init_from={model_copy}", "data.cfg_dropout=0", "lr=3e-3")
    _, plain = run_stage("stage1", tmp_path / "plain", *args)
    _, distilled = run_stage("stage1", tmp_path / "distilled", *args, f"distill_from={model_copy}",
                             "distill_weight=1.0")
    # step 0: the student is its teacher, the KL and its gradient are zero: the same loss and update
    assert distilled[0]["distill_kl"] == pytest.approx(0.0, abs=1e-5)
    assert distilled[1]["loss"] == pytest.approx(plain[1]["loss"], rel=1e-5)
    assert distilled[1]["distill_kl"] > 1e-4 and distilled[2]["distill_kl"] > 1e-4
    assert not any("distill_kl" in m for m in plain)
    assert distilled[2]["loss"] != pytest.approx(plain[2]["loss"], rel=1e-5)  # the pull changed the second update


def test_distillation_keeps_a_2d_switched_model_closer_to_its_1d_teacher(model_copy, tmp_path):
    args = ("max_steps=6", "save_every=0", "model=null", f"init_from={model_copy}", "data.cfg_dropout=0", "lr=3e-3",
            "model_overrides={image_positions: 2d}", "tasks={t2i: 1.0}", f"distill_from={model_copy}")
    _, measured = run_stage("stage1", tmp_path / "free", *args, "distill_weight=1e-9")  # logs the KL, no pull
    _, pulled = run_stage("stage1", tmp_path / "pulled", *args, "distill_weight=5.0")
    # the switch itself moves the model away from its teacher; the same batches, with and without the pull
    assert measured[0]["distill_kl"] == pytest.approx(pulled[0]["distill_kl"], rel=1e-6) and measured[0]["distill_kl"] > 0
    assert pulled[-1]["distill_kl"] < 0.5 * measured[-1]["distill_kl"]


def test_distillation_can_leave_the_rows_with_a_counterfactual_to_the_contrast_term(model_copy, tmp_path):
    colours = "[red, blue, green, yellow, orange, purple, black]"
    args = ("max_steps=1", "save_every=0", "model=null", f"init_from={model_copy}", "data.synthetic=8",
            "data.cfg_dropout=0", "tasks={t2i: 1.0}", "model_overrides={image_positions: 2d}",
            f"distill_from={model_copy}", "distill_weight=1", "t2i_contrast_weight=2")
    english = f"t2i_contrast_swaps=[{colours}]"
    both = f"t2i_contrast_swaps=[{colours}, [红色, 蓝色, 绿色, 黄色, 橙色, 紫色, 黑色]]"
    # the 2-D switch moves the student from its 1-D teacher: every row has a KL to give
    _, pulled = run_stage("stage1", tmp_path / "pulled", *args, english)
    _, english_only = run_stage("stage1", tmp_path / "english", *args, english, "distill_skip_counterfactual=true")
    _, none_left = run_stage("stage1", tmp_path / "both", *args, both, "distill_skip_counterfactual=true")
    assert 0.0 < english_only[0]["counterfactual_share"] < 1.0 and none_left[0]["counterfactual_share"] == 1.0
    assert english_only[0]["loss"] == pytest.approx(pulled[0]["loss"], rel=1e-6)  # the same batch
    assert 0.0 < english_only[0]["distill_kl"] < pulled[0]["distill_kl"]  # the Chinese rows only
    assert none_left[0]["distill_kl"] == 0.0  # every caption names a colour: no row is pulled


@pytest.mark.parametrize("overrides, message", [
    (["distill_weight=1.0"], "needs both distill_from .* and distill_weight > 0"),
    (["distill_from=SELF"], "needs both distill_from .* and distill_weight > 0"),
    (["distill_from=SELF", "distill_weight=-1"], "needs both"),
    (["distill_from=NOWHERE", "distill_weight=1"], "no MARS model at .*nowhere"),
])
def test_distillation_settings_are_checked(model_copy, tmp_path, overrides, message):
    from mars.errors import MarsError

    overrides = [o.replace("SELF", str(model_copy)).replace("NOWHERE", str(tmp_path / "nowhere")) for o in overrides]
    with pytest.raises(MarsError, match=message):
        run_stage("stage1", tmp_path / "run", "max_steps=1", "model=null", f"init_from={model_copy}", *overrides)


def test_a_teacher_with_another_vocabulary_or_tokenizer_is_refused(model_copy, tmp_path):
    import json
    import shutil

    from mars.errors import MarsError

    other = Path(shutil.copytree(model_copy, tmp_path / "other"))
    config = json.loads((other / "config.json").read_text())
    config["image_vocab_size"] *= 2
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(MarsError, match="must share the vocabulary.*has image_vocab_size 512 \\(the model trained: 256\\)$"):
        run_stage("stage1", tmp_path / "run", "max_steps=1", "model=null", f"init_from={model_copy}",
                  f"distill_from={other}", "distill_weight=1")
    from mars.model_dir import TOKENIZER_DIR
    from mars.text_tokenizer import train_bpe_tokenizer

    shutil.rmtree(other)
    other = Path(shutil.copytree(model_copy, tmp_path / "other"))  # the same config, a BPE tokenizer
    shutil.rmtree(other / TOKENIZER_DIR)
    train_bpe_tokenizer(["a red circle to the left of a blue square"] * 20, vocab_size=300, directory=other / TOKENIZER_DIR)
    with pytest.raises(MarsError, match="tokenizes text differently.*must share the text tokenizer"):
        run_stage("stage1", tmp_path / "run", "max_steps=1", "model=null", f"init_from={model_copy}",
                  f"distill_from={other}", "distill_weight=1")


@pytest.mark.parametrize("stage", ["stage0", "stage1", "stage2", "stage3"])
def test_every_stage_trains_a_few_steps(stage, model_copy, tmp_path):
    init = [f"init_from={model_copy}"] if stage in ("stage2", "stage3") else []
    final, metrics = run_stage(stage, tmp_path / "run", "max_steps=3", "save_every=0", *init)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) and m[f"loss_{m['task']}"] == m["loss"] for m in metrics)
    assert all(m["tokens_per_s"] > 0 and math.isfinite(m["grad_norm"]) for m in metrics)
    assert {m["task"] for m in metrics} <= ({"lm"} if stage == "stage0" else {"t2i", "i2t"})
    model = SemVIE.from_pretrained(final)  # a loadable model folder with its tokenizer
    assert (final / "tokenizer").is_dir()
    assert (final / "vq").is_dir() == bool(init)  # copied from init_from when it has one
    if stage == "stage3":
        assert load_model_config(final).image_size == 128  # model_overrides reach the saved config
    if init:  # a complete model folder: the pipeline loads it and generates at the trained size
        from mars.pipeline import MarsPipeline

        image = MarsPipeline.from_pretrained(final).generate(["a red circle"], seed=0)[0]
        assert image.size == ((128, 128) if stage == "stage3" else (64, 64))
    assert sum(p.numel() for p in model.parameters()) > 0


def test_frozen_weights_bit_identical_and_trainable_ones_move(model_copy, tmp_path):
    before = _groups(SemVIE.from_pretrained(model_copy))
    final, _ = run_stage("stage1", tmp_path / "run", "max_steps=3", "save_every=0", "model=null",
                         f"init_from={model_copy}")
    after = _groups(SemVIE.from_pretrained(final))
    for group, params in before.items():
        trains = group in TRAINABLE_GROUPS["stage1"]
        for name, value in params.items():
            same = torch.equal(value, after[group][name])
            assert same != trains, f"{group} {name}: {'unchanged' if same else 'changed'}"


def test_stage0_trains_text_side_and_hands_over_a_copied_visual_side(tmp_path):
    final, _ = run_stage("stage0", tmp_path / "run", "max_steps=2", "save_every=2")
    torch.manual_seed(0)  # the run's seed: its starting weights
    start = _groups(SemVIE(load_model_config(final)))
    trained = _groups(load_checkpoint_model(latest_checkpoint(tmp_path / "run" / "checkpoints")))
    for group in ("visual_expert", "new_vocab"):  # frozen in stage 0
        assert all(torch.equal(v, trained[group][k]) for k, v in start[group].items())
    assert not all(torch.equal(v, trained["text_expert"][k]) for k, v in start["text_expert"].items())
    model = SemVIE.from_pretrained(final)
    for block in model.layers:  # final/: visual expert = the trained text expert, ready for stage 1
        for (_, t), (_, v) in zip(block.text.named_parameters(), block.visual.named_parameters()):
            assert torch.equal(t, v)


def test_tiny_fixed_batch_overfits(tmp_path):
    # 8 scenes, batch 8, no CFG dropout, English only: every step sees the same 8 sequences.
    _, metrics = run_stage("stage1", tmp_path / "run", "data.synthetic=8", "data.cfg_dropout=0", "data.zh_fraction=0",
                           "tasks={t2i: 1.0}", "max_steps=100", "lr=3e-3", "warmup_steps=5", "min_lr_ratio=1",
                           "save_every=0")
    first, last = metrics[0]["loss"], sum(m["loss"] for m in metrics[-5:]) / 5
    assert first / last >= 5, (first, last)


def test_samples_every_n_steps_with_the_runs_vq(model_copy, tmp_path):
    from PIL import Image

    out = tmp_path / "run"
    run_stage("stage2", out, "max_steps=2", "save_every=0", "sample_every=2", f"init_from={model_copy}",
              "sample_prompts=[a red circle, 一个蓝色的正方形, two stars]")
    files = sorted((out / "samples" / "step_00000002").glob("*.png"))
    assert [f.name for f in files] == ["00.png", "01.png", "02.png"]
    assert Image.open(files[0]).size == (64, 64)


def test_bf16_autocast_and_accumulation_track_fp32(tmp_path):
    """bf16 autocast (CPU) with 4 micro-batches of 2 gives the fp32 single-micro-batch losses to ~1%."""
    _, fp32 = run_stage("stage1", tmp_path / "fp32", "max_steps=3", "save_every=0")
    _, bf16 = run_stage("stage1", tmp_path / "bf16", "max_steps=3", "save_every=0", "precision=bf16",
                        "micro_batch_size=2", "activation_checkpointing=true")
    for a, b in zip(fp32, bf16):
        assert a["task"] == b["task"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2)


def test_prompt_contrast_logs_the_prompt_gap_and_keeps_the_plain_loss(tmp_path):
    common = ("data.synthetic=8", "tasks={t2i: 1.0}", "max_steps=2", "save_every=0", "data.cfg_dropout=0")
    _, plain = run_stage("stage1", tmp_path / "plain", *common)
    _, contrast = run_stage("stage1", tmp_path / "contrast", *common, "t2i_contrast_weight=2")
    # the first step's logged loss is the plain T2I loss of the same weights and batch
    assert contrast[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-5)
    assert all("prompt_gap" in m and math.isfinite(m["prompt_gap"]) for m in contrast)
    assert not any("prompt_gap" in m for m in plain)


def test_oversampling_the_swappable_captions_puts_more_counterfactuals_in_each_step(tmp_path):
    relations = "t2i_contrast_swaps=[[left, right], [above, below], [左边, 右边], [左侧, 右侧], [上方, 下方], [上面, 下面]]"
    common = ("data.synthetic=32", "tasks={t2i: 1.0}", "max_steps=4", "save_every=0", "data.cfg_dropout=0",
              "t2i_contrast_weight=2", "micro_batch_size=16", "batch_size=16", relations)
    _, plain = run_stage("stage1", tmp_path / "plain", *common)
    _, oversampled = run_stage("stage1", tmp_path / "oversampled", *common, "t2i_contrast_repeat=8")

    def share(metrics):
        return sum(m["counterfactual_share"] for m in metrics) / len(metrics)

    assert 0.0 < 2 * share(plain) < share(oversampled)


def test_prompt_contrast_can_stop_after_its_first_steps(tmp_path):
    common = ("data.synthetic=8", "tasks={t2i: 1.0}", "max_steps=3", "save_every=0", "data.cfg_dropout=0")
    _, plain = run_stage("stage1", tmp_path / "plain", *common)
    _, early = run_stage("stage1", tmp_path / "early", *common, "t2i_contrast_weight=2", "t2i_contrast_steps=1")
    assert ["prompt_gap" in m for m in early] == [True, False, False]
    # the contrast step moved the weights, so the plain steps after it see another model
    assert early[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-5)
    assert early[1]["loss"] != pytest.approx(plain[1]["loss"], rel=1e-6)


def test_prompt_contrast_with_word_swaps_trains_on_counterfactual_prompts(tmp_path):
    common = ("data.synthetic=8", "tasks={t2i: 1.0}", "max_steps=2", "save_every=0", "data.cfg_dropout=0",
              "t2i_contrast_weight=2")
    _, borrowed = run_stage("stage1", tmp_path / "borrowed", *common)
    _, swapped = run_stage("stage1", tmp_path / "swapped", *common,
                           "t2i_contrast_swaps=[[red, blue, green, yellow, orange, purple, black], "
                           "[红色, 蓝色, 绿色, 黄色, 橙色, 紫色, 黑色]]")
    assert swapped[0]["loss"] == pytest.approx(borrowed[0]["loss"], rel=1e-5)  # same plain loss
    assert all(math.isfinite(m["prompt_gap"]) for m in swapped)
    assert swapped[0]["prompt_gap"] != pytest.approx(borrowed[0]["prompt_gap"], rel=1e-3)  # other prompts
    assert all(math.isfinite(m["counterfactual_gap"]) for m in swapped)
    assert all(m["counterfactual_share"] == 1.0 for m in swapped)  # every caption names a colour
    for m in swapped:  # both languages' rows, and the overall gap is their weighted mean
        low, high = sorted([m["counterfactual_gap_en"], m["counterfactual_gap_zh"]])
        assert low - 1e-6 <= m["counterfactual_gap"] <= high + 1e-6
    _, english = run_stage("stage1", tmp_path / "english", *common,
                           "t2i_contrast_swaps=[[red, blue, green, yellow, orange, purple, black]]")
    assert all(0.0 < m["counterfactual_share"] < 1.0 for m in english)  # Chinese rows borrow a prompt
    assert all(m["counterfactual_gap_en"] == m["counterfactual_gap"] and "counterfactual_gap_zh" not in m
               for m in english)
    assert not any("counterfactual_gap" in m or "counterfactual_share" in m for m in borrowed)
    _, unmatched = run_stage("stage1", tmp_path / "unmatched", *common, "t2i_contrast_swaps=[[zebra, giraffe]]")
    assert all(m["counterfactual_share"] == 0.0 and "counterfactual_gap" not in m for m in unmatched)
    _, first = run_stage("stage1", tmp_path / "first", *common, "t2i_contrast_steps=1",
                         "t2i_contrast_swaps=[[red, blue, green, yellow, orange, purple, black]]")
    assert ["counterfactual_share" in m for m in first] == [True, False]



def test_training_from_fp16_weights_keeps_fp32_master_weights(model_copy, tmp_path):
    # the built-in model ships fp16 files; training from it must not train in fp16
    from mars.model.weights import load_weights, save_weights

    state = load_weights(model_copy)
    save_weights({k: v.half() for k, v in state.items()}, model_copy)
    before = _groups(SemVIE.from_pretrained(model_copy, dtype=torch.float32))
    final, metrics = run_stage("stage1", tmp_path / "run", "max_steps=2", "save_every=0", "model=null",
                               f"init_from={model_copy}")
    after = SemVIE.from_pretrained(final)
    assert all(p.dtype == torch.float32 for p in after.parameters())
    frozen = _groups(after)["text_expert"]
    assert all(torch.equal(v, frozen[k]) for k, v in before["text_expert"].items())  # exactly the fp16 values
    assert all(math.isfinite(m["loss"]) for m in metrics)
