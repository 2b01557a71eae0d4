"""MARS-Shapes world: spec constants, exact geometry, sampler rules, captions, `mars data shapes`."""

import argparse
import json
import math
import random
import re
from collections import Counter

import numpy as np
import pytest

from mars.data.captions import (
    canonical_caption, canonical_prompts, caption_objects, caption_pair, caption_scene, paraphrase,
    parse_canonical, reading_order_prompt, shapes_example,
)
from mars.data.checker import check_prompt
from mars.data.cli import add_commands
from mars.data.shapes import (
    COLOURS, COLOURS_ZH, HELD_OUT, SHAPES_ZH, SIZE_RANGES, Scene, ShapeObject, render_scene, sample_scene,
    scene_for_index,
)
from mars.errors import MarsError


def scenes(split, n, seed=0):
    return [scene_for_index(seed, i, split) for i in range(n)]


def test_constants_match_spec_tables():
    assert COLOURS["red"] == (220, 40, 40)
    assert COLOURS["orange"] == (245, 140, 30)
    assert COLOURS["purple"] == (140, 70, 190)
    assert COLOURS["black"] == (30, 30, 30)
    assert len(COLOURS) == 7 and COLOURS_ZH["yellow"] == "黄色" and COLOURS_ZH["green"] == "绿色"
    assert SHAPES_ZH == {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形"}
    assert SIZE_RANGES == {"small": (36, 48), "large": (76, 92), "any": (40, 84)}
    assert HELD_OUT == {("purple", "star"), ("orange", "triangle")}


def mask_of(obj: ShapeObject) -> np.ndarray:
    img = np.asarray(render_scene(Scene((obj,), "single")))
    return (img != 255).any(axis=-1)


@pytest.mark.parametrize("s", [40, 41, 76, 92])
def test_rendered_geometry(s):
    cx, cy = 120, 130
    # Pillow draws both box edges: circle, square and triangle cover s + 1 columns and rows.
    for shape in ("circle", "square", "triangle"):
        ys, xs = np.nonzero(mask_of(ShapeObject("blue", shape, cx, cy, s)))
        assert xs.max() - xs.min() + 1 == s + 1 and ys.max() - ys.min() + 1 == s + 1, shape
    assert mask_of(ShapeObject("blue", "square", cx, cy, s)).sum() == (s + 1) ** 2
    circle = mask_of(ShapeObject("blue", "circle", cx, cy, s)).sum()
    assert abs(circle - math.pi * ((s + 1) / 2) ** 2) < 0.03 * circle  # pixel centres inside
    tri = mask_of(ShapeObject("blue", "triangle", cx, cy, s))
    assert tri[cy - s // 2 + 1, cx] and not tri[cy - s // 2 + 1, cx - 5]  # apex on top
    assert abs(tri.sum() - s * s / 2) < 0.05 * s * s
    # Star: 5 points, outer radius s/2, inner radius s/4, one point straight up.
    star = mask_of(ShapeObject("blue", "star", cx, cy, s))
    ys, xs = np.nonzero(star)
    r = s / 2
    assert abs((xs.max() - xs.min()) - 2 * r * math.cos(math.radians(18))) <= 1.5
    assert abs((ys.max() - ys.min()) - r * (1 + math.cos(math.radians(36)))) <= 1.5
    assert ys.min() == math.ceil(cy - r) or ys.min() == math.floor(cy - r)
    assert star[cy, cx] and star[round(cy + r / 2) - 2, cx] and not star[round(cy + r / 2) + 2, cx]
    area = 5 * r * (r / 2) * math.sin(math.radians(36))  # 10 triangles (centre, outer, inner)
    perimeter = 10 * r * math.sqrt(1.25 - math.cos(math.radians(36)))
    # Pillow also paints the pixels that the edges cross: about half a pixel along the perimeter.
    assert abs(star.sum() - (area + perimeter / 2)) < 0.04 * area


def test_render_size_is_nearest_resize():
    scene = scene_for_index(0, 3)
    big = np.asarray(render_scene(scene))
    assert np.array_equal(np.asarray(render_scene(scene, 512))[::2, ::2], big)
    assert render_scene(scene, 128).size == (128, 128)


def test_held_out_pairs_never_in_train():
    rng = random.Random(0)
    for _ in range(6000):
        assert not set(sample_scene(rng).pairs()) & HELD_OUT
    with pytest.raises(ValueError):
        sample_scene(rng, "novel", "train")
    novel = [sample_scene(rng, "novel", "eval") for _ in range(50)]
    assert {p for s in novel for p in s.pairs()} == set(HELD_OUT)
    for cat in ("single", "two", "counting", "position", "size"):
        assert not any(set(sample_scene(rng, cat, "eval").pairs()) & HELD_OUT for _ in range(200))


@pytest.mark.parametrize("split", ["train", "eval"])
def test_placement_rules(split):
    for scene in scenes(split, 1500, seed=7):
        objs = scene.objects
        assert 1 <= len(objs) <= 4
        for o in objs:
            assert o.cx - o.size / 2 >= 8 and o.cy - o.size / 2 >= 8
            assert o.cx + o.size / 2 <= 247 and o.cy + o.size / 2 <= 247
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                gap_x = max(b.cx - b.size / 2 - (a.cx + a.size / 2), a.cx - a.size / 2 - (b.cx + b.size / 2))
                gap_y = max(b.cy - b.size / 2 - (a.cy + a.size / 2), a.cy - a.size / 2 - (b.cy + b.size / 2))
                assert max(gap_x, gap_y) >= 10
        if scene.category in ("two", "position", "size"):
            assert len(objs) == 2 and scene.pairs()[0] != scene.pairs()[1]
        if scene.category == "counting":
            assert len(objs) in (2, 3, 4) and len(set(scene.pairs())) == 1
        if scene.category == "position":
            dx, dy = objs[1].cx - objs[0].cx, objs[1].cy - objs[0].cy
            named, other = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[scene.relation]
            assert named >= 48 and named >= 2 * abs(other)
        if scene.category == "size":
            assert 36 <= objs[0].size <= 48 and 76 <= objs[1].size <= 92
        else:
            assert all(40 <= o.size <= 84 for o in objs)


def test_all_categories_drawn():
    assert {s.category for s in scenes("train", 200)} == {"single", "two", "counting", "position", "size"}
    assert {s.category for s in scenes("eval", 200)} == {"single", "two", "counting", "position", "size", "novel"}


def test_canonical_captions_exact():
    def obj(c, s, x=60, y=60):
        return ShapeObject(c, s, x, y, 50)

    cases = [
        (Scene((obj("orange", "circle"),), "single"), "an orange circle", "一个橙色的圆形"),
        (Scene((obj("purple", "star"),), "novel"), "a purple star", "一个紫色的星形"),
        (Scene((obj("red", "circle"), obj("blue", "square", 160)), "two"),
         "a red circle and a blue square", "一个红色的圆形和一个蓝色的正方形"),
        (Scene((obj("red", "star"), obj("red", "star", 160), obj("red", "star", 60, 160)), "counting"),
         "three red stars", "三个红色的星形"),
        (Scene((obj("red", "star"), obj("red", "star", 160)), "counting"), "two red stars", "两个红色的星形"),
        (Scene((obj("green", "triangle"), obj("orange", "square", 160)), "position", "left of"),
         "a green triangle to the left of an orange square", "一个绿色的三角形在一个橙色的正方形的左边"),
        (Scene((obj("green", "triangle", 60, 160), obj("black", "square")), "position", "below"),
         "a green triangle below a black square", "一个绿色的三角形在一个黑色的正方形的下方"),
        (Scene((obj("red", "circle"), obj("blue", "square", 160)), "size"),
         "a small red circle and a large blue square", "一个小的红色圆形和一个大的蓝色正方形"),
    ]
    for scene, en, zh in cases:
        assert canonical_caption(scene, "en") == en
        assert canonical_caption(scene, "zh") == zh


@pytest.mark.parametrize("split", ["train", "eval"])
def test_captions_parse_back(split):
    rng = random.Random(1)
    for scene in scenes(split, 1000, seed=3):
        for lang in ("en", "zh"):
            parsed = parse_canonical(canonical_caption(scene, lang))
            assert parsed.category == scene.category and list(parsed.objects) == scene.pairs()
            assert parsed.relation == scene.relation and parsed.lang == lang
            for _ in range(3):
                text = paraphrase(scene, lang, rng)
                assert caption_objects(text) == Counter(scene.pairs()), text


def test_parse_rejects_and_tolerates():
    assert parse_canonical("A red circle.").objects == (("red", "circle"),)
    assert parse_canonical(" 一个红色的圆形。").lang == "zh"
    for bad in ("a red circle on a table", "five red circles", "a pink circle", "一个红色的圆"):
        with pytest.raises(MarsError):
            parse_canonical(bad)


def test_caption_objects_reads_free_text():
    assert caption_objects("There are 3 red circles and an orange star.") == Counter(
        {("red", "circle"): 3, ("orange", "star"): 1})
    assert caption_objects("图中有两个蓝色正方形和一个小的黑色的三角形。") == Counter(
        {("blue", "square"): 2, ("black", "triangle"): 1})
    assert caption_objects("nothing here") == Counter()


def test_canonical_fraction_of_training_captions():
    for lang_index, lang in ((1, "en"), (2, "zh")):
        hits = 0
        for i in range(600):
            example = shapes_example(0, i)
            hits += example[lang_index] == canonical_caption(example[0], lang)
        assert 0.4 <= hits / 600 <= 0.65  # the spec asks for >= 30%
    rng = random.Random(0)
    scene = scene_for_index(0, 0)
    assert caption_scene(scene, rng, "zh", canonical_fraction=1.0) == canonical_caption(scene, "zh")


def test_caption_pair_holds_both_captions_of_the_scene_in_alternating_order():
    for i in range(6):
        scene, en, zh = shapes_example(3, i)
        assert caption_pair(i, en, zh) == (f"{en} {zh}" if i % 2 == 0 else f"{zh} {en}")
        # Both halves name the same objects: the second is predictable only from the first.
        assert caption_objects(en) == caption_objects(zh) == Counter((o.colour, o.shape) for o in scene.objects)


def test_canonical_prompts_align_across_languages():
    for cat in ("single", "two", "counting", "position", "size", "novel"):
        en = canonical_prompts(cat, "en", random.Random(5), n=8)
        zh = canonical_prompts(cat, "zh", random.Random(5), n=8)
        assert [parse_canonical(p).objects for p in en] == [parse_canonical(p).objects for p in zh]
        assert {parse_canonical(p).category for p in en} == {cat}
    with pytest.raises(MarsError):
        canonical_prompts("colours", "en", random.Random(0))


def run_cli(*argv):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(required=True))
    args = parser.parse_args(["data", "shapes", *argv])
    return args.func(args)


def test_cli_is_deterministic(tmp_path):
    run_cli("--n", "40", "--out", str(tmp_path / "a"), "--seed", "3")
    run_cli("--n", "40", "--out", str(tmp_path / "b"), "--seed", "3", "--workers", "2")
    a, b = tmp_path / "a", tmp_path / "b"
    names = sorted(p.name for p in (a / "images").iterdir())
    assert names == [f"{i:05d}.png" for i in range(40)]
    assert all((a / "images" / n).read_bytes() == (b / "images" / n).read_bytes() for n in names)
    assert (a / "captions.jsonl").read_bytes() == (b / "captions.jsonl").read_bytes()
    lines = [json.loads(x) for x in (a / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert lines[7]["image"] == "images/00007.png"
    assert {"text", "text_zh", "category", "objects"} <= set(lines[7])
    assert Scene.from_dict(lines[7]) == scene_for_index(3, 7)

    with pytest.raises(MarsError, match="not empty"):
        run_cli("--n", "5", "--out", str(a))
    run_cli("--n", "5", "--out", str(a), "--overwrite", "--split", "eval")
    assert len(list((a / "images").iterdir())) == 5


def test_cli_reading_order_writes_the_scene_as_its_captions_state_it(tmp_path):
    run_cli("--n", "30", "--out", str(tmp_path / "r"), "--seed", "3", "--reading-order")
    lines = [json.loads(x) for x in (tmp_path / "r" / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
    positions = [line for line in lines if line["category"] == "position"]
    assert positions and all(line["relation"] in ("left of", "above") for line in positions)
    for i, line in enumerate(lines):
        assert Scene.from_dict(line) == scene_for_index(3, i).in_reading_order()
        assert (line["text"], line["text_zh"]) == shapes_example(3, i, reading_order=True)[1:]


def test_reading_order_captions_name_the_first_object_in_reading_order():
    """Every relation a reading-order caption states is left of / above, the first-named object is the
    one met first on the relation's axis, and the spec's checker accepts the canonical ones on the
    scene's own render; scenes without a relation are captioned exactly as without the option."""
    last_words = ("to the right of", "below", "右边", "右侧", "下方", "下面")
    relations_seen = Counter()
    for i in range(300):
        scene, en, zh = shapes_example(4, i, reading_order=True)
        plain = shapes_example(4, i)
        assert plain[0] == scene  # the same picture
        if scene.category != "position":
            assert (en, zh) == plain[1:]
            continue
        for text in (en, zh):
            assert not any(w in text for w in last_words), text
            assert caption_objects(text) == Counter(scene.pairs())
            try:
                parsed = parse_canonical(text)
            except MarsError:
                continue  # a paraphrase: checked by its words above
            assert parsed.relation in ("left of", "above")
            relations_seen[parsed.relation] += 1
            assert check_prompt(render_scene(scene), text).correct, text
            a, b = (next(o for o in scene.objects if (o.colour, o.shape) == pair) for pair in parsed.objects)
            axis_a, axis_b = ((a.cx, b.cx) if parsed.relation == "left of" else (a.cy, b.cy))
            assert axis_a < axis_b
    assert relations_seen["left of"] > 10 and relations_seen["above"] > 10


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_reading_order_prompt_restates_a_position_prompt_for_the_same_picture(lang):
    rng = random.Random(6)
    restated = 0
    for _ in range(200):
        scene = sample_scene(rng, "position", split="eval")
        prompt = canonical_caption(scene, lang)
        new = reading_order_prompt(prompt)
        assert parse_canonical(new).relation in ("left of", "above")
        assert check_prompt(render_scene(scene), new).correct, (prompt, new)  # the same picture satisfies both
        if scene.relation in ("right of", "below"):
            restated += 1
            assert new != prompt and reading_order_prompt(new) == new
            assert parse_canonical(new).objects == parse_canonical(prompt).objects[::-1]
        else:
            assert new == prompt
    assert restated > 50
    for other in ("a red circle", "two red circles", "一个小的红色圆形和一个大的蓝色正方形", "a cat to the right of a dog"):
        assert reading_order_prompt(other) == other


RELATION_WORDS = {"en": ("left of", "right of", "above", "below"),
                  "zh": ("左边", "右边", "上方", "下方", "左侧", "右侧", "上面", "下面")}


def _without_article_choice(caption: str) -> str:
    """A caption with the per-object choices of `caption_scene` undone: "a" / "an" / "one", and
    Chinese 的 (optional inside a phrase), so two captions that differ only in them compare equal."""
    return re.sub(r"\b(an?|one)\b", "a", caption.lower()).replace("的", "")


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_a_paraphrased_relation_is_restated_as_the_reading_order_captions_state_it(lang):
    """Restating a training paraphrase gives the caption that `caption_scene(..., reading_order=True)`
    writes for the same scene and random draws (the same verb, relation word and second sentence),
    up to which object got "a" or "one"."""
    restated = 0
    for k in range(300):
        scene = sample_scene(random.Random(k), "position")
        as_written = caption_scene(scene, random.Random(k), lang, canonical_fraction=0.0)
        in_reading_order = caption_scene(scene, random.Random(k), lang, canonical_fraction=0.0, reading_order=True)
        new = reading_order_prompt(as_written)
        if not any(word in as_written for word in RELATION_WORDS[lang]):
            assert new == as_written  # "A and B" (a listing, 3 in 10) states no relation
            continue
        assert _without_article_choice(new) == _without_article_choice(in_reading_order), (as_written, new)
        assert reading_order_prompt(new) == new and caption_objects(new) == caption_objects(as_written)
        restated += new != as_written
    assert restated > 50


def test_the_english_and_chinese_restatements_agree():
    assert reading_order_prompt("A red circle to the right of a blue square.") == \
        "A blue square to the left of a red circle."  # the writer's capital and full stop stay
    assert reading_order_prompt("One red circle sits below a blue square. The background is white.") == \
        "A blue square sits above one red circle. The background is white."
    assert reading_order_prompt("一个红色圆形位于一个蓝色的正方形的右侧。") == "一个蓝色的正方形位于一个红色圆形的左侧。"
    assert reading_order_prompt("an orange star below a green circle") == "a green circle above an orange star"
    assert reading_order_prompt("一个红色的圆形在一个蓝色的正方形的右边") == "一个蓝色的正方形在一个红色的圆形的左边"
    assert reading_order_prompt("一个红色的圆形在一个蓝色的正方形的下方") == "一个蓝色的正方形在一个红色的圆形的上方"
