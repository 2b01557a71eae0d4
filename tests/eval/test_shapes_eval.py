"""The MARS-Shapes benchmark scored end to end with generators of known quality, and the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from mars.cli import main
from mars.data.captions import parse_canonical
from mars.data.shapes import EVAL_CATEGORIES, INVERSE_RELATION, Scene, ShapeObject, render_scene
from mars.errors import MarsError
from mars.eval.shapes_eval import position_diagnostics, run_shapes_eval, shapes_items

# Where a "perfect generator" puts the objects of a prompt (centres px@256, size 60, boxes apart).
CORNERS = [(64, 64), (192, 64), (64, 192), (192, 192)]
# centres of (A, B) for "A <relation> B", with d = centre(B) - centre(A) as the spec defines it
RELATION_CENTRES = {"left of": [(64, 128), (192, 128)], "right of": [(192, 128), (64, 128)],
                    "above": [(128, 64), (128, 192)], "below": [(128, 192), (128, 64)]}


def perfect_picture(prompt: str) -> Image.Image:
    """Draw exactly what a canonical prompt asks for, with mars.data.shapes."""
    parsed = parse_canonical(prompt)
    pairs = parsed.objects
    if parsed.category == "position":
        centres, sizes = RELATION_CENTRES[parsed.relation], [60, 60]
    elif parsed.category == "size":
        centres, sizes = [(64, 128), (192, 128)], [40, 84]  # small A, large B
    elif len(pairs) == 1:
        centres, sizes = [(128, 128)], [60]
    else:
        centres, sizes = CORNERS[:len(pairs)], [60] * len(pairs)
    objects = tuple(ShapeObject(c, s, x, y, size) for (c, s), (x, y), size in zip(pairs, centres, sizes))
    return render_scene(Scene(objects, parsed.category, parsed.relation))


class FakeGenerator:
    """A GenerateFn that draws each prompt with `draw` and records every request."""

    def __init__(self, draw):
        self.draw, self.calls = draw, []

    def __call__(self, prompts, seeds):
        self.calls.append((list(prompts), list(seeds)))
        return [self.draw(p) for p in prompts]


def test_items_pair_languages_and_cover_every_category():
    items = shapes_items(3, seed=5)
    assert len(items) == len(EVAL_CATEGORIES) * 2 * 3
    en = {(i.category, i.index): i for i in items if i.lang == "en"}
    zh = {(i.category, i.index): i for i in items if i.lang == "zh"}
    for key, item in en.items():
        # the same scene in both languages, the same generator seed
        assert parse_canonical(item.prompt).objects == parse_canonical(zh[key].prompt).objects
        assert item.seed == zh[key].seed
        assert parse_canonical(item.prompt).category == key[0]
    assert len({i.file for i in items}) == len(items)
    assert shapes_items(3, seed=5) == items  # fixed by the seed
    with pytest.raises(MarsError):
        shapes_items(0)
    with pytest.raises(MarsError):
        shapes_items(1, langs=("fr",))


def test_perfect_generator_scores_one_and_blank_scores_zero(tmp_path):
    perfect = run_shapes_eval(FakeGenerator(perfect_picture), tmp_path / "perfect", n_per_category=3, seed=1,
                              batch_size=4)
    for lang in ("en", "zh"):
        assert perfect["summary"][lang] == {**{c: 1.0 for c in EVAL_CATEGORIES}, "overall": 1.0}
    assert all(r["reason"] == "ok" for r in perfect["images"])
    for lang in ("en", "zh"):
        partial = perfect["diagnostics"][lang]
        assert partial["right_count"] == partial["colours_present"] == partial["objects_present"] == 1.0
        assert partial["median_objects"] >= 1
        assert partial["position_pairs"] == partial["position_axis"] == partial["position_order"] == 1.0

    blank = run_shapes_eval(FakeGenerator(lambda p: Image.new("RGB", (256, 256), "white")), tmp_path / "blank",
                            n_per_category=3, seed=1)
    for lang in ("en", "zh"):
        assert blank["summary"][lang] == {**{c: 0.0 for c in EVAL_CATEGORIES}, "overall": 0.0}
    assert all("found 0" in r["reason"] for r in blank["images"])
    assert blank["diagnostics"]["en"] == {"right_count": 0.0, "colours_present": 0.0, "objects_present": 0.0,
                                          "median_objects": 0.0, "position_pairs": 0.0,
                                          "position_axis": None, "position_order": None}

    # the JSON holds every image's verdict, and the saved image is the one judged
    saved = json.loads((tmp_path / "perfect" / "results.json").read_text(encoding="utf-8"))
    assert saved["summary"] == perfect["summary"] and len(saved["images"]) == len(EVAL_CATEGORIES) * 2 * 3
    record = saved["images"][0]
    assert set(record) >= {"prompt", "file", "correct", "reason", "detected"}
    assert record["detected"][0]["colour"] == parse_canonical(record["prompt"]).objects[0][0]
    assert (tmp_path / "perfect" / record["file"]).is_file()


def test_one_wrong_category_shows_in_its_row_only(tmp_path):
    def wrong_counts(prompt):  # a single object where a counting prompt asks for 2 to 4
        parsed = parse_canonical(prompt)
        colour, shape = parsed.objects[0]
        return perfect_picture(f"a {colour} {shape}" if parsed.category == "counting" else prompt)
    result = run_shapes_eval(FakeGenerator(wrong_counts), tmp_path, n_per_category=2, langs=("en",))
    summary = result["summary"]["en"]
    assert summary["counting"] == 0.0
    assert all(summary[c] == 1.0 for c in EVAL_CATEGORIES if c != "counting")
    assert summary["overall"] == pytest.approx(5 / 6)
    # partial credit: every colour is there, the counting images lack objects
    partial = result["diagnostics"]["en"]
    assert partial["colours_present"] == 1.0
    assert partial["right_count"] == partial["objects_present"] == pytest.approx(5 / 6)


def drawn_as(relation_of):
    """A generator that draws a position prompt's pair as `relation_of(asked relation)` places it."""
    def draw(prompt):
        parsed = parse_canonical(prompt)
        if parsed.category != "position":
            return perfect_picture(prompt)
        centres = RELATION_CENTRES[relation_of(parsed.relation)]
        objects = tuple(ShapeObject(c, s, x, y, 60) for (c, s), (x, y) in zip(parsed.objects, centres))
        return render_scene(Scene(objects, "position", parsed.relation))
    return draw


