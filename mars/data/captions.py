"""Captions of the MARS-Shapes world in English and Chinese.

- `canonical_caption`: the evaluation grammar of SHAPES_SPEC, exactly.
- `caption_scene`: training captions, canonical for a set fraction, otherwise paraphrases
  (framing sentences, counts as digits, other object orders, inverted relations, 2 sentences).
  Every paraphrase names each object exactly once with its count, colour and shape, which is
  what `caption_objects` reads back.
- `parse_canonical`: canonical prompt -> what an image must show (used to score generations).
- `caption_objects`: any caption -> multiset of (colour, shape) (used to score captioning).
- `canonical_prompts`: evaluation prompts per category.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

from mars.data.shapes import (
    COLOURS, COLOURS_ZH, EVAL_CATEGORIES, INVERSE_RELATION, SHAPE_PLURALS, SHAPES, SHAPES_ZH,
    HELD_OUT, Scene, relation_in_reading_order, sample_scene, scene_for_index,
)
from mars.errors import MarsError

LANGS = ("en", "zh")
COUNT_WORDS_EN = {1: "one", 2: "two", 3: "three", 4: "four"}
COUNT_WORDS_ZH = {1: "一", 2: "两", 3: "三", 4: "四"}
RELATION_EN = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
RELATION_ZH = {"left of": "左边", "right of": "右边", "above": "上方", "below": "下方"}
# Paraphrase-only synonyms (the canonical forms keep the spec's words).
RELATION_ZH_ALT = {"left of": "左侧", "right of": "右侧", "above": "上面", "below": "下面"}


def article(colour: str) -> str:
    """English indefinite article before a colour word ("an orange ...")."""
    return "an" if colour[0] in "aeiou" else "a"


# --------------------------------------------------------------------------- canonical forms

def _a_en(colour: str, shape: str, adjective: str = "") -> str:
    words = [adjective, colour, shape] if adjective else [colour, shape]
    return f"{article(words[0])} {' '.join(words)}"


def _a_zh(colour: str, shape: str) -> str:
    return f"一个{COLOURS_ZH[colour]}的{SHAPES_ZH[shape]}"


def canonical_caption(scene: Scene, lang: str = "en") -> str:
    """The spec's canonical prompt for a scene, in `lang` ("en" or "zh")."""
    pairs = scene.pairs()
    cat = scene.category
    if lang == "en":
        if cat in ("single", "novel"):
            return _a_en(*pairs[0])
        if cat == "two":
            return f"{_a_en(*pairs[0])} and {_a_en(*pairs[1])}"
        if cat == "counting":
            c, s = pairs[0]
            return f"{COUNT_WORDS_EN[len(pairs)]} {c} {SHAPE_PLURALS[s]}"
        if cat == "position":
            return _position_caption(pairs[0], pairs[1], scene.relation, lang)
        if cat == "size":
            return f"{_a_en(*pairs[0], 'small')} and {_a_en(*pairs[1], 'large')}"
    elif lang == "zh":
        if cat in ("single", "novel"):
            return _a_zh(*pairs[0])
        if cat == "two":
            return f"{_a_zh(*pairs[0])}和{_a_zh(*pairs[1])}"
        if cat == "counting":
            c, s = pairs[0]
            return f"{COUNT_WORDS_ZH[len(pairs)]}个{COLOURS_ZH[c]}的{SHAPES_ZH[s]}"
        if cat == "position":
            return _position_caption(pairs[0], pairs[1], scene.relation, lang)
        if cat == "size":
            (c1, s1), (c2, s2) = pairs
            return f"一个小的{COLOURS_ZH[c1]}{SHAPES_ZH[s1]}和一个大的{COLOURS_ZH[c2]}{SHAPES_ZH[s2]}"
    raise ValueError(f"no canonical caption for category {cat!r} in language {lang!r}")


def _position_caption(a: tuple[str, str], b: tuple[str, str], relation: str, lang: str) -> str:
    """The canonical "A <relation> B" of either language."""
    if lang == "en":
        return f"{_a_en(*a)} {RELATION_EN[relation]} {_a_en(*b)}"
    return f"{_a_zh(*a)}在{_a_zh(*b)}的{RELATION_ZH[relation]}"


