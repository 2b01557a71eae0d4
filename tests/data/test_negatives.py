"""Counterfactual prompts: one group's words exchanged (binding) or replaced (relation, size, count)."""

from __future__ import annotations

import numpy as np
import pytest

from mars.data.negatives import check_swap_groups, matches_any, oversampled_epoch, swap_words
from mars.errors import MarsError

GROUPS = [["left", "right"], ["small", "large", "big"], ["circle", "square", "triangle", "star"],
          ["red", "blue", "green"], ["左边", "右边"], ["圆形", "正方形", "三角形"], ["两个", "三个", "四个"]]


def _all(text: str, n: int = 200) -> set[str | None]:
    rng = np.random.default_rng(0)
    return {swap_words(text, GROUPS, rng) for _ in range(n)}


def test_a_single_word_of_a_group_is_replaced_by_each_other_word():
    assert _all("a red circle to the left of a blue circle") >= {
        "a red circle to the right of a blue circle",  # relation
        "a red square to the left of a blue square", "a red star to the left of a blue star",  # every 'circle'
        "a blue circle to the left of a red circle"}  # the two colours trade places


def test_two_words_of_a_group_trade_places_and_never_merge():
    out = _all("a small red circle and a big blue square")
    assert "a small red square and a big blue circle" in out  # binding: shapes exchanged
    assert "a big red circle and a small blue square" in out  # sizes exchanged
    assert "a small blue circle and a big red square" in out
    assert all(o.count("circle") + o.count("square") + o.count("triangle") + o.count("star") == 2 for o in out)
    assert "a small red circle and a big blue square" not in out  # always a change


def test_plural_and_chinese_words_match_as_substrings_without_breaking_longer_words():
    assert _all("three green stars") >= {"three green circles", "three red stars"}
    out = _all("三个绿色的三角形")
    assert out >= {"两个绿色的三角形", "四个绿色的三角形", "三个绿色的圆形", "三个绿色的正方形"}
    assert all(o.count("三角形") + o.count("圆形") + o.count("正方形") == 1 for o in out)  # 三个 never eats 三角形


def test_no_applicable_group_gives_none_and_the_draw_is_seeded():
    assert swap_words("a picture", GROUPS, np.random.default_rng(0)) is None
    draws = [swap_words("a red circle left of a blue square", GROUPS, np.random.default_rng(7)) for _ in range(2)]
    assert draws[0] == draws[1]


@pytest.mark.parametrize("groups", [[["left"]], [["left", "left"]], [["a", "b"], ["b", "c"]], [["a", ""]], "left"])
def test_bad_groups_are_refused_with_a_message(groups):
    with pytest.raises(MarsError, match="swap group"):
        check_swap_groups(groups)


def test_the_shapes_swap_groups_load_and_every_word_occurs_in_training_captions():
    from pathlib import Path

    from mars.data.captions import shapes_example
    from mars.train.config import load_train_config

    config = Path(__file__).resolve().parents[2] / "configs" / "shapes-demo" / "swaps.yaml"
    groups = load_train_config(config).t2i_contrast_swaps
    captions = " ".join(" ".join(shapes_example(0, i, "train")[1:]) for i in range(3000))
    missing = [w for g in groups for w in g if w not in captions]
    assert not missing, f"swap words that no MARS-Shapes caption uses: {missing}"


def test_matches_any_agrees_with_swap_words():
    groups = [["left", "right"], ["左边", "右边"]]
    rng = np.random.default_rng(0)
    for text in ("a red circle to the left of a star", "红色圆形在星形的右边", "two stars", "", None):
        assert matches_any(text, groups) == (bool(text) and swap_words(text, groups, rng) is not None)


def test_an_oversampled_epoch_lists_swappable_samples_repeat_times_in_either_language():
    captions = [("a star to the left of a circle", "星形在圆形的左边"),  # both languages match
                ("two stars", "两个星形"),  # neither
                ("a star and a circle", "星形在圆形的右边"),  # only the Chinese caption
                ("a star to the right of a circle", None)]  # only English, no Chinese caption
    pool = oversampled_epoch(captions, [["left", "right"], ["左边", "右边"]], repeat=3)
    assert np.bincount(pool, minlength=4).tolist() == [3, 1, 3, 3]
    assert oversampled_epoch(captions, [["above", "below"]], repeat=3).tolist() == [0, 1, 2, 3]
    with pytest.raises(MarsError, match="repeat must be >= 1"):
        oversampled_epoch(captions, [["left", "right"]], repeat=0)
