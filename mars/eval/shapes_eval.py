"""The MARS-Shapes benchmark: canonical prompts of every category, generated and checked.

For each category of SHAPES_SPEC (single, two, counting, position, size, novel), `n` canonical
prompts are drawn from a seeded stream of evaluation scenes; the English and Chinese prompt of
index i describe the same scene and get the same generator seed, so the two languages are
compared on identical requests. Every image is saved and judged by the spec's checker
(`mars.data.checker.check_prompt`); the score of a category is the fraction of correct images and
the overall score the mean of the categories (GenEval style), per language. A run may be limited
to some categories (`categories`): their prompts and seeds are those a whole run (same `n` and
seed) gives them, and no overall score is given.

Layout of the output folder:

    DIR/images/{lang}/{category}/{i:04d}.png
    DIR/settings.json        generation settings (a resumed run must use the same)
    DIR/results.json         summary, partial-credit diagnostics, and every image's verdict
                             (prompt, file, correct, reason, detected)

The diagnostics say how far a model is from passing when it does not: per language, the fraction
of images with as many objects as asked, with every asked colour among the detected objects, and
with every asked object (colour and shape, as often as asked) among them, extra objects allowed;
plus the median number of objects per image. For `position` they also say which half of a relation
a model gets: of the position images where each named object is found exactly once, the fraction
with the pair on the asked axis (side by side or stacked), and of those, the fraction in the asked
order (which object is left or on top); placing the pair at random scores about 0.5 on both.
"""

from __future__ import annotations

import random
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from mars.data.captions import LANGS, canonical_prompts, parse_canonical
from mars.data.checker import check_prompt
from mars.data.shapes import EVAL_CATEGORIES, RELATIONS
from mars.errors import MarsError
from mars.eval.io import format_table, write_json_atomic
from mars.eval.runner import WHOLE, GenerateFn, ImageJob, Shard, run_image_jobs

RESULTS_FILE = "results.json"


@dataclass(frozen=True)
class ShapesItem:
    """One evaluation image: its prompt, where it is saved (relative to DIR) and its seed."""

    lang: str
    category: str
    index: int
    prompt: str
    file: str
    seed: int


def shapes_items(n_per_category: int, seed: int = 0, langs: tuple[str, ...] = LANGS,
                 categories: tuple[str, ...] = EVAL_CATEGORIES) -> list[ShapesItem]:
    """The benchmark's prompts: `n_per_category` per category and language, fixed by `seed`.

    `categories` keeps only those categories' items, each with the prompt and seed it has in the
    whole run of the same `n_per_category` and `seed`, so a run on some categories measures exactly
    what the whole one would there.
    """
    if n_per_category < 1:
        raise MarsError(f"--n-per-category must be >= 1, got {n_per_category}")
    for lang in langs:
        if lang not in LANGS:
            raise MarsError(f"unknown language {lang!r}; choose from {', '.join(LANGS)}")
    check_categories(categories)
    items = []
    for c, category in enumerate(EVAL_CATEGORIES):
        if category not in categories:
            continue
        for lang in langs:
            # one stream per (seed, category), the same for every language: paired prompts
            rng = random.Random(f"mars-eval-shapes/{seed}/{category}")
            for i, prompt in enumerate(canonical_prompts(category, lang, rng, n_per_category)):
                items.append(ShapesItem(lang, category, i, prompt, f"images/{lang}/{category}/{i:04d}.png",
                                        seed=seed + c * n_per_category + i))
    return items


def check_categories(categories: tuple[str, ...]) -> None:
    """Refuse an empty, repeated or unknown category (the benchmark's are EVAL_CATEGORIES)."""
    unknown = [c for c in categories if c not in EVAL_CATEGORIES]
    if unknown:
        raise MarsError(f"unknown category {unknown[0]!r}; choose from {', '.join(EVAL_CATEGORIES)}")
    if not categories:
        raise MarsError(f"no category given; choose from {', '.join(EVAL_CATEGORIES)}")
    if len(set(categories)) != len(categories):
        raise MarsError(f"a category is named twice in {', '.join(categories)}")


def score_items(out_dir: str | Path, items: list[ShapesItem]) -> dict:
    """Judge every saved image -> {"summary": {lang: {category: acc, "overall": mean}}, "images": [...]}.

    "overall" (the mean of the categories) is there only when the items cover every category."""
    out_dir = Path(out_dir)
    records = []
    for item in tqdm(items, desc="check", unit="img"):
        with Image.open(out_dir / item.file) as img:
            verdict = check_prompt(img, item.prompt)
        records.append({"lang": item.lang, "category": item.category, "index": item.index,
                        "prompt": item.prompt, "file": item.file, "seed": item.seed,
                        "correct": verdict.correct, "reason": verdict.reason,
                        "detected": [asdict(o) for o in verdict.detected]})
    summary: dict[str, dict[str, float]] = {}
    categories = [c for c in EVAL_CATEGORIES if any(r["category"] == c for r in records)]
    for lang in dict.fromkeys(r["lang"] for r in records):
        per_category = {}
        for category in categories:
            marks = [r["correct"] for r in records if r["lang"] == lang and r["category"] == category]
            per_category[category] = sum(marks) / len(marks)
        if len(categories) == len(EVAL_CATEGORIES):
            per_category["overall"] = sum(per_category.values()) / len(EVAL_CATEGORIES)
        summary[lang] = per_category
    return {"summary": summary, "diagnostics": diagnostics(records), "images": records}