def test_position_diagnostics_tell_the_axis_from_the_order(tmp_path):
    reversed_ = run_shapes_eval(FakeGenerator(drawn_as(INVERSE_RELATION.get)), tmp_path / "reversed",
                                n_per_category=4, seed=2)
    across = {"left of": "above", "right of": "below", "above": "left of", "below": "right of"}
    crossed = run_shapes_eval(FakeGenerator(drawn_as(across.get)), tmp_path / "crossed", n_per_category=4, seed=2)
    for lang in ("en", "zh"):
        assert reversed_["summary"][lang]["position"] == crossed["summary"][lang]["position"] == 0.0
        # the right axis in the wrong order, then the wrong axis (no order to judge)
        assert {k: reversed_["diagnostics"][lang][k] for k in ("position_pairs", "position_axis", "position_order")} \
            == {"position_pairs": 1.0, "position_axis": 1.0, "position_order": 0.0}
        assert {k: crossed["diagnostics"][lang][k] for k in ("position_pairs", "position_axis", "position_order")} \
            == {"position_pairs": 1.0, "position_axis": 0.0, "position_order": None}


def test_position_diagnostics_count_only_images_with_each_named_object_once():
    record = {"prompt": "a red circle to the left of a blue square", "detected": [
        {"colour": "red", "shape": "circle", "cx": 60.0, "cy": 128.0},
        {"colour": "blue", "shape": "square", "cx": 190.0, "cy": 120.0}]}
    doubled = {**record, "detected": record["detected"] + [{**record["detected"][0], "cy": 40.0}]}
    missing = {**record, "detected": record["detected"][:1]}
    assert position_diagnostics([record, doubled, missing]) == {
        "position_pairs": pytest.approx(1 / 3), "position_axis": 1.0, "position_order": 1.0}
    assert position_diagnostics([]) == {"position_pairs": None, "position_axis": None, "position_order": None}


def test_resume_generates_only_missing_images(tmp_path):
    first = FakeGenerator(perfect_picture)
    run_shapes_eval(first, tmp_path, n_per_category=2, langs=("en",), batch_size=5)
    assert sum(len(p) for p, _ in first.calls) == 12
    victim = tmp_path / "images" / "en" / "size" / "0001.png"
    victim.unlink()
    again = FakeGenerator(perfect_picture)
    result = run_shapes_eval(again, tmp_path, n_per_category=2, langs=("en",))
    lost = shapes_items(2, langs=("en",))[9]  # categories in order, 2 each: index 9 = size #1
    assert lost.file == "images/en/size/0001.png"
    assert again.calls == [([lost.prompt], [lost.seed])]
    assert victim.is_file() and result["summary"]["en"]["overall"] == 1.0


