"""Counterfactual scenes, judged by SHAPES_SPEC's checker: the scene's render shows its canonical
caption, the counterfactual's render fails it for the one fact that was made false."""

from __future__ import annotations

import random

import pytest

from mars.data.captions import canonical_caption, parse_canonical
from mars.data.checker import check_prompt
from mars.data.counterfactual_scenes import FACT_CATEGORIES, check_fact, falsify, falsify_prompt
from mars.data.shapes import boxes_apart, fits_canvas, render_scene, sample_scene
from mars.errors import MarsError

CASES = [(fact, category) for fact, categories in FACT_CATEGORIES.items() for category in categories]


def scenes(category: str, n: int = 40):
    return [sample_scene(random.Random(f"counterfactual-test/{category}/{i}"), category) for i in range(n)]


@pytest.mark.parametrize("fact,category", CASES)
def test_the_counterfactual_fails_its_caption_for_that_fact_alone(fact, category):
    reasons = {"binding": "expected", "relation": " is not ", "size": " is not <= "}
    falsified = 0
    for scene in scenes(category):
        counterfactual = falsify(scene, fact)
        if counterfactual is None:
            continue
        falsified += 1
        for lang in ("en", "zh"):
            prompt = parse_canonical(canonical_caption(scene, lang))
            assert check_prompt(render_scene(scene), prompt).correct
            verdict = check_prompt(render_scene(counterfactual), prompt)
            assert not verdict.correct and reasons[fact] in verdict.reason, verdict.reason
        assert all(fits_canvas(o) for o in counterfactual.objects) and boxes_apart(*counterfactual.objects)
        assert sorted(o.shape for o in counterfactual.objects) == sorted(o.shape for o in scene.objects)
        assert sorted(o.colour for o in counterfactual.objects) == sorted(o.colour for o in scene.objects)
        assert sorted(o.size for o in counterfactual.objects) == sorted(o.size for o in scene.objects)
    assert falsified >= 20


@pytest.mark.parametrize("fact,category", CASES)
def test_the_falsified_prompt_is_what_the_counterfactual_scene_shows(fact, category):
    """The checker accepts the counterfactual's render for the falsified prompt and rejects the scene's own
    render for it: prompt and scene are made false alike, in both languages."""
    checked = 0
    for scene in scenes(category):
        counterfactual = falsify(scene, fact)
        for lang in ("en", "zh"):
            mirror = falsify_prompt(parse_canonical(canonical_caption(scene, lang)), fact)
            assert (mirror is None) == (fact == "binding" and counterfactual is None)
            if counterfactual is None:
                continue
            assert mirror.lang == lang and mirror.category == category
            assert check_prompt(render_scene(counterfactual), mirror).correct
            assert not check_prompt(render_scene(scene), mirror).correct
            checked += 1
    assert checked >= 40


def test_only_scenes_the_fact_can_be_made_false_in_are_falsified():
    for scene in scenes("two", 60):
        a, b = scene.objects
        assert (falsify(scene, "binding") is None) == (a.colour == b.colour or a.shape == b.shape)
    exchanged = [(scene, falsify(scene, "size")) for scene in scenes("size", 60)]
    exchanged = [(scene, counterfactual) for scene, counterfactual in exchanged if counterfactual is not None]
    assert 10 <= len(exchanged) < 60  # about half allow it; the rest would leave the canvas or touch
    for scene, (small, large) in ((scene, c.objects) for scene, c in exchanged):
        assert (small.size, large.size) == (scene.objects[1].size, scene.objects[0].size)
        assert (small.cx, small.cy) == (scene.objects[0].cx, scene.objects[0].cy)


def test_facts_a_caption_does_not_state_are_refused():
    with pytest.raises(MarsError, match="unknown counterfactual 'count'; choose from binding, relation, size"):
        check_fact("count", ("two",))
    with pytest.raises(MarsError, match="the relation counterfactual needs .* \\(position\\); not size, two"):
        check_fact("relation", ("two", "position", "size"))
    with pytest.raises(MarsError, match="the size counterfactual needs"):
        falsify(scenes("two", 1)[0], "size")