# --------------------------------------------------------------------------- paraphrases

def _phrase_en(rng: random.Random, colour: str, shape: str, n: int = 1, adjective: str = "") -> str:
    """'a red circle', 'one red circle', 'three red circles', '3 red circles'."""
    words = " ".join(w for w in (adjective, colour, SHAPE_PLURALS[shape] if n > 1 else shape) if w)
    if n == 1:
        count = rng.choice([article(words), article(words), "one"])
    else:
        count = rng.choice([COUNT_WORDS_EN[n], str(n)])
    return f"{count} {words}"


def _phrase_zh(rng: random.Random, colour: str, shape: str, n: int = 1, adjective: str = "") -> str:
    """'一个红色的圆形', '三个红色圆形', '3个红色的圆形', '一个小的红色圆形'."""
    count = rng.choice([COUNT_WORDS_ZH[n], str(n)]) if n > 1 else "一"
    de = rng.choice(["的", ""])
    adj = f"{adjective}的" if adjective else ""
    return f"{count}个{adj}{COLOURS_ZH[colour]}{de}{SHAPES_ZH[shape]}"


def _join(items: list[str], lang: str, rng: random.Random) -> str:
    if lang == "zh":
        return items[0] if len(items) == 1 else "、".join(items[:-1]) + rng.choice(["和", "，还有"]) + items[-1]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _object_phrases(scene: Scene, lang: str, rng: random.Random) -> list[str]:
    """One phrase per distinct object (counting scenes collapse to one counted phrase)."""
    phrase = _phrase_en if lang == "en" else _phrase_zh
    if scene.category == "counting":
        c, s = scene.objects[0].colour, scene.objects[0].shape
        return [phrase(rng, c, s, len(scene.objects))]
    if scene.category == "size":  # objects are (small, large)
        adjectives = ["small", rng.choice(["large", "big"])] if lang == "en" else ["小", "大"]
    else:
        adjectives = [""] * len(scene.objects)
    return [phrase(rng, o.colour, o.shape, 1, adj) for o, adj in zip(scene.objects, adjectives)]


_FRAMES_EN = ["{x}", "a picture of {x}", "an image of {x}", "{x} on a white background",
              "a simple drawing of {x}", "{there} {x}", "{there} {x} in the picture"]
_FRAMES_ZH = ["{x}", "图中有{x}", "这张图片里有{x}", "白色背景上有{x}", "一幅简单的画，画着{x}", "画面中是{x}"]
_SECOND_SENTENCE_EN = ["The background is white.", "Nothing else is in the picture.", "The shapes are flat."]
_SECOND_SENTENCE_ZH = ["背景是白色的。", "画面中没有别的东西。", "图形都是平涂的。"]


def _relation_sentence(scene: Scene, lang: str, rng: random.Random, phrases: list[str],
                       reading_order: bool = False) -> str:
    """'A is to the left of B' or, inverted, 'B is to the right of A' (never inverted in reading order)."""
    a, b = phrases
    relation = scene.relation
    if rng.random() < 0.5 and not reading_order:
        a, b, relation = b, a, INVERSE_RELATION[relation]
    if lang == "en":
        verb = rng.choice(["is", "sits", "appears"])
        return f"{a} {verb} {RELATION_EN[relation]} {b}"
    word = rng.choice([RELATION_ZH[relation], RELATION_ZH_ALT[relation]])
    return f"{a}{rng.choice(['在', '位于'])}{b}的{word}"


