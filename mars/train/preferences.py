"""Preference pairs: each prompt's best and worst of N of the model's own images, by a judge.

A MARS model reads some facts more reliably than it draws them (sizes, which colour goes with which
shape, how many objects there are: docs/shapes-demo.md), so keeping the best of N candidates by its
own judgement (`mars.rerank`) makes better images than one sample, at N times the work. A
preference stage folds that judgement into the model itself: for each training prompt,

1. draw N candidates with the model's own sampling settings (`MarsPipeline.draw_candidates`: the
   images `generate(prompt, rerank=N)` chooses among),
2. score them as best-of-N does (`mars.rerank.candidate_scores`: the prompt's likelihood as the
   image's caption, plus the model's `rerank` drawing weight times the codes' likelihood),
3. keep the best as `chosen` and the worst as `rejected`;

then a training stage with `tasks: {dpo: 1}` and `data.preferences: DIR` raises the likelihood of
the chosen image relative to the rejected one against a frozen copy of the starting model (direct
preference optimisation, Rafailov et al. 2023; `mars.train.losses.dpo_loss`). No second model and
no labels: the judge is the model's reading direction, the pairs are its own samples (on-policy).

    mars preferences --model mars/assets/shapes-demo --data shapes:2000:7 --candidates 8 --out runs/prefs

The second judge, `judge="checker"`, is a verifier instead of the model: SHAPES_SPEC's checker
(`mars.data.checker`, the detector the shapes benchmark scores with) reads each candidate's picture,
a candidate scores 1 when it shows its prompt and 0 when not, and the pair is the first right and
the first wrong candidate (the candidates are independent draws, so "first" is a random pick). It
judges what the model cannot read (which object is left of which), the way GenEval's detector
serves as a reward for text-to-image RL (Flow-GRPO, Liu et al. 2025). It needs canonical prompts:
`canonical:N:SEED` draws them from training scenes and leaves out every prompt the benchmark asks
(`mars eval shapes` at seeds 0 and 1, 50 per category), so a model trained on these pairs is still
scored on requests it was never rewarded for:

    mars preferences --judge checker --data canonical:1600:9 --categories position,position,size,two,counting \\
        --candidates 4 --out runs/prefs-checker

With `--mirror FACT` the checker also scores -1 a candidate that shows the prompt with that fact
made false (`mars.data.counterfactual_scenes.falsify_prompt`: the pair in the other order, the
colours exchanged, the sizes exchanged), so a pair with a score gap of 2 (`dpo_min_score_gap: 2`)
is a right image against one of the model's own that is wrong in that fact alone: on-policy, where
`--counterfactual` pairs are renders the model rarely draws. (A gap of 1 also keeps right against
otherwise wrong, and otherwise wrong against mirrored, where neither image shows the prompt.)

    mars preferences --judge checker --mirror relation --data canonical:1200:11 --categories position \\
        --candidates 4 --out runs/prefs-order

The third source needs no model images at all: `--counterfactual FACT` pairs a training scene's
render (chosen) with the render of the same scene with one stated fact made false (rejected;
`mars.data.counterfactual_scenes`: colours exchanged between the two objects, the pair mirrored
across the relation's axis, or the sizes exchanged). Such a pair differs in that fact alone, where a
pair of the model's own images usually also differs in how many objects it shows, which a stage on
checker-judged pairs learns first (docs/shapes-demo.md). The model is needed only for its VQ-GAN:

    mars preferences --counterfactual binding --data canonical:1600:4 --categories two,position,size \\
        --out runs/prefs-binding

Layout of DIR: `preferences.json` (the settings; a rerun must match them) and `pairs-NNNNN.safetensors`,
one part per `part_size` prompts, each written whole (temporary file, then rename): a rerun skips the
parts that exist, so an interrupted run resumes. A part holds `chosen` and `rejected` (P, h, w) int32
codes, `scores` (P, N) float32 (every candidate's score, nats) and the prompts in its metadata.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file
from tqdm import tqdm

from mars.data.captions import canonical_caption, parse_canonical, shapes_example
from mars.data.checker import check_detected, detect_objects
from mars.data.counterfactual_scenes import check_fact, falsify, falsify_prompt
from mars.data.datasets import parse_shapes_spec
from mars.data.shapes import TRAIN_CATEGORIES, Scene, render_scene, sample_scene
from mars.errors import MarsError
from mars.eval.io import write_json_atomic
from mars.eval.shapes_eval import shapes_items
from mars.rerank import candidate_scores, check_fits

SETTINGS_FILE = "preferences.json"
PART_PATTERN = "pairs-{:05d}.safetensors"
JUDGES = ("self", "checker")
BENCHMARK_SEEDS = (0, 1)  # `mars eval shapes`' default seed and the validation seed of docs/shapes-demo.md
BENCHMARK_PER_CATEGORY = 50  # the benchmark's default; a smaller run asks a prefix of these prompts


def shapes_prompts(spec: str) -> list[str]:
    """Captions of a `shapes:N:SEED` training stream: scene i's English caption for even i, its
    Chinese caption for odd i (both languages, no scene twice)."""
    n, seed = parse_shapes_spec(spec)
    return [shapes_example(seed, i, "train")[1 + i % 2] for i in range(n)]


def canonical_prompts_outside_benchmark(spec: str, categories: tuple[str, ...] = TRAIN_CATEGORIES) -> list[str]:
    """`canonical:N:SEED`: N canonical prompts (SHAPES_SPEC's evaluation grammar) of training scenes,
    `categories` in turn (a category named twice gets twice the prompts), each round of them in one
    language, English first, none of them a prompt `mars eval shapes` asks at BENCHMARK_SEEDS in either
    language (scenes that would be are skipped). Held-out colour-shape pairs never appear: they are
    `novel`, an evaluation category."""
    return [prompt for _, prompt in canonical_scenes_outside_benchmark(spec, categories)[0]]


def canonical_scenes_outside_benchmark(spec: str, categories: tuple[str, ...] = TRAIN_CATEGORIES,
                                       keep: Callable[[Scene], bool] | None = None
                                       ) -> tuple[list[tuple[Scene, str]], int]:
    """The scenes of `canonical_prompts_outside_benchmark(spec, categories)` with their prompts, and
    how many scenes `keep` (None: all) turned down, which are passed over like benchmark ones."""
    n, seed = parse_shapes_spec(spec, prefix="canonical")
    unknown = [c for c in categories if c not in TRAIN_CATEGORIES]
    if unknown or not categories:
        raise MarsError(f"--categories takes training categories ({', '.join(TRAIN_CATEGORIES)}), got "
                        f"{', '.join(categories) or 'none'}")
    asked = {item.prompt for s in BENCHMARK_SEEDS for item in shapes_items(BENCHMARK_PER_CATEGORY, s)}
    chosen, index, turned_down = [], 0, 0
    while len(chosen) < n:
        category = categories[len(chosen) % len(categories)]
        scene = sample_scene(random.Random(f"mars-preference-prompts/{seed}/{index}"), category, "train")
        index += 1
        captions = [canonical_caption(scene, lang) for lang in ("en", "zh")]
        if index > 1000 * n:
            raise MarsError(f"{spec}: fewer than {n} {category} prompts outside the benchmark; ask for fewer")
        if asked.intersection(captions):
            continue
        if keep is not None and not keep(scene):
            turned_down += 1
            continue
        chosen.append((scene, captions[len(chosen) // len(categories) % 2]))
    return chosen, turned_down


def make_preferences(pipeline, prompts: list[str], out_dir: str | Path, candidates: int = 8, seed: int = 0,
                     part_size: int = 64, batch_size: int = 32, drawing_weight: float | None = None,
                     judge: str = "self", mirror_fact: str | None = None, progress: bool = True) -> Path:
    """Write the preference pairs of `prompts` under `out_dir` (layout in the module docstring).

    Prompt i draws its candidates with seed `seed + i` (`MarsPipeline.draw_candidates`), so parts
    do not depend on `part_size` or on which run made them. `judge` "self" scores the candidates
    as `generate(rerank=N)` does (`drawing_weight` None = the model's rerank setting), "checker"
    by SHAPES_SPEC's checker (canonical prompts only; `mirror_fact`: see `checker_scores`). Returns
    `out_dir`.
    """
    if candidates < 2:
        raise MarsError(f"--candidates must be >= 2 to make a pair, got {candidates}")
    if judge not in JUDGES:
        raise MarsError(f"unknown judge {judge!r}; choose from {', '.join(JUDGES)}")
    if judge == "checker":
        _check_canonical(prompts)
        if mirror_fact is not None:
            check_fact(mirror_fact, tuple(sorted({parse_canonical(p).category for p in prompts})))
    elif mirror_fact is not None:
        raise MarsError("--mirror needs --judge checker: the model's own judge cannot tell a mirror image")
    # the pairs hold each prompt as the model reads it (`MarsPipeline.model_prompt`): a DPO stage then
    # trains on the words the model is given, and the checker judges a restated prompt as the original
    prompts = [pipeline.model_prompt(p) for p in prompts]
    weight = pipeline.rerank_settings(drawing_weight).drawing_weight if judge == "self" else None
    grid = pipeline.model.config.image_grid
    check_fits(pipeline.model, pipeline.tokenizer, prompts, grid * grid)
    settings = {"candidates": candidates, "seed": seed, "judge": judge, "drawing_weight": weight,
                "mirror_fact": mirror_fact, "sampling": pipeline.sampling_settings()}
    settings |= pipeline.prompt_order_settings()

    def judged_part(start: int, chunk: list[str]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        codes = pipeline.draw_candidates(chunk, candidates, seed=seed + start, batch_size=batch_size)
        if judge == "self":
            scores = candidate_scores(pipeline.model, pipeline.tokenizer, chunk, codes, candidates, weight)
        else:
            scores = checker_scores(pipeline, chunk, codes, candidates, batch_size, mirror_fact)  # (P, N)
        return chunk, codes.view(len(chunk), candidates, grid, grid), scores

    return _write_parts(pipeline, out_dir, settings, prompts, part_size, judged_part, "prompts", progress)


def checker_scores(pipeline, prompts: list[str], codes: torch.Tensor, candidates: int,
                   batch_size: int = 32, mirror_fact: str | None = None) -> torch.Tensor:
    """(P, N) 1.0 where SHAPES_SPEC's checker finds candidate k of prompt i (codes (P * N, h, w), each
    prompt's candidates one after the other) showing prompt i, -1.0 where it shows prompt i with
    `mirror_fact` made false instead (None: never), else 0.0."""
    parsed = [parse_canonical(prompt) for prompt in prompts]
    mirrors = [falsify_prompt(p, mirror_fact) if mirror_fact else None for p in parsed]
    images = [image for start in range(0, len(codes), batch_size)
              for image in pipeline.decode_codes(codes[start : start + batch_size])]
    marks = []
    for k, image in enumerate(images):
        objects = detect_objects(image)
        mirror = mirrors[k // candidates]
        if check_detected(objects, parsed[k // candidates]).correct:
            marks.append(1.0)
        else:
            marks.append(-1.0 if mirror is not None and check_detected(objects, mirror).correct else 0.0)
    return torch.tensor(marks).view(len(prompts), candidates)


def make_counterfactual_preferences(pipeline, spec: str, categories: tuple[str, ...], fact: str,
                                   out_dir: str | Path, part_size: int = 64, progress: bool = True) -> tuple[Path, int]:
    """Write pairs that differ in one stated fact under `out_dir` (layout in the module docstring):
    for each scene of `canonical_scenes_outside_benchmark(spec, categories)` that `fact` can be made
    false in, `chosen` is its render's codes and `rejected` the codes of its counterfactual's render
    (`mars.data.counterfactual_scenes.falsify`), scores (1, 0). Returns `out_dir` and how many
    scenes were passed over because the fact could not be made false in them."""
    check_fact(fact, categories)
    scenes, passed_over = canonical_scenes_outside_benchmark(spec, categories,
                                                             keep=lambda scene: falsify(scene, fact) is not None)
    settings = {"judge": f"counterfactual:{fact}", "data": spec, "categories": list(categories), "candidates": 2}
    settings |= pipeline.prompt_order_settings()

    def rendered_part(start: int, chunk: list[tuple[Scene, str]]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        chosen = pipeline.encode_images([render_scene(scene) for scene, _ in chunk])  # (P, h, w)
        rejected = pipeline.encode_images([render_scene(falsify(scene, fact)) for scene, _ in chunk])
        scores = torch.tensor([[1.0, 0.0]]).expand(len(chunk), 2)
        return [pipeline.model_prompt(prompt) for _, prompt in chunk], torch.stack([chosen, rejected], 1), scores

    out = _write_parts(pipeline, out_dir, settings, scenes, part_size, rendered_part, "pairs", progress)
    return out, passed_over


def _write_parts(pipeline, out_dir: str | Path, settings: dict, items: list, part_size: int,
                 make_part: Callable, desc: str, progress: bool) -> Path:
    """Check or write DIR/preferences.json (`settings` plus what every folder records: the part size,
    how many prompts, the codes' VQ-GAN, text tokenizer and grid), then write each missing part:
    `make_part(start, items[start : start + part_size])` -> (prompts, codes (P, N, h, w), scores (P, N))."""
    if part_size < 1:
        raise MarsError(f"part_size must be >= 1, got {part_size}")
    settings = {**settings, "part_size": part_size, "num_prompts": len(items),
                "vq_codes_hash": pipeline.vq.codes_hash(), "text_tokenizer": pipeline.tokenizer.identity(),
                "image_grid": pipeline.model.config.image_grid}
    out = Path(out_dir)
    _check_or_write_settings(out, settings)
    bar = tqdm(total=len(items), desc=desc, unit=desc[:-1], disable=not progress, dynamic_ncols=True)
    for part, start in enumerate(range(0, len(items), part_size)):
        path = out / PART_PATTERN.format(part)
        chunk = items[start : start + part_size]
        if not path.is_file():
            _write_part(path, *make_part(start, chunk))
        bar.update(len(chunk))
    bar.close()
    return out


def _check_canonical(prompts: list[str]) -> None:
    """The checker judges SHAPES_SPEC's canonical prompts only: name the first that is not one."""
    for i, prompt in enumerate(prompts):
        try:
            parse_canonical(prompt)
        except MarsError as err:
            raise MarsError(f"the checker judges canonical prompts only (SHAPES_SPEC); prompt {i} is not one: "
                            f"{err}") from None


def _check_or_write_settings(out: Path, settings: dict) -> None:
    """Write DIR/preferences.json, or check that an earlier run's matches (a resumed run must agree)."""
    file = out / SETTINGS_FILE
    if file.is_file():
        earlier = {"judge": "self", **json.loads(file.read_text())}  # folders from before the checker judge
        differ = sorted(k for k in settings if earlier.get(k) != settings[k])
        if differ:
            raise MarsError(f"{out} holds preference pairs made with other settings ({', '.join(differ)} differ); "
                            "use another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(file, settings)


def _write_part(path: Path, prompts: list[str], codes: torch.Tensor, scores: torch.Tensor) -> None:
    """One part: each prompt's best and worst candidate (codes (P, N, h, w)) and every score (P, N)."""
    rows = torch.arange(len(prompts))
    tensors = {"chosen": codes[rows, scores.argmax(1).cpu()].to(torch.int32).cpu().contiguous(),
               "rejected": codes[rows, scores.argmin(1).cpu()].to(torch.int32).cpu().contiguous(),
               "scores": scores.float().cpu().contiguous()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"prompts": json.dumps(prompts, ensure_ascii=False)})
    os.replace(tmp, path)


@dataclass
class PreferencePair:
    prompt: str
    chosen: torch.Tensor  # (h, w) codes
    rejected: torch.Tensor  # (h, w) codes
    score_gap: float  # chosen's score - rejected's, nats


class PreferencePairs:
    """The pairs of a `mars preferences` folder whose score gap is at least `min_score_gap` nats.

    `settings` is its preferences.json; `dropped` counts the pairs left out for a smaller gap (a
    prompt whose candidates the judge finds about equally good says little about which is better).
    """

    def __init__(self, folder: str | Path, min_score_gap: float = 0.0):
        folder = Path(folder)
        if not (folder / SETTINGS_FILE).is_file():
            raise MarsError(f"{folder} is not a preference folder (no {SETTINGS_FILE}; make one with "
                            "`mars preferences`)")
        self.settings = json.loads((folder / SETTINGS_FILE).read_text())
        expected = -(-self.settings["num_prompts"] // self.settings["part_size"])
        parts = [folder / PART_PATTERN.format(i) for i in range(expected)]
        missing = [p.name for p in parts if not p.is_file()]
        if missing:
            raise MarsError(f"{folder} is incomplete: {len(missing)} of {expected} parts missing ({missing[0]} ...); "
                            "rerun the same `mars preferences` command to finish it")
        self.pairs: list[PreferencePair] = []
        self.dropped = 0
        for path in parts:
            with safe_open(path, "pt") as f:
                prompts = json.loads(f.metadata()["prompts"])
            tensors = load_file(path)
            gaps = (tensors["scores"].max(1).values - tensors["scores"].min(1).values).tolist()
            for prompt, chosen, rejected, gap in zip(prompts, tensors["chosen"], tensors["rejected"], gaps):
                if gap < min_score_gap:
                    self.dropped += 1
                    continue
                self.pairs.append(PreferencePair(prompt, chosen.long(), rejected.long(), gap))
        if not self.pairs:
            raise MarsError(f"no preference pair in {folder} has a score gap of at least {min_score_gap} nats "
                            f"({self.dropped} dropped)")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> PreferencePair:
        return self.pairs[i]
