"""Captioning accuracy scored with captioners of known quality, and the CLI on the tiny model."""

from __future__ import annotations

import json

import pytest

from mars.cli import main
from mars.data.checker import detect_objects
from mars.data.captions import canonical_caption
from mars.data.shapes import COLOURS_ZH, INVERSE_RELATION, SHAPES_ZH, Scene, scene_for_index
from mars.eval.captions_eval import run_captions_eval, states_true_relation


def describe(images, lang):
    """A perfect captioner: names what the detector sees, one phrase per object."""
    texts = []
    for image in images:
        objs = detect_objects(image)
        if lang == "en":
            texts.append(" and ".join(f"a {o.colour} {o.shape}" for o in objs) + ".")
        else:
            texts.append("和".join(f"一个{COLOURS_ZH[o.colour]}的{SHAPES_ZH[o.shape]}" for o in objs) + "。")
    return texts


def test_perfect_captioner_scores_one(tmp_path):
    result = run_captions_eval(describe, tmp_path, n=12, seed=4, batch_size=5)
    assert result["summary"]["en"]["all"] == 1.0 and result["summary"]["zh"]["all"] == 1.0
    assert len(result["captions"]) == 24
    saved = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert saved["summary"] == result["summary"]
    assert (tmp_path / saved["captions"][0]["file"]).is_file()


def test_captioner_naming_one_object_scores_the_share_of_single_object_scenes(tmp_path):
    n = 40

    def first_only(images, lang):  # names the first object a perfect captioner would name
        return [describe([im], lang)[0].split(" and ")[0] for im in images]

    result = run_captions_eval(first_only, tmp_path, n=n, seed=0, langs=("en",))
    scenes = [scene_for_index(0, i, "eval") for i in range(n)]
    want = sum(len(s.objects) == 1 for s in scenes) / n
    assert 0 < want < 1
    assert result["summary"]["en"]["all"] == pytest.approx(want)
    assert result["summary"]["en"]["single"] == 1.0 and result["summary"]["en"]["two"] == 0.0
    wrong = next(r for r in result["captions"] if not r["correct"])
    assert wrong["named"].startswith("1 x ") and wrong["shown"] != wrong["named"]


def first_position_scene(seed: int = 0) -> Scene:
    return next(s for s in (scene_for_index(seed, i, "eval") for i in range(100)) if s.category == "position")


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_a_stated_relation_counts_when_it_holds_in_either_order(lang):
    scene = first_position_scene()
    a, b = scene.objects
    inverse = INVERSE_RELATION[scene.relation]
    assert states_true_relation(canonical_caption(scene, lang), scene)
    assert states_true_relation(canonical_caption(Scene((b, a), "position", inverse), lang), scene)  # "B rel' A"
    assert not states_true_relation(canonical_caption(Scene((a, b), "position", inverse), lang), scene)
    assert not states_true_relation(canonical_caption(Scene((a, b), "two", None), lang), scene)  # no relation
    assert not states_true_relation("a drawing of shapes", scene)


def test_relation_diagnostic_separates_captioners_the_score_cannot(tmp_path):
    n, scenes = 40, [scene_for_index(0, i, "eval") for i in range(40)]

    def captioner(flip):  # canonical captions of the true scenes, position relations flipped or not
        done = []

        def caption(images, lang):
            texts = []
            for scene in scenes[len(done):len(done) + len(images)]:
                if flip and scene.category == "position":
                    scene = Scene(scene.objects, "position", INVERSE_RELATION[scene.relation])
                texts.append(canonical_caption(scene, lang))
            done.extend(images)
            return texts
        return caption

    right = run_captions_eval(captioner(False), tmp_path / "right", n=n, langs=("en",), batch_size=7)
    wrong = run_captions_eval(captioner(True), tmp_path / "wrong", n=n, langs=("en",), batch_size=7)
    assert right["summary"] == wrong["summary"] and right["summary"]["en"]["all"] == 1.0  # the spec's rule
    assert right["relations"] == {"en": 1.0} and wrong["relations"] == {"en": 0.0}
    assert sum("true_relation" in r for r in wrong["captions"]) == sum(s.category == "position" for s in scenes) > 0


def test_captions_cli_with_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "captions"
    assert main(["eval", "captions", "--model", str(tiny_model_dir), "--device", "cpu", "--n", "3",
                 "--out-dir", str(out)]) == 0
    assert "all" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [(r["lang"], r["index"]) for r in results["captions"]] == [("en", 0), ("en", 1), ("en", 2),
                                                                     ("zh", 0), ("zh", 1), ("zh", 2)]
    assert all(isinstance(r["caption"], str) for r in results["captions"])
    assert set(results["summary"]) == {"en", "zh"}
    assert results["settings"] == {"cfg_scale": 1.0, "plausibility": 0.1, "refine": 0, "rerank": 1}  # the tiny model's


def test_captions_cli_refine_reaches_the_edits(tiny_model_dir, tmp_path, edit_recorder):
    out = tmp_path / "edited"
    assert main(["eval", "captions", "--model", str(tiny_model_dir), "--device", "cpu", "--n", "2", "--lang", "en",
                 "--refine", "3", "--out-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [r["caption"] for r in results["captions"]] == ["edited 3", "edited 3"]
    assert [rounds for *_, rounds in edit_recorder] == [3, 3] and results["settings"]["refine"] == 3


def test_captions_cli_guidance_is_applied_and_recorded(tiny_model_dir, tmp_path):
    from mars.pipeline import MarsPipeline

    out = tmp_path / "guided"
    assert main(["eval", "captions", "--model", str(tiny_model_dir), "--device", "cpu", "--n", "2", "--lang", "zh",
                 "--cfg-scale", "3", "--plausibility", "0.05", "--rerank", "3", "--refine", "1", "--out-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["settings"] == {"cfg_scale": 3.0, "plausibility": 0.05, "refine": 1, "rerank": 3}
    pipe = MarsPipeline.from_pretrained(tiny_model_dir, device="cpu")
    images = [str(out / r["file"]) for r in results["captions"]]
    assert [r["caption"] for r in results["captions"]] == pipe.caption(images, lang="zh", cfg_scale=3.0,
                                                                       plausibility=0.05, rerank=3, refine=1)


def test_captions_cli_refuses_bad_guidance_before_loading(tmp_path, capsys):
    code = main(["eval", "captions", "--model", str(tmp_path / "missing"), "--plausibility", "2",
                 "--out-dir", str(tmp_path / "out")])
    assert code == 2 and "plausibility must lie" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
