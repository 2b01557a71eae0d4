"""Generating the images of an evaluation: sharding, resuming, batching, atomic PNGs.

An evaluation is a list of `ImageJob`s (where the PNG goes, its prompt, its seed). The runner
keeps the jobs of its shard whose file does not exist yet, generates them in batches and writes
each PNG atomically. Because every image has its own seed (the pipeline gives each image its
own generator), a picture is the same whether it is made alone, in a batch, by another rank or
after a resume.

Sharding: with `--shard r/w`, or under `torchrun` (env RANK / WORLD_SIZE), rank r takes the jobs
i with i % w == r. Ranks share nothing but the output folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from mars.errors import MarsError
from mars.eval.io import PARTIAL_DIR, remove_partials, save_image_atomic, write_json_atomic

SETTINGS_FILE = "settings.json"

# (prompts, seeds) -> one image per prompt
GenerateFn = Callable[[list[str], list[int]], list[Image.Image]]


@dataclass(frozen=True)
class Shard:
    """This process's part of the work: job i belongs to it when i % world == rank."""

    rank: int = 0
    world: int = 1

    def owns(self, index: int) -> bool:
        return index % self.world == self.rank

    @property
    def tag(self) -> str:
        """Name of this writer in temporary file names."""
        return f"r{self.rank}"


WHOLE = Shard()  # a single process does everything


def resolve_shard(spec: str | None = None) -> Shard:
    """`--shard r/w` if given, else torchrun's RANK / WORLD_SIZE, else the whole job (0/1)."""
    if spec:
        try:
            rank, world = (int(x) for x in spec.split("/"))
        except ValueError:
            raise MarsError(f"--shard must look like r/w (e.g. 0/4), got {spec!r}") from None
        source = f"--shard {spec}"
    elif "WORLD_SIZE" in os.environ:
        try:
            rank, world = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
        except ValueError:
            raise MarsError(f"RANK / WORLD_SIZE must be integers, got {os.environ.get('RANK')!r} / "
                            f"{os.environ['WORLD_SIZE']!r}") from None
        source = f"RANK={rank} WORLD_SIZE={world}"
    else:
        return WHOLE
    if world < 1 or not 0 <= rank < world:
        raise MarsError(f"{source}: need 0 <= rank < world, world >= 1")
    return Shard(rank, world)


@dataclass(frozen=True)
class ImageJob:
    """One image to make: the PNG's path, the prompt and the seed of its generator."""

    path: Path
    prompt: str
    seed: int


def pending_jobs(jobs: Sequence[ImageJob], shard: Shard) -> list[ImageJob]:
    """The jobs of `shard` whose PNG is not on disk yet (a resumed run skips the others)."""
    return [job for i, job in enumerate(jobs) if shard.owns(i) and not job.path.exists()]


def run_image_jobs(generate: GenerateFn, jobs: Sequence[ImageJob], out_dir: str | Path,
                   shard: Shard = WHOLE, batch_size: int = 8, desc: str = "generate") -> int:
    """Make the missing images of this shard; returns how many were written.

    Jobs are batched in order; PNGs are renamed into place one by one as soon as a batch is done,
    so an interrupted run loses at most one batch and leaves no torn file.
    """
    if batch_size < 1:
        raise MarsError(f"--batch-size must be >= 1, got {batch_size}")
    remove_partials(out_dir, shard.tag)
    todo = pending_jobs(jobs, shard)
    owned = sum(shard.owns(i) for i in range(len(jobs)))
    tmp_dir = Path(out_dir) / PARTIAL_DIR
    with tqdm(total=owned, initial=owned - len(todo), desc=desc, unit="img") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            images = generate([j.prompt for j in batch], [j.seed for j in batch])
            if len(images) != len(batch):
                raise RuntimeError(f"the generator returned {len(images)} images for {len(batch)} prompts")
            for job, image in zip(batch, images):
                save_image_atomic(image, job.path, tmp_dir, tag=shard.tag)
            bar.update(len(batch))
    try:
        tmp_dir.rmdir()  # leave no empty scratch folder behind (kept while another rank uses it)
    except OSError:
        pass
    return len(todo)



def check_settings(out_dir: str | Path, settings: dict) -> None:
    """Record the generation settings of `out_dir`, or check that a resumed run uses the same.

    Resuming with other settings would silently mix two experiments in one folder.
    """
    path = Path(out_dir) / SETTINGS_FILE
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved != settings:
            changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            raise MarsError(f"{out_dir} holds images made with other settings ({', '.join(changed)} differ: "
                            f"{ {k: saved.get(k) for k in changed} } vs { {k: settings.get(k) for k in changed} }); "
                            "use another --out-dir")
    else:
        write_json_atomic(path, settings)


def pipeline_generate_fn(pipe, cfg_scale: float, top_k: int, top_p: float, temperature: float,
                         rerank: int = 1, rerank_drawing_weight: float | None = None,
                         jacobi_window: int = 0) -> GenerateFn:
    """A `MarsPipeline` as a GenerateFn: one call per batch, seed[i] for image i, the same settings for all
    (`rerank`: best of that many candidates per image, judged with `rerank_drawing_weight`;
    `jacobi_window`: drafts per forward of speculative Jacobi decoding; `MarsPipeline.generate`)."""
    def run(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        return pipe.generate(prompts, cfg_scale=cfg_scale, top_k=top_k, top_p=top_p, temperature=temperature,
                             seed=list(seeds), batch_size=len(prompts), rerank=rerank,
                             rerank_drawing_weight=rerank_drawing_weight, jacobi_window=jacobi_window)
    return run