def diagnostics(records: list[dict]) -> dict[str, dict[str, float | None]]:
    """Partial credit per language: {"right_count", "colours_present", "objects_present": fractions
    of images; "median_objects"; the position_* fractions of `position_diagnostics`}. An image passes
    only with all of these and more (exact multiset, relations), so these move first while a model learns."""
    out = {}
    for lang in dict.fromkeys(r["lang"] for r in records):
        rows = [r for r in records if r["lang"] == lang]
        right_count = colours = objects = 0
        for r in rows:
            wanted = parse_canonical(r["prompt"]).objects
            seen = Counter((o["colour"], o["shape"]) for o in r["detected"])
            right_count += len(r["detected"]) == len(wanted)
            colours += {c for c, _ in wanted} <= {c for c, _ in seen}
            objects += not (Counter(wanted) - seen)  # every asked object, extras allowed
        out[lang] = {"right_count": right_count / len(rows), "colours_present": colours / len(rows),
                     "objects_present": objects / len(rows),
                     "median_objects": float(statistics.median(len(r["detected"]) for r in rows)),
                     **position_diagnostics([r for r in rows if r["category"] == "position"])}
    return out


def drawn_pair(named: tuple, detected: list[dict]) -> tuple[dict, dict] | None:
    """The detected objects of the named (colour, shape) pairs A and B, when each is found exactly once."""
    found = []
    for pair in named:
        matches = [o for o in detected if (o["colour"], o["shape"]) == pair]
        if len(matches) != 1:
            return None
        found.append(matches[0])
    return found[0], found[1]


def position_diagnostics(records: list[dict]) -> dict[str, float | None]:
    """{"position_pairs": fraction of position images with each named object exactly once;
    "position_axis": of those, the fraction whose larger centre offset lies on the asked axis;
    "position_order": of those on the asked axis, the fraction in the asked order}. None where the
    fraction has no images to count."""
    pairs = on_axis = in_order = 0
    for record in records:
        asked = parse_canonical(record["prompt"])
        drawn = drawn_pair(asked.objects, record["detected"])
        if drawn is None:
            continue
        a, b = drawn
        axis, sign = RELATIONS[asked.relation]
        offset = (b["cx"] - a["cx"], b["cy"] - a["cy"])  # d = centre(B) - centre(A), as in the spec
        pairs += 1
        if abs(offset[axis]) > abs(offset[1 - axis]):
            on_axis += 1
            in_order += sign * offset[axis] > 0
    return {"position_pairs": pairs / len(records) if records else None,
            "position_axis": on_axis / pairs if pairs else None,
            "position_order": in_order / on_axis if on_axis else None}


def diagnostics_table(diagnostics_by_lang: dict[str, dict[str, float | None]]) -> str:
    """Diagnostics as rows, languages as columns."""
    langs = list(diagnostics_by_lang)
    names = ("right_count", "colours_present", "objects_present", "median_objects",
             "position_pairs", "position_axis", "position_order")
    return format_table(["diagnostic", *langs],
                        [[n] + [_cell(diagnostics_by_lang[lang][n]) for lang in langs] for n in names])


def _cell(value: float | None) -> float | str:
    return "-" if value is None else value


def summary_table(summary: dict[str, dict[str, float]]) -> str:
    """Categories as rows (those measured, then overall if there), languages as columns."""
    langs = list(summary)
    rows = [[category] + [summary[lang][category] for lang in langs] for category in summary[langs[0]]]
    return format_table(["category", *langs], rows)


def run_shapes_eval(generate: GenerateFn | None, out_dir: str | Path, n_per_category: int = 50,
                    seed: int = 0, langs: tuple[str, ...] = LANGS, batch_size: int = 8,
                    shard: Shard = WHOLE, settings: dict | None = None,
                    categories: tuple[str, ...] = EVAL_CATEGORIES) -> dict | None:
    """Generate the missing images of this shard, then score the whole benchmark (or `categories`).

    Returns the results (also written to DIR/results.json), or None while images of other
    shards are still missing. `generate` may be None to only (re-)score images on disk.
    """
    out_dir = Path(out_dir)
    items = shapes_items(n_per_category, seed, langs, categories)
    if generate is not None:
        jobs = [ImageJob(out_dir / it.file, it.prompt, it.seed) for it in items]
        run_image_jobs(generate, jobs, out_dir, shard, batch_size, desc="shapes")
    missing = [it.file for it in items if not (out_dir / it.file).is_file()]
    if missing:
        print(f"{len(missing)} of {len(items)} images are not there yet (first: {missing[0]}); "
              "score once every shard is done")
        return None
    results = {"settings": settings or {}, "n_per_category": n_per_category, "seed": seed,
               "categories": list(categories), **score_items(out_dir, items)}
    write_json_atomic(out_dir / RESULTS_FILE, results)
    return results