def test_some_categories_ask_what_the_whole_benchmark_asks_there(tmp_path):
    whole = [it for it in shapes_items(3, seed=4) if it.category in ("position", "counting")]
    assert shapes_items(3, seed=4, categories=("position", "counting")) == whole  # same prompts, seeds, files
    generator = FakeGenerator(drawn_as(INVERSE_RELATION.get))
    result = run_shapes_eval(generator, tmp_path, n_per_category=3, seed=4, categories=("position",))
    assert [len(prompts) for prompts, _ in generator.calls] == [6]  # 3 per language, nothing else drawn
    assert result["categories"] == ["position"]
    for lang in ("en", "zh"):
        assert result["summary"][lang] == {"position": 0.0}  # no overall of one category
        assert result["diagnostics"][lang]["position_order"] == 0.0
    with pytest.raises(MarsError, match="unknown category 'colour'; choose from single, two"):
        shapes_items(3, categories=("colour",))
    with pytest.raises(MarsError, match="named twice"):
        shapes_items(3, categories=("position", "position"))
    with pytest.raises(MarsError, match="no category given"):
        shapes_items(3, categories=())


def test_shapes_cli_with_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "shapes"
    args = ["eval", "shapes", "--model", str(tiny_model_dir), "--n-per-category", "1", "--lang", "en",
            "--out-dir", str(out), "--batch-size", "6", "--device", "cpu"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "overall" in table and "novel" in table and "position_order" in table
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert len(results["images"]) == len(EVAL_CATEGORIES)
    assert set(results["summary"]["en"]) == {*EVAL_CATEGORIES, "overall"}
    for record in results["images"]:
        with Image.open(out / record["file"]) as img:
            assert img.size == (64, 64)  # the debug model's resolution, judged after resizing to 256
    # a resumed run with other settings is refused instead of mixing two experiments
    assert main(args + ["--cfg-scale", "2.0"]) == 2
    assert "other settings" in capsys.readouterr().err
    # one category: scored alone from the images already there, without an overall score
    assert main(args + ["--categories", "novel"]) == 0
    table = capsys.readouterr().out
    assert "novel" in table and "overall" not in table and "single" not in table
    assert main(args + ["--categories", "novel,colour"]) == 2
    assert "unknown category 'colour'" in capsys.readouterr().err


def test_shapes_cli_records_rerank_and_refuses_to_mix_it(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "shapes"
    args = ["eval", "shapes", "--model", str(tiny_model_dir), "--n-per-category", "1", "--lang", "zh",
            "--out-dir", str(out), "--device", "cpu"]
    assert main(args + ["--rerank", "2"]) == 0
    settings = json.loads((out / "results.json").read_text(encoding="utf-8"))["settings"]
    assert settings["rerank"] == 2 and settings["rerank_drawing_weight"] == 0.0  # the tiny model's default
    capsys.readouterr()
    assert main(args) == 2  # the same folder without reranking: other settings
    assert "other settings" in capsys.readouterr().err
    assert main(args + ["--rerank", "0", "--out-dir", str(tmp_path / "bad")]) == 2
    assert "--rerank must be >= 1" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(args + ["--rerank", "2", "--rerank-drawing-weight", "0.5"]) == 2  # another weight: other settings
    assert "other settings" in capsys.readouterr().err
    assert main(args + ["--rerank", "2", "--rerank-drawing-weight", "-1", "--out-dir", str(tmp_path / "bad")]) == 2
    assert "drawing_weight must be" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_shapes_cli_records_the_jacobi_window(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "shapes"
    args = ["eval", "shapes", "--model", str(tiny_model_dir), "--n-per-category", "1", "--lang", "en",
            "--out-dir", str(out), "--device", "cpu", "--categories", "single"]
    assert main(args + ["--jacobi-window", "2"]) == 0
    settings = json.loads((out / "results.json").read_text(encoding="utf-8"))["settings"]
    assert settings["jacobi_window"] == 2
    capsys.readouterr()
    assert main(args) == 2  # one code per forward: other settings, not mixed in
    assert "other settings" in capsys.readouterr().err
    assert main(args + ["--jacobi-window", "-2", "--out-dir", str(tmp_path / "bad")]) == 2
    assert "Jacobi window" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_shapes_cli_records_a_reading_order_model_and_judges_the_prompt_as_asked(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "reading"
    shutil.copytree(tiny_model_dir, model)
    (model / "generation_config.json").write_text('{"cfg_scale": 2.0, "prompt_order": "reading"}')
    out = tmp_path / "shapes"
    args = ["eval", "shapes", "--model", str(model), "--n-per-category", "4", "--lang", "en",
            "--out-dir", str(out), "--device", "cpu"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["settings"]["prompt_order"] == "reading"
    asked = [r["prompt"] for r in results["images"] if r["category"] == "position"]
    assert any(parse_canonical(p).relation in ("right of", "below") for p in asked)  # recorded as asked
    (model / "generation_config.json").write_text('{"cfg_scale": 2.0}')
    capsys.readouterr()
    assert main(args) == 2  # the same folder with the prompts as written: other settings
    assert "other settings" in capsys.readouterr().err