def paraphrase(scene: Scene, lang: str, rng: random.Random, reading_order: bool = False) -> str:
    """A free-form caption of the scene that names every object once (count, colour, shape).

    `reading_order`: a relation is stated as the scene states it (see `caption_scene`)."""
    phrases = _object_phrases(scene, lang, rng)
    if scene.category not in ("counting", "position") and len(phrases) > 1 and rng.random() < 0.5:
        phrases = phrases[::-1]  # "a large B and a small A" says the same
    if scene.category == "position" and rng.random() < 0.7:
        body = _relation_sentence(scene, lang, rng, phrases, reading_order)
        frame = "{x}"
    else:
        body = _join(phrases, lang, rng)
        frame = rng.choice(_FRAMES_EN if lang == "en" else _FRAMES_ZH)
    if lang == "en":
        # "there is a red circle and a blue square", but "there are three red circles"
        text = frame.format(x=body, there="there are" if scene.category == "counting" else "there is")
        text = text[0].upper() + text[1:] + "."
        if rng.random() < 0.25:
            text += " " + rng.choice(_SECOND_SENTENCE_EN)
        return text
    text = frame.format(x=body) + "。"
    if rng.random() < 0.25:
        text += rng.choice(_SECOND_SENTENCE_ZH)
    return text


def caption_scene(scene: Scene, rng: random.Random, lang: str = "en", canonical_fraction: float = 0.5,
                  reading_order: bool = False) -> str:
    """A training caption: canonical with probability `canonical_fraction`, else a paraphrase.

    The spec asks for >= 30% canonical captions; the default gives 50%. With `reading_order` a
    relation always names first the object met first in reading order ("A left of B", "A above B";
    `Scene.in_reading_order`), so the order in which a caption names a position pair is the order
    in which a raster-order model draws it (pair with `reading_order_prompt` at generation).
    """
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {LANGS}, not {lang!r}")
    if reading_order:
        scene = scene.in_reading_order()
    if rng.random() < canonical_fraction:
        return canonical_caption(scene, lang)
    return paraphrase(scene, lang, rng, reading_order)


# --------------------------------------------------------------------------- parsing

@dataclass(frozen=True)
class ParsedPrompt:
    """What a canonical prompt asks for.

    objects follows Scene's order: for position (A, B) with "A <relation> B"; for size
    (small, large); for counting n copies of one pair.
    """

    category: str
    objects: tuple[tuple[str, str], ...]
    relation: str | None = None
    lang: str = "en"


