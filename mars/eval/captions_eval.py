"""Captioning accuracy on held-out MARS-Shapes scenes.

N scenes of the evaluation split (all categories, the held-out pairs of `novel` included) are
rendered and captioned in each language. A caption is correct when the multiset of
(colour, shape) it names (`caption_objects`) equals the picture's (SHAPES_SPEC "Captioning").

    DIR/images/{i:05d}.png   the rendered scenes (to look at a failure)
    DIR/results.json         accuracy per language and category, and every caption
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from mars.data.captions import LANGS, caption_objects
from mars.data.shapes import EVAL_CATEGORIES, render_scene, scene_for_index
from mars.errors import MarsError
from mars.eval.io import format_table, save_image_atomic, write_json_atomic

RESULTS_FILE = "results.json"
# (images, lang) -> one caption per image
CaptionFn = Callable[[list[Image.Image], str], list[str]]


def _pairs_text(counter: Counter) -> str:
    return ", ".join(f"{n} x {c} {s}" for (c, s), n in sorted(counter.items())) or "nothing"


def run_captions_eval(caption: CaptionFn, out_dir: str | Path, n: int = 100, seed: int = 0,
                      langs: tuple[str, ...] = LANGS, batch_size: int = 16, settings: dict | None = None) -> dict:
    """Render `n` eval scenes (fixed by `seed`), caption them per language, score and save
    (`settings`, how `caption` decodes, is recorded beside the scores)."""
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
                    records.append({"lang": lang, "index": i, "file": files[i], "category": scenes[i].category,
                                    "caption": text, "correct": named == shown,
                                    "named": _pairs_text(named), "shown": _pairs_text(shown)})
                bar.update(len(texts))

    summary = {}
    for lang in langs:
        mine = [r for r in records if r["lang"] == lang]
        per_category = {}
        for category in EVAL_CATEGORIES:
            marks = [r["correct"] for r in mine if r["category"] == category]
            if marks:
                per_category[category] = sum(marks) / len(marks)
        per_category["all"] = sum(r["correct"] for r in mine) / len(mine)
        summary[lang] = per_category
    results = {"n": n, "seed": seed, "settings": settings or {}, "summary": summary, "captions": records}
    write_json_atomic(out_dir / RESULTS_FILE, results)
    return results


def summary_table(summary: dict[str, dict[str, float]]) -> str:
    """Categories (those present) as rows, languages as columns; `all` = accuracy over all images."""
    langs = list(summary)
    rows = [[c] + [summary[lang].get(c, "-") for lang in langs]
            for c in (*EVAL_CATEGORIES, "all") if any(c in summary[lang] for lang in langs)]
    return format_table(["category", *langs], rows)
