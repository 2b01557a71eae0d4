"""Captioning accuracy on held-out MARS-Shapes scenes.

N scenes of the evaluation split (all categories, the held-out pairs of `novel` included) are
rendered and captioned in each language. A caption is correct when the multiset of
(colour, shape) it names (`caption_objects`) equals the picture's (SHAPES_SPEC "Captioning").

That rule ignores relations, so a `position` caption that names both objects is correct whatever
relation it states. A diagnostic beside the score says whether the model reads the relation: the
fraction of `position` scenes whose caption, in the canonical position grammar, states a relation
between the two objects that holds in the picture (by the spec's judging rule; either object may
come first).

    DIR/images/{i:05d}.png   the rendered scenes (to look at a failure)
    DIR/results.json         accuracy per language and category, and every caption
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from mars.data.captions import LANGS, caption_objects, parse_canonical
from mars.data.shapes import EVAL_CATEGORIES, Scene, relation_holds, render_scene, scene_for_index
from mars.errors import MarsError
from mars.eval.io import format_table, save_image_atomic, write_json_atomic

RESULTS_FILE = "results.json"
# (images, lang) -> one caption per image
CaptionFn = Callable[[list[Image.Image], str], list[str]]


def _pairs_text(counter: Counter) -> str:
    return ", ".join(f"{n} x {c} {s}" for (c, s), n in sorted(counter.items())) or "nothing"


def states_true_relation(caption: str, scene: Scene) -> bool:
    """Whether `caption` is a canonical position caption of `scene`'s two objects whose relation holds."""
    try:
        parsed = parse_canonical(caption)
    except MarsError:
        return False
    centres = {(o.colour, o.shape): (o.cx, o.cy) for o in scene.objects}
    if parsed.relation is None or len(centres) != 2 or set(parsed.objects) != set(centres):
        return False
    a, b = parsed.objects
    return relation_holds(centres[a], centres[b], parsed.relation)


def run_captions_eval(caption: CaptionFn, out_dir: str | Path, n: int = 100, seed: int = 0,
                      langs: tuple[str, ...] = LANGS, batch_size: int = 16, settings: dict | None = None) -> dict:
    """Render `n` eval scenes (fixed by `seed`), caption them per language, score and save
    (`settings`, how `caption` decodes, is recorded beside the scores).

    Returns {"n", "seed", "settings", "summary": {lang: {category: accuracy, "all"}},
    "relations": {lang: fraction of position scenes whose caption states a true relation},
    "captions": [every caption]}."""
    if n < 1:
        raise MarsError(f"--n must be >= 1, got {n}")
    out_dir = Path(out_dir)
    scenes = [scene_for_index(seed, i, split="eval") for i in range(n)]
    files = [f"images/{i:05d}.png" for i in range(n)]
    images = [render_scene(scene) for scene in scenes]
    for file, image in zip(files, images):
        save_image_atomic(image, out_dir / file)

    records = []
    with tqdm(total=n * len(langs), desc="caption", unit="img") as bar:
        for lang in langs:
            for start in range(0, n, batch_size):
                texts = caption(images[start:start + batch_size], lang)
                for i, text in enumerate(texts, start):
                    named, shown = caption_objects(text), Counter(scenes[i].pairs())
                    record = {"lang": lang, "index": i, "file": files[i], "category": scenes[i].category,
                              "caption": text, "correct": named == shown,
                              "named": _pairs_text(named), "shown": _pairs_text(shown)}
                    if scenes[i].category == "position":
                        record["true_relation"] = states_true_relation(text, scenes[i])
                    records.append(record)
                bar.update(len(texts))

    summary, relations = {}, {}
    for lang in langs:
        mine = [r for r in records if r["lang"] == lang]
        per_category = {}
        for category in EVAL_CATEGORIES:
            marks = [r["correct"] for r in mine if r["category"] == category]
            if marks:
                per_category[category] = sum(marks) / len(marks)
        per_category["all"] = sum(r["correct"] for r in mine) / len(mine)
        summary[lang] = per_category
        stated = [r["true_relation"] for r in mine if "true_relation" in r]
        if stated:
            relations[lang] = sum(stated) / len(stated)
    results = {"n": n, "seed": seed, "settings": settings or {}, "summary": summary, "relations": relations,
               "captions": records}
    write_json_atomic(out_dir / RESULTS_FILE, results)
    return results


def summary_table(summary: dict[str, dict[str, float]]) -> str:
    """Categories (those present) as rows, languages as columns; `all` = accuracy over all images."""
    langs = list(summary)
    rows = [[c] + [summary[lang].get(c, "-") for lang in langs]
            for c in (*EVAL_CATEGORIES, "all") if any(c in summary[lang] for lang in langs)]
    return format_table(["category", *langs], rows)


def relations_line(relations: dict[str, float]) -> str:
    """One line: per language, the fraction of position captions stating a relation that holds."""
    return ("position captions stating a relation that holds (not part of the score): "
            + ", ".join(f"{lang} {value:.2f}" for lang, value in relations.items()))