def _alt(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_C_EN, _S_EN = _alt(COLOURS), _alt(SHAPES)
_SP_EN = _alt(SHAPE_PLURALS.values())
_C_ZH, _S_ZH = _alt(COLOURS_ZH.values()), _alt(SHAPES_ZH.values())
_OBJ_EN = rf"an? ({_C_EN}) ({_S_EN})"
_OBJ_ZH = rf"一个({_C_ZH})的({_S_ZH})"
_REL_EN = _alt(RELATION_EN.values())
_REL_ZH = _alt(RELATION_ZH.values())
_COLOUR_FROM_ZH = {v: k for k, v in COLOURS_ZH.items()}
_SHAPE_FROM_ZH = {v: k for k, v in SHAPES_ZH.items()}
_SHAPE_FROM_PLURAL = {v: k for k, v in SHAPE_PLURALS.items()}
_COUNT_FROM_WORD = {**{v: k for k, v in COUNT_WORDS_EN.items()}, **{v: k for k, v in COUNT_WORDS_ZH.items()},
                    "二": 2, "a": 1, "an": 1}
_RELATION_FROM_TEXT = {**{v: k for k, v in RELATION_EN.items()}, **{v: k for k, v in RELATION_ZH.items()}}

_CANONICAL = [
    ("en", "single", re.compile(rf"{_OBJ_EN}")),
    ("en", "two", re.compile(rf"{_OBJ_EN} and {_OBJ_EN}")),
    ("en", "counting", re.compile(rf"(two|three|four) ({_C_EN}) ({_SP_EN})")),
    ("en", "position", re.compile(rf"{_OBJ_EN} ({_REL_EN}) {_OBJ_EN}")),
    ("en", "size", re.compile(rf"a small ({_C_EN}) ({_S_EN}) and a large ({_C_EN}) ({_S_EN})")),
    ("zh", "single", re.compile(rf"{_OBJ_ZH}")),
    ("zh", "two", re.compile(rf"{_OBJ_ZH}和{_OBJ_ZH}")),
    ("zh", "counting", re.compile(rf"(两|三|四)个({_C_ZH})的({_S_ZH})")),
    ("zh", "position", re.compile(rf"{_OBJ_ZH}在{_OBJ_ZH}的({_REL_ZH})")),
    ("zh", "size", re.compile(rf"一个小的({_C_ZH})({_S_ZH})和一个大的({_C_ZH})({_S_ZH})")),
]


def _to_pair(colour: str, shape: str) -> tuple[str, str]:
    """Colour and shape words of either language -> English names."""
    return _COLOUR_FROM_ZH.get(colour, colour), _SHAPE_FROM_ZH.get(shape, _SHAPE_FROM_PLURAL.get(shape, shape))


def parse_canonical(prompt: str) -> ParsedPrompt:
    """Parse a canonical prompt (SHAPES_SPEC table) of either language.

    Surrounding whitespace, a final period and English capitalisation are tolerated; anything
    else that is not the grammar raises MarsError. A single held-out pair is category `novel`.
    """
    text = prompt.strip().rstrip(".。").strip()
    lowered = text.lower()
    for lang, category, pattern in _CANONICAL:
        m = pattern.fullmatch(lowered if lang == "en" else text)
        if not m:
            continue
        g = m.groups()
        if category == "single":
            pair = _to_pair(*g)
            return ParsedPrompt("novel" if pair in HELD_OUT else "single", (pair,), None, lang)
        if category in ("two", "size"):
            objects = (_to_pair(g[0], g[1]), _to_pair(g[2], g[3]))
            return ParsedPrompt(category, objects, None, lang)
        if category == "counting":
            return ParsedPrompt(category, (_to_pair(g[1], g[2]),) * _COUNT_FROM_WORD[g[0]], None, lang)
        # position: English "A rel B", Chinese "A 在 B 的 rel"
        if lang == "en":
            a, rel_text, b = g[0:2], g[2], g[3:5]
        else:
            a, b, rel_text = g[0:2], g[2:4], g[4]
        return ParsedPrompt(category, (_to_pair(*a), _to_pair(*b)), _RELATION_FROM_TEXT[rel_text], lang)
    raise MarsError(f"not a canonical MARS-Shapes prompt: {prompt!r}")


_ANY_EN = re.compile(
    rf"\b(?:(an?|one|two|three|four|\d+)\s+)?(?:(?:small|large|big|little|tiny)\s+)?"
    rf"({_C_EN})\s+({_alt(list(SHAPES) + list(SHAPE_PLURALS.values()))})\b")
_ANY_ZH = re.compile(
    rf"(?:(\d+|一|两|二|三|四)\s*个)?(?:较?[大小]的?)?({_C_ZH})的?({_S_ZH})")


def caption_objects(text: str) -> Counter:
    """The multiset of (colour, shape) that a caption (canonical or not, en or zh) names.

    Each mention "[count] [size] colour shape" adds `count` copies (1 when no count is written).
    """
    found: Counter = Counter()
    for pattern, source in ((_ANY_EN, text.lower()), (_ANY_ZH, text)):
        for count, colour, shape in pattern.findall(source):
            n = int(count) if count.isdigit() else _COUNT_FROM_WORD.get(count, 1)
            found[_to_pair(colour, shape)] += n
    return found


def canonical_prompts(category: str, lang: str, rng: random.Random, n: int = 1) -> list[str]:
    """`n` evaluation prompts of `category` (any of EVAL_CATEGORIES, `novel` included).

    The scene draw does not depend on `lang`, so two calls with equally seeded generators give
    the same prompts in English and Chinese, in the same order.
    """
    if category not in EVAL_CATEGORIES:
        raise MarsError(f"unknown category {category!r}; choose from {', '.join(EVAL_CATEGORIES)}")
    return [canonical_caption(sample_scene(rng, category, split="eval"), lang) for _ in range(n)]


def shapes_example(seed: int, index: int, split: str = "train",
                   reading_order: bool = False) -> tuple[Scene, str, str]:
    """Sample `index` of a seeded MARS-Shapes stream: (scene, English caption, Chinese caption).

    Training captions mix canonical forms and paraphrases; evaluation captions are canonical.
    `mars data shapes` and the `shapes:N[:SEED]` data source both use this, so they agree.
    `reading_order` states relations in reading order (`caption_scene`); the scene and image are
    the same either way.
    """
    scene = scene_for_index(seed, index, split)
    rng = random.Random(f"mars-shapes-caption/{split}/{seed}/{index}")
    fraction = 1.0 if split == "eval" else 0.5
    return (scene, caption_scene(scene, rng, "en", fraction, reading_order),
            caption_scene(scene, rng, "zh", fraction, reading_order))


# One object of a position caption, canonical or paraphrased ("a red circle", "One blue square",
# "一个红色的圆形", "1个蓝色正方形"; a size word allowed), and the relation phrases of either language.
_PHRASE_EN = rf"(?:an?|one|1) (?:(?:small|large|big) )?(?:{_C_EN}) (?:{_S_EN})"
_PHRASE_ZH = rf"[一1]个(?:[小大]的)?(?:{_C_ZH})的?(?:{_S_ZH})"
_RELATION_OF_EN = {phrase: relation for relation, phrase in RELATION_EN.items()}
_RELATION_OF_ZH = {word: relation for table in (RELATION_ZH, RELATION_ZH_ALT) for relation, word in table.items()}
_RELATION_SENTENCE_EN = re.compile(
    rf"(?P<a>{_PHRASE_EN}) (?P<verb>(?:is|sits|appears) )?(?P<relation>{_alt(_RELATION_OF_EN)}) "
    rf"(?P<b>{_PHRASE_EN})(?P<tail>\..*)?", re.IGNORECASE | re.DOTALL)
_RELATION_SENTENCE_ZH = re.compile(
    rf"(?P<a>{_PHRASE_ZH})(?P<verb>在|位于)(?P<b>{_PHRASE_ZH})的(?P<relation>{_alt(_RELATION_OF_ZH)})(?P<tail>。.*)?",
    re.DOTALL)


def reading_order_prompt(prompt: str) -> str:
    """A position prompt restated so that it names first the object met first in reading order
    ("a red circle to the right of a blue square" -> "a blue square to the left of a red circle";
    "One red circle sits below a blue square." -> "A blue square sits above one red circle."); the
    same picture satisfies both. It reads the relation sentences of `caption_scene`, canonical or
    paraphrased, in English and Chinese, keeping their words; any other prompt is returned unchanged.

    The prompt rewrite of a model trained on `reading_order` captions (generation_config.json
    `prompt_order: "reading"`).
    """
    text = prompt.strip()
    english = _RELATION_SENTENCE_EN.fullmatch(text)
    match = english or _RELATION_SENTENCE_ZH.fullmatch(text)
    if match is None:
        return prompt
    a, b, word = match["a"], match["b"], match["relation"]
    relation = _RELATION_OF_EN[word.lower()] if english else _RELATION_OF_ZH[word]
    (first, second), restated = relation_in_reading_order((a, b), relation)
    if restated == relation:
        return prompt  # already in reading order: as written
    tail = match["tail"] or ""
    if english:
        if a[0].isupper():  # the sentence's capital moves with its first word
            first, second = first[0].upper() + first[1:], second[0].lower() + second[1:]
        return f"{first} {match['verb'] or ''}{RELATION_EN[restated]} {second}{tail}"
    table = RELATION_ZH if word in RELATION_ZH.values() else RELATION_ZH_ALT
    return f"{first}{match['verb']}{second}的{table[restated]}{tail}"


def caption_pair(index: int, en: str, zh: str) -> str:
    """A stage-0 document: training scene `index`'s English and Chinese captions (`shapes_example`)
    on one line, English first for even indices, Chinese first for odd ones.

    Predicting the second caption needs the first one's content (colours, shapes, counts, sizes),
    so a language model trained on pairs carries that content in its hidden states. One trained on
    single captions does not: in MARS-Shapes a colour word helps to predict no later word, and such
    a model's states after its first layer hardly differ between "a red circle" and "a blue circle"
    (docs/shapes-demo-experiments.md), which leaves a frozen language expert with nothing for the
    visual expert to read.
    """
    return f"{en} {zh}" if index % 2 == 0 else f"{zh} {en}"
