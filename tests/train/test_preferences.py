"""Preference pairs (`mars preferences`, judged by the model itself or by SHAPES_SPEC's checker) and the
DPO stage that trains on them."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mars import MarsPipeline
from mars.cli import main
from mars.data.captions import canonical_caption, parse_canonical
from mars.data.counterfactual_scenes import falsify
from mars.data.shapes import Scene, render_scene, sample_scene
from mars.data.sequences import build_t2i, collate_t2i
from mars.errors import MarsError
from mars.model.semvie import SemVIE
from mars.rerank import best_candidates, candidate_scores
from mars.train.data import PreferenceMixData, PreferenceStepData
from mars.train.losses import PreferenceBatch, dpo_loss
from mars.eval.shapes_eval import shapes_items
from mars.train.preferences import (PART_PATTERN, PreferencePairs, canonical_prompts_outside_benchmark,
                                    canonical_scenes_outside_benchmark, make_counterfactual_preferences,
                                    make_preferences, shapes_prompts)
from mars.vocab import MultimodalVocab

from .conftest import run_stage

PROMPTS = ["a red circle", "two blue squares", "一个绿色的三角形", "a star", "a black square"]


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return MarsPipeline.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def prefs(pipe, tmp_path_factory) -> Path:
    """Pairs of PROMPTS, 4 candidates each, in parts of 2 prompts (3 parts)."""
    return make_preferences(pipe, PROMPTS, tmp_path_factory.mktemp("prefs"), candidates=4, seed=5, part_size=2,
                            batch_size=8, drawing_weight=0.1, progress=False)


def test_each_pair_is_the_best_and_the_worst_candidate_by_the_models_own_judgement(pipe, prefs):
    pairs = PreferencePairs(prefs)
    codes = pipe.draw_candidates(PROMPTS, 4, seed=5, batch_size=8)  # (5 * 4, h, w)
    scores = candidate_scores(pipe.model, pipe.tokenizer, PROMPTS, codes, 4, drawing_weight=0.1)  # (5, 4)
    assert [p.prompt for p in pairs] == PROMPTS and pairs.dropped == 0
    by_prompt = codes.view(5, 4, *codes.shape[1:])
    for i, pair in enumerate(pairs):
        assert torch.equal(pair.chosen, by_prompt[i, scores[i].argmax()])
        assert torch.equal(pair.rejected, by_prompt[i, scores[i].argmin()])
        assert pair.score_gap == pytest.approx(float(scores[i].max() - scores[i].min()), abs=1e-5)
    # the chosen image is the one `generate(rerank=4)` keeps
    kept = best_candidates(pipe.model, pipe.tokenizer, PROMPTS, codes, 4, drawing_weight=0.1)
    assert all(torch.equal(pair.chosen, k) for pair, k in zip(pairs, kept))


def test_the_candidates_are_what_generate_with_rerank_chooses_among(pipe):
    codes = pipe.draw_candidates(["a red circle"], 3, seed=11)  # candidate 0 is the image rerank=1 makes
    image = pipe.generate("a red circle", seed=11)[0]
    assert pipe.decode_codes(codes[:1])[0].tobytes() == image.tobytes()


def test_an_interrupted_run_resumes_and_other_settings_are_refused(pipe, prefs, tmp_path):
    folder = Path(shutil.copytree(prefs, tmp_path / "prefs"))
    before = (folder / PART_PATTERN.format(1)).read_bytes()
    (folder / PART_PATTERN.format(1)).unlink()
    with pytest.raises(MarsError, match="incomplete: 1 of 3 parts missing.*rerun the same"):
        PreferencePairs(folder)
    make_preferences(pipe, PROMPTS, folder, candidates=4, seed=5, part_size=2, batch_size=8, drawing_weight=0.1,
                     progress=False)
    assert (folder / PART_PATTERN.format(1)).read_bytes() == before  # made again, the same pairs
    with pytest.raises(MarsError, match="made with other settings \\(candidates, seed differ\\)"):
        make_preferences(pipe, PROMPTS, folder, candidates=3, seed=6, part_size=2, drawing_weight=0.1, progress=False)
    with pytest.raises(MarsError, match="not a preference folder"):
        PreferencePairs(tmp_path)


def test_pairs_with_a_small_score_gap_are_left_out_and_counted(prefs):
    gaps = sorted(p.score_gap for p in PreferencePairs(prefs))
    kept = PreferencePairs(prefs, min_score_gap=gaps[2])
    assert len(kept) == 3 and kept.dropped == 2
    with pytest.raises(MarsError, match="no preference pair .* score gap of at least .* \\(5 dropped\\)"):
        PreferencePairs(prefs, min_score_gap=gaps[-1] + 1)


def test_shapes_prompts_alternate_english_and_chinese_captions():
    prompts = shapes_prompts("shapes:4:7")
    assert len(prompts) == 4 and prompts != shapes_prompts("shapes:4:8")
    assert [any("\u4e00" <= ch <= "\u9fff" for ch in p) for p in prompts] == [False, True, False, True]


def test_the_cli_makes_pairs_from_a_prompts_file(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue star\n")
    out = tmp_path / "cli"
    assert main(["preferences", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--candidates", "2",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert [p.prompt for p in PreferencePairs(out)] == ["a red circle", "a blue star"]
    assert main(["preferences", "--model", str(tiny_model_dir), "--data", "cc3m.tar", "--out", str(out)]) == 2
    assert "--data takes shapes:N:SEED" in capsys.readouterr().err


def test_the_checker_judge_pairs_the_first_right_with_the_first_wrong_candidate(pipe, tmp_path, monkeypatch):
    """Candidates stand for real renders: code value 2i + 1 decodes to a picture of prompt i's scene
    (right), 2i to a blank canvas (wrong), so which candidate the checker accepts is known."""
    scenes = [sample_scene(random.Random(i), category) for i, category in enumerate(["position", "size", "counting"])]
    prompts = [canonical_caption(scenes[0], "en"), canonical_caption(scenes[1], "zh"), canonical_caption(scenes[2], "en")]
    right = [[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1]]
    grid = pipe.model.config.image_grid

    def draw_candidates(chunk, n, seed, batch_size):  # (len(chunk) * n, h, w), each prompt's candidates in turn
        values = [2 * prompts.index(p) + right[prompts.index(p)][k] for p in chunk for k in range(n)]
        return torch.tensor(values).view(-1, 1, 1).expand(-1, grid, grid).clone()

    blank = render_scene(Scene((), "single"))
    monkeypatch.setattr(pipe, "draw_candidates", draw_candidates)
    monkeypatch.setattr(pipe, "decode_codes", lambda codes: [render_scene(scenes[int(v) // 2]) if v % 2 else blank
                                                             for v in codes[:, 0, 0]])
    folder = make_preferences(pipe, prompts, tmp_path / "checked", candidates=4, part_size=2, batch_size=3,
                              judge="checker", progress=False)
    pairs = PreferencePairs(folder)
    assert [p.score_gap for p in pairs] == [1.0, 0.0, 1.0]
    assert [(int(p.chosen[0, 0]), int(p.rejected[0, 0])) for p in pairs] == [(1, 0), (3, 3), (5, 4)]
    kept = PreferencePairs(folder, min_score_gap=1.0)
    assert [p.prompt for p in kept] == [prompts[0], prompts[2]] and kept.dropped == 1
    with pytest.raises(MarsError, match="checker judges canonical prompts only.*prompt 1 is not one"):
        make_preferences(pipe, [prompts[0], "a red circle on a blue sky"], tmp_path / "x", judge="checker")
    with pytest.raises(MarsError, match="unknown judge 'clip'"):
        make_preferences(pipe, prompts, tmp_path / "x", judge="clip")


def test_with_a_mirror_fact_the_checker_scores_the_image_wrong_in_that_fact_alone_minus_one(pipe, tmp_path,
                                                                                            monkeypatch):
    """Code value 3i decodes to a blank canvas (wrong), 3i + 1 to prompt i's scene (right), 3i + 2 to that
    scene with its relation mirrored (the prompt's mirror image): only the last scores -1."""
    scenes = [sample_scene(random.Random(f"mirror/{i}"), "position") for i in range(3)]
    prompts = [canonical_caption(scene, lang) for scene, lang in zip(scenes, ["en", "zh", "en"])]
    kinds = [[0, 2, 1, 2], [1, 0, 1, 0], [2, 2, 0, 0]]  # 0 blank, 1 right, 2 mirrored
    grid = pipe.model.config.image_grid

    def draw_candidates(chunk, n, seed, batch_size):
        values = [3 * prompts.index(p) + kinds[prompts.index(p)][k] for p in chunk for k in range(n)]
        return torch.tensor(values).view(-1, 1, 1).expand(-1, grid, grid).clone()

    renders = {0: lambda scene: render_scene(Scene((), "single")), 1: render_scene,
               2: lambda scene: render_scene(falsify(scene, "relation"))}
    monkeypatch.setattr(pipe, "draw_candidates", draw_candidates)
    monkeypatch.setattr(pipe, "decode_codes", lambda codes: [renders[int(v) % 3](scenes[int(v) // 3])
                                                             for v in codes[:, 0, 0]])
    folder = make_preferences(pipe, prompts, tmp_path / "order", candidates=4, part_size=2, batch_size=5,
                              judge="checker", mirror_fact="relation", progress=False)
    pairs = PreferencePairs(folder)
    assert pairs.settings["mirror_fact"] == "relation"
    assert [p.score_gap for p in pairs] == [2.0, 1.0, 1.0]
    assert [(int(p.chosen[0, 0]), int(p.rejected[0, 0])) for p in pairs] == [(1, 2), (4, 3), (6, 8)]
    mirror_pairs = PreferencePairs(folder, min_score_gap=2.0)
    assert [p.prompt for p in mirror_pairs] == [prompts[0]] and mirror_pairs.dropped == 2
    with pytest.raises(MarsError, match="--mirror needs --judge checker"):
        make_preferences(pipe, prompts, tmp_path / "x", mirror_fact="relation")
    size_prompt = canonical_caption(sample_scene(random.Random(0), "size"), "en")
    with pytest.raises(MarsError, match="the relation counterfactual needs .*; not size"):
        make_preferences(pipe, [prompts[0], size_prompt], tmp_path / "x", judge="checker", mirror_fact="relation")
    assert not (tmp_path / "x").exists()


def test_canonical_prompts_take_the_categories_in_turn_and_leave_out_every_benchmark_prompt():
    prompts = canonical_prompts_outside_benchmark("canonical:400:3", ("position", "position", "size"))
    asked = {item.prompt for seed in (0, 1) for item in shapes_items(50, seed)}
    assert len(prompts) == 400 and not asked.intersection(prompts)
    assert [parse_canonical(p).category for p in prompts[:6]] == ["position", "position", "size"] * 2
    chinese = [any("\u4e00" <= ch <= "\u9fff" for ch in p) for p in prompts[:12]]
    assert chinese == [False] * 3 + [True] * 3 + [False] * 3 + [True] * 3  # each round in one language
    assert prompts == canonical_prompts_outside_benchmark("canonical:400:3", ("position", "position", "size"))
    assert prompts != canonical_prompts_outside_benchmark("canonical:400:4", ("position", "position", "size"))
    with pytest.raises(MarsError, match="--categories takes training categories"):
        canonical_prompts_outside_benchmark("canonical:4:3", ("novel",))
    with pytest.raises(MarsError, match="bad canonical spec 'shapes:4:3'; expected canonical:N or canonical:N:SEED"):
        canonical_prompts_outside_benchmark("shapes:4:3")


def test_the_cli_judges_canonical_prompts_with_the_checker(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "checker"
    assert main(["preferences", "--model", str(tiny_model_dir), "--data", "canonical:3:1", "--categories", "size",
                 "--judge", "checker", "--candidates", "2", "--out", str(out), "--device", "cpu"]) == 0
    pairs = PreferencePairs(out)
    assert pairs.settings["judge"] == "checker" and pairs.settings["drawing_weight"] is None
    assert [parse_canonical(p.prompt).category for p in pairs] == ["size"] * 3
    mirrored = tmp_path / "mirrored"
    assert main(["preferences", "--model", str(tiny_model_dir), "--data", "canonical:3:1", "--categories", "size",
                 "--judge", "checker", "--mirror", "size", "--candidates", "2", "--out", str(mirrored),
                 "--device", "cpu"]) == 0
    assert PreferencePairs(mirrored).settings["mirror_fact"] == "size"
    assert main(["preferences", "--model", str(tiny_model_dir), "--data", "canonical:3:1", "--categories", "size",
                 "--mirror", "size", "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert "--mirror needs --judge checker" in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\nsomething red\n")
    assert main(["preferences", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--judge", "checker",
                 "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert "prompt 1 is not one" in capsys.readouterr().err


def test_counterfactual_pairs_are_the_scenes_render_against_its_counterfactuals(pipe, tmp_path):
    out, passed_over = make_counterfactual_preferences(pipe, "canonical:6:2", ("two", "size"), "binding", tmp_path,
                                                       part_size=4, progress=False)
    scenes, turned_down = canonical_scenes_outside_benchmark("canonical:6:2", ("two", "size"),
                                                             keep=lambda scene: falsify(scene, "binding") is not None)
    assert passed_over == turned_down and len(scenes) == 6
    pairs = PreferencePairs(out, min_score_gap=1.0)
    assert [p.prompt for p in pairs] == [prompt for _, prompt in scenes]
    assert [parse_canonical(p.prompt).category for p in pairs] == ["two", "size"] * 3
    chosen = pipe.encode_images([render_scene(scene) for scene, _ in scenes])
    rejected = pipe.encode_images([render_scene(falsify(scene, "binding")) for scene, _ in scenes])
    assert torch.equal(torch.stack([p.chosen for p in pairs]), chosen)
    assert torch.equal(torch.stack([p.rejected for p in pairs]), rejected)
    assert pairs.settings["judge"] == "counterfactual:binding" and pairs.dropped == 0
    written = {path.name: path.stat().st_mtime_ns for path in out.glob("pairs-*")}
    make_counterfactual_preferences(pipe, "canonical:6:2", ("two", "size"), "binding", tmp_path, part_size=4,
                                    progress=False)
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("pairs-*")} == written  # resumed: nothing redone
    with pytest.raises(MarsError, match="other settings \\(categories differ\\)"):
        make_counterfactual_preferences(pipe, "canonical:6:2", ("two",), "binding", tmp_path, part_size=4,
                                        progress=False)


def test_the_cli_renders_counterfactual_pairs_and_refuses_what_they_do_not_take(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "relation"
    assert main(["preferences", "--model", str(tiny_model_dir), "--counterfactual", "relation", "--data",
                 "canonical:3:1", "--out", str(out), "--device", "cpu"]) == 0
    assert "0 scenes passed over" in capsys.readouterr().err  # every position scene can be mirrored
    pairs = PreferencePairs(out)
    assert [parse_canonical(p.prompt).category for p in pairs] == ["position"] * 3
    base = ["preferences", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--device", "cpu"]
    for extra, message in [(["--data", "shapes:3:1"], "give them as --data canonical:N:SEED"),
                           (["--data", "canonical:3:1", "--judge", "checker"], "drop --judge, --mirror"),
                           (["--data", "canonical:3:1", "--mirror", "relation"], "drop --judge, --mirror"),
                           (["--data", "canonical:3:1", "--categories", "two"], "state a relation (position); not two")]:
        assert main(base + ["--counterfactual", "relation"] + extra) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def image_log_likelihood_by_hand(model: SemVIE, prompt: list[int], codes: torch.Tensor) -> float:
    """log p(codes, </img> | prompt <img>) by one unpadded forward, over the image ids and specials."""
    vocab = model.vocab
    ids = torch.tensor([[*prompt, vocab.boi_id, *vocab.codes_to_ids(codes.flatten()).tolist(), vocab.eoi_id]])
    with torch.no_grad():
        logits = model(ids[:, :-1], model.image_mask(ids[:, :-1]))[0, len(prompt):]  # predicts codes, </img>
    rows = slice(vocab.text_size, vocab.size)
    log_probs = F.log_softmax(logits[:, rows].double(), dim=-1)
    targets = ids[0, len(prompt) + 1:] - vocab.text_size
    return float(log_probs.gather(-1, targets[:, None]).sum())


def test_dpo_loss_is_the_log_sigmoid_of_the_log_ratio_margin(pipe, prefs, tiny_builders):
    reference = pipe.model
    policy = tiny_builders.model(seed=3)  # another random model over the same vocabulary
    pairs = PreferencePairs(prefs).pairs[:3]
    vocab = MultimodalVocab.from_config(reference.config)
    rows = [build_t2i(vocab, pipe.tokenizer.encode(p.prompt), p.chosen) for p in pairs] + \
           [build_t2i(vocab, pipe.tokenizer.encode(p.prompt), p.rejected) for p in pairs]
    batch = PreferenceBatch(collate_t2i(rows, pipe.tokenizer.eos_id))
    parts = dpo_loss(policy, reference, batch, beta=0.3, vocab="visual")
    expected_loss, margins = 0.0, []
    for p in pairs:
        prompt = pipe.tokenizer.encode(p.prompt)
        ratio = {k: image_log_likelihood_by_hand(policy, prompt, getattr(p, k))
                 - image_log_likelihood_by_hand(reference, prompt, getattr(p, k)) for k in ("chosen", "rejected")}
        margins.append(0.3 * (ratio["chosen"] - ratio["rejected"]))
        expected_loss -= math.log(1 / (1 + math.exp(-margins[-1])))
    assert parts.num_pairs == 3
    assert float(parts.loss_sum.detach()) == pytest.approx(expected_loss, rel=1e-4)
    assert parts.margin_sum == pytest.approx(sum(margins), rel=1e-4, abs=1e-4)
    assert parts.accuracy_sum == sum(m > 0 for m in margins)
    # the RPO term: the weight x each chosen image's NLL per token (its codes and </img>)
    held = dpo_loss(policy, reference, batch, beta=0.3, vocab="visual", chosen_nll_weight=0.5)
    per_token = [-image_log_likelihood_by_hand(policy, pipe.tokenizer.encode(p.prompt), p.chosen) / (p.chosen.numel() + 1)
                 for p in pairs]
    assert held.chosen_nll_sum == pytest.approx(sum(per_token), rel=1e-4)
    assert float(held.loss_sum.detach()) == pytest.approx(expected_loss + 0.5 * sum(per_token), rel=1e-4)
    same = dpo_loss(reference, reference, batch, beta=0.3, vocab="visual")  # the policy is its reference
    assert float(same.loss_sum.detach()) == pytest.approx(3 * math.log(2), rel=1e-6) and same.margin_sum == 0.0


def test_step_data_gives_the_same_pairs_however_the_batch_is_split(pipe, prefs):
    pairs = PreferencePairs(prefs).pairs
    vocab = MultimodalVocab.from_config(pipe.model.config)

    def rows(micro_batch_size, rank=0, world_size=1):
        data = PreferenceStepData(pairs, vocab, pipe.tokenizer, 4, micro_batch_size, seed=1, max_text_len=40,
                                  rank=rank, world_size=world_size)
        task, micro = data.micro_batches(3)
        assert task == "dpo" and all(m.num_tokens == micro_batch_size for m in micro)
        out = []
        for m in micro:
            ids, pad, B = m.batch.input_ids, m.batch.pairs.pad_lengths, m.batch.num_pairs
            assert torch.equal(ids[:B, :m.batch.pairs.prefix_len], ids[B:, :m.batch.pairs.prefix_len])  # shared prompts
            out += [(tuple(ids[b, pad[b]:].tolist()), tuple(ids[B + b, pad[B + b]:].tolist())) for b in range(B)]
        return out

    whole = rows(4)
    assert rows(2) == whole and rows(1) == whole
    assert rows(2, 0, 2) + rows(2, 1, 2) == whole  # two ranks hold the one-process batch
    with pytest.raises(MarsError, match="more than data.max_text_len 3"):
        PreferenceStepData(pairs, vocab, pipe.tokenizer, 4, 4, seed=1, max_text_len=3)


DPO = ("data.synthetic=0", "tasks={dpo: 1.0}", "t2i_loss_vocab=visual", "batch_size=4", "micro_batch_size=2",
       "save_every=0", "data.cfg_dropout=0")


def test_a_dpo_stage_starts_at_log_2_and_learns_the_preferences_with_frozen_text_weights(model_copy, prefs, tmp_path):
    before = SemVIE.from_pretrained(model_copy)
    final, metrics = run_stage("stage2", tmp_path / "run", *DPO, f"init_from={model_copy}",
                               f"data.preferences={prefs}", "max_steps=8", "lr=3e-3", "dpo_beta=0.5")
    assert [m["task"] for m in metrics] == ["dpo"] * 8
    assert metrics[0]["loss"] == pytest.approx(math.log(2), rel=1e-6) and metrics[0]["dpo_margin"] == 0.0
    assert metrics[-1]["loss"] < 0.5 * math.log(2) and metrics[-1]["dpo_accuracy"] == 1.0
    assert metrics[-1]["dpo_chosen_logratio"] > metrics[-1]["dpo_rejected_logratio"]
    after = SemVIE.from_pretrained(final)
    groups_before, groups_after = before.parameter_groups(), after.parameter_groups()
    assert all(torch.equal(p, groups_after["text_expert"][k]) for k, p in groups_before["text_expert"].items())
    assert not all(torch.equal(p, groups_after["visual_expert"][k]) for k, p in groups_before["visual_expert"].items())


def test_a_stage_mixes_dpo_steps_with_captioning_steps_by_their_weights(model_copy, prefs, tmp_path):
    before = SemVIE.from_pretrained(model_copy)
    mixed = [o for o in DPO if o != "data.synthetic=0"] + ["data.synthetic=16", "tasks={dpo: 1.0, i2t: 1.0}"]
    final, metrics = run_stage("stage2", tmp_path / "run", *mixed, f"init_from={model_copy}",
                               f"data.preferences={prefs}", "max_steps=12", "lr=3e-3")
    tasks = [m["task"] for m in metrics]
    assert set(tasks) == {"dpo", "i2t"} and 3 <= tasks.count("dpo") <= 9
    assert all(("dpo_accuracy" in m) == (m["task"] == "dpo") for m in metrics)
    assert all(m["loss_i2t"] > 0 for m in metrics if m["task"] == "i2t")
    after = SemVIE.from_pretrained(final)
    assert all(torch.equal(p, after.parameter_groups()["text_expert"][k])
               for k, p in before.parameter_groups()["text_expert"].items())


def test_a_stage_pools_the_pairs_of_every_preference_folder(model_copy, prefs, pipe, tmp_path):
    rendered, _ = make_counterfactual_preferences(pipe, "canonical:4:2", ("position",), "relation",
                                                  tmp_path / "rendered", progress=False)
    _, metrics = run_stage("stage2", tmp_path / "run", *DPO, f"init_from={model_copy}",
                           f"data.preferences=[{prefs}, {rendered}]", "max_steps=2", "data.max_text_len=64")
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"{len(PreferencePairs(prefs))} preference pairs from {prefs}" in log
    assert f"4 preference pairs from {rendered}" in log and [m["task"] for m in metrics] == ["dpo"] * 2


def test_the_mixture_takes_each_steps_batch_from_the_source_it_picks(pipe, prefs):
    """A dpo step's pairs are what the preference data alone gives that step; any other step's rows
    what the likelihood data alone gives it (and with its task); about the asked share are dpo steps."""
    pairs = PreferencePairs(prefs).pairs
    vocab = MultimodalVocab.from_config(pipe.model.config)
    preferences = PreferenceStepData(pairs, vocab, pipe.tokenizer, 2, 2, seed=1, max_text_len=40)

    class Likelihood:  # stands for StepData: its own task and batch per step
        @staticmethod
        def task(step):
            return "i2t"

        @staticmethod
        def micro_batches(step):
            return "i2t", [step]

    mix = PreferenceMixData(preferences, Likelihood(), dpo_share=0.25, seed=3)
    tasks = [mix.task(s) for s in range(400)]
    assert 0.18 < tasks.count("dpo") / 400 < 0.32 and set(tasks) == {"dpo", "i2t"}
    for step, task in enumerate(tasks[:20]):
        got_task, micro = mix.micro_batches(step)
        assert got_task == task
        if task == "dpo":
            assert torch.equal(micro[0].batch.input_ids, preferences.micro_batches(step)[1][0].batch.input_ids)
        else:
            assert micro == [step]
    assert tasks == [PreferenceMixData(preferences, Likelihood(), 0.25, seed=3).task(s) for s in range(400)]


@pytest.mark.parametrize("overrides, message", [
    (["tasks={dpo: 1.0, t2i: 1.0}"], "tasks t2i beside dpo need data.shards \\(or data.synthetic\\)"),
    (["data.preferences=null"], "task dpo needs data.preferences"),
    (["tasks={t2i: 1.0}"], "data.preferences holds preference pairs for task dpo"),
    (["dpo_beta=0"], "dpo_beta must be > 0"),
    (["dpo_chosen_nll_weight=-1"], "dpo_chosen_nll_weight >= 0"),
    (["distill_from=SELF", "distill_weight=1"], "task dpo does not use distill_from"),
    (["t2i_contrast_weight=1"], "task dpo does not use t2i_contrast_weight"),
    (["data.synthetic=16"], "task dpo alone trains on data.preferences only"),
    (["data.synthetic=16", "data.shards=x"], "set only one of"),
])
def test_dpo_settings_are_checked(model_copy, prefs, tmp_path, overrides, message):
    overrides = [o.replace("SELF", str(model_copy)) for o in overrides]
    with pytest.raises(MarsError, match=message):
        run_stage("stage2", tmp_path / "run", *DPO, f"init_from={model_copy}", f"data.preferences={prefs}",
                  "max_steps=1", *overrides)


def test_pairs_from_another_vq_gan_are_refused(model_copy, prefs, tmp_path, tiny_builders):
    shutil.rmtree(model_copy / "vq")
    tiny_builders.vq(seed=9).save_pretrained(model_copy / "vq")
    with pytest.raises(MarsError, match="codes of another VQ-GAN"):
        run_stage("stage2", tmp_path / "run", *DPO, f"init_from={model_copy}", f"data.preferences={prefs}",
                  "max_steps=1")


def test_pairs_of_a_reading_order_model_hold_its_restated_prompts(pipe, tmp_path, monkeypatch):
    """With prompt_order "reading" the pairs hold each prompt as the model reads it (a DPO stage trains
    on those words), the checker judges them (the same picture either way), and settings record it."""
    reading = MarsPipeline(pipe.model, pipe.tokenizer, pipe.vq, pipe.generation_config, prompt_order="reading")
    asked = ["a red circle to the right of a blue square", "一个红色的圆形在一个蓝色的正方形的下方", "a red circle"]
    restated = ["a blue square to the left of a red circle", "一个蓝色的正方形在一个红色的圆形的上方", "a red circle"]
    folder = make_preferences(reading, asked, tmp_path / "reading", candidates=2, part_size=2, batch_size=4,
                              judge="checker", progress=False)
    assert [p.prompt for p in PreferencePairs(folder, min_score_gap=0.0)] == restated
    assert json.loads((folder / "preferences.json").read_text(encoding="utf-8"))["prompt_order"] == "reading"
    pairs, _ = make_counterfactual_preferences(reading, "canonical:6:3", ("position",), "relation",
                                               tmp_path / "rendered", part_size=4, progress=False)
    assert all(parse_canonical(p.prompt).relation in ("left of", "above") for p in PreferencePairs(pairs))
