"""Preference pairs by self-judging: each prompt's best and worst of N of the model's own images.

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

Layout of DIR: `preferences.json` (the settings; a rerun must match them) and `pairs-NNNNN.safetensors`,
one part per `part_size` prompts, each written whole (temporary file, then rename): a rerun skips the
parts that exist, so an interrupted run resumes. A part holds `chosen` and `rejected` (P, h, w) int32
codes, `scores` (P, N) float32 (every candidate's score, nats) and the prompts in its metadata.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file
from tqdm import tqdm

from mars.data.captions import shapes_example
from mars.data.datasets import parse_shapes_spec
from mars.errors import MarsError
from mars.eval.io import write_json_atomic
from mars.rerank import candidate_scores, check_fits

SETTINGS_FILE = "preferences.json"
PART_PATTERN = "pairs-{:05d}.safetensors"


def shapes_prompts(spec: str) -> list[str]:
    """Captions of a `shapes:N:SEED` training stream: scene i's English caption for even i, its
    Chinese caption for odd i (both languages, no scene twice)."""
    n, seed = parse_shapes_spec(spec)
    return [shapes_example(seed, i, "train")[1 + i % 2] for i in range(n)]


def make_preferences(pipeline, prompts: list[str], out_dir: str | Path, candidates: int = 8, seed: int = 0,
                     part_size: int = 64, batch_size: int = 32, drawing_weight: float | None = None,
                     progress: bool = True) -> Path:
    """Write the preference pairs of `prompts` under `out_dir` (layout in the module docstring).

    Prompt i draws its candidates with seed `seed + i` (`MarsPipeline.draw_candidates`), so parts
    do not depend on `part_size` or on which run made them. `drawing_weight` None = the model's
    rerank setting. Returns `out_dir`.
    """
    if candidates < 2:
        raise MarsError(f"--candidates must be >= 2 to make a pair, got {candidates}")
    if part_size < 1:
        raise MarsError(f"part_size must be >= 1, got {part_size}")
    weight = pipeline.rerank_settings(drawing_weight).drawing_weight
    grid = pipeline.model.config.image_grid
    check_fits(pipeline.model, pipeline.tokenizer, prompts, grid * grid)
    settings = {"candidates": candidates, "seed": seed, "part_size": part_size, "drawing_weight": weight,
                "num_prompts": len(prompts), "sampling": pipeline.sampling_settings(),
                "vq_codes_hash": pipeline.vq.codes_hash(), "text_tokenizer": pipeline.tokenizer.identity(),
                "image_grid": grid}
    out = Path(out_dir)
    _check_or_write_settings(out, settings)
    starts = range(0, len(prompts), part_size)
    bar = tqdm(total=len(prompts), desc="prompts", unit="prompt", disable=not progress, dynamic_ncols=True)
    for part, start in enumerate(starts):
        path = out / PART_PATTERN.format(part)
        chunk = prompts[start : start + part_size]
        if not path.is_file():
            codes = pipeline.draw_candidates(chunk, candidates, seed=seed + start, batch_size=batch_size)
            scores = candidate_scores(pipeline.model, pipeline.tokenizer, chunk, codes, candidates, weight)  # (P, N)
            _write_part(path, chunk, codes.view(len(chunk), candidates, grid, grid), scores)
        bar.update(len(chunk))
    bar.close()
    return out


def _check_or_write_settings(out: Path, settings: dict) -> None:
    """Write DIR/preferences.json, or check that an earlier run's matches (a resumed run must agree)."""
    file = out / SETTINGS_FILE
    if file.is_file():
        earlier = json.loads(file.read_text())
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
