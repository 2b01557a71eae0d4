"""Counterfactual prompts: a caption with words swapped, as hard negatives for the prompt-contrast term.

A prompt-contrast term that scores each image after *another image's* prompt teaches the model
to read what tells random prompts apart (colours, shapes, counts), but not relations, sizes or
which colour goes with which shape: a random other prompt almost always differs in its nouns
too. A counterfactual prompt differs in exactly one thing. It is made from the caption with
interchangeable words, given as groups, e.g. `[left, right]`, `[small, large, big]`,
`[circle, square, triangle, star]`:

- a group applies to a caption when one of its words occurs in it; one applicable group is drawn
  uniformly;
- when two or more different words of that group occur, two of them trade places (binding:
  "a red circle left of a blue square" -> "a red square left of a blue circle");
- when one occurs, every occurrence is replaced by another word of the group ("left" -> "right").

Words are matched as substrings, longest first, so "circle" also turns "circles" into "squares",
and groups must not share words. Substring matching works for Chinese, which has no spaces, but
it is the caller's job to choose words that do not occur inside other words (for counts write
"三个", not "三", which also starts "三角形").

Not every swap changes the meaning: in "a red circle and a red square" exchanging the shapes says
the same thing. A list of groups is a property of the data; in MARS-Shapes such cases are a few
percent of the two-object captions (docs/shapes-demo-experiments.md measures what the term gives
anyway).
"""

from __future__ import annotations

import re

import numpy as np

from mars.errors import MarsError


def check_swap_groups(groups) -> list[list[str]]:
    """Validate word groups (each >= 2 distinct non-empty words, no word in two groups)."""
    if not isinstance(groups, (list, tuple)):
        raise MarsError(f"swap groups must be a list of word lists, got {type(groups).__name__}")
    seen: set[str] = set()
    result = []
    for group in groups:
        if (not isinstance(group, (list, tuple)) or len(group) < 2
                or not all(isinstance(w, str) and w for w in group)):
            raise MarsError(f"each swap group must be a list of at least 2 non-empty words, got {group!r}")
        if len(set(group)) != len(group) or seen & set(group):
            raise MarsError(f"swap group {list(group)} repeats a word (within it or from another group)")
        seen |= set(group)
        result.append(list(group))
    return result


def _pattern(words) -> re.Pattern:
    return re.compile("|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)))


def swap_words(text: str, groups: list[list[str]], rng: np.random.Generator) -> str | None:
    """`text` with one group's words exchanged or replaced (module docstring), or None when no group applies."""
    present = []  # per applicable group: its words found in the text, in order of first occurrence
    for group in groups:
        found = list(dict.fromkeys(m.group() for m in _pattern(group).finditer(text)))
        if found:
            present.append((group, found))
    if not present:
        return None
    group, found = present[int(rng.integers(len(present)))]
    if len(found) >= 2:
        a, b = (found[i] for i in rng.choice(len(found), size=2, replace=False))
        mapping = {a: b, b: a}
    else:
        others = [w for w in group if w != found[0]]
        mapping = {found[0]: others[int(rng.integers(len(others)))]}
    return _pattern(mapping).sub(lambda m: mapping[m.group()], text)


def matches_any(text: str | None, groups: list[list[str]]) -> bool:
    """Whether a swap group applies to `text` (`swap_words` would return a counterfactual)."""
    return bool(text) and _pattern([w for group in groups for w in group]).search(text) is not None


def oversampled_epoch(captions, groups: list[list[str]], repeat: int) -> np.ndarray:
    """The dataset indices one epoch covers when samples with a swappable caption count `repeat` times.

    `captions[i]` is sample i's (English, Chinese) caption pair (either may be None); a sample is
    swappable when a group applies to either. Returns every index once, then each swappable index
    `repeat - 1` times more, in index order (the sampler permutes it per epoch).
    """
    if repeat < 1:
        raise MarsError(f"repeat must be >= 1, got {repeat}")
    swappable = [i for i, pair in enumerate(captions) if any(matches_any(t, groups) for t in pair)]
    extra = np.repeat(np.asarray(swappable, dtype=np.int64), repeat - 1)
    return np.concatenate([np.arange(len(captions), dtype=np.int64), extra])
