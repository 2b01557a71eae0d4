"""Prompt-suite runners that write exactly the layouts the official evaluators read.

- COCO-30K (FID): `n` images of captions_val2014.json drawn with a fixed seed, one caption per
  image (chosen with the same seed).

      DIR/prompts.jsonl        {"index", "image_id", "file_name", "caption", "file"} per line
      DIR/images/{index:05d}.png   generated, resized to `image_size` (default 256) with LANCZOS
      DIR/reference/{index:05d}.png   (with `coco_images`) the chosen val2014 pictures,
                                   centre-cropped and resized to `image_size`

  Protocol: both sets are square images of `image_size`; the FID network then resizes each to
  its own input (Inception: 299x299 bilinear, as pytorch-fid; EfficientNet-Lite0: 224x224).
  Use the same `image_size` for generated and reference images.

- GenEval (djghosh13/geneval, generation/diffusers_generate.py; evaluation/evaluate_images.py
  reads `DIR/<5 digits>/metadata.jsonl` and `samples/<digits>.png`):

      DIR/{index:0>5}/metadata.jsonl   the prompt's metadata line, as json.dump writes it
      DIR/{index:0>5}/samples/{k:05}.png
      DIR/{index:0>5}/grid.png         (optional) the samples side by side

- T2I-CompBench (Karine-Huang/T2I-CompBench; the BLIP-VQA / UniDet / CLIP scripts read
  `DIR/samples/`, take the prompt from the name before `_` and sort by the number after it):

      DIR/samples/{prompt}_{j:06d}.png   j = prompt_index * n_samples + k (a running count,
                                          as GORS_finetune/inference_eval.py names them)

Image j of a suite (flat order) gets generator seed `seed + j`; see `mars.eval.runner` for
resuming and sharding.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

from mars.data.images import load_image, resize_center_crop
from mars.errors import MarsError
from mars.eval.io import PARTIAL_DIR, save_image_atomic, write_text_atomic
from mars.eval.runner import WHOLE, GenerateFn, ImageJob, Shard, run_image_jobs
from mars.jsonl import read_jsonl

# --------------------------------------------------------------------------- COCO-30K


def coco_selection(captions_json: str | Path, n: int, seed: int = 0) -> list[dict]:
    """`n` distinct val2014 images drawn with `seed`, each with one of its captions."""
    try:
        data = json.loads(Path(captions_json).read_text(encoding="utf-8"))
        files = {img["id"]: img["file_name"] for img in data["images"]}
        captions: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    except FileNotFoundError:
        raise MarsError(f"captions file not found: {captions_json}") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise MarsError(f"{captions_json} is not a COCO captions file (images / annotations): {err}") from None
    image_ids = sorted(i for i in files if captions.get(i))
    if not 1 <= n <= len(image_ids):
        raise MarsError(f"--n must be between 1 and {len(image_ids)} (images with captions in "
                        f"{captions_json}), got {n}")
    rng = random.Random(seed)
    chosen = rng.sample(image_ids, n)
    return [{"index": j, "image_id": image_id, "file_name": files[image_id],
             "caption": rng.choice(captions[image_id]), "file": f"images/{j:05d}.png"}
            for j, image_id in enumerate(chosen)]


def _resized(generate: GenerateFn, size: int) -> GenerateFn:
    """`generate`, with every image resized to size x size (LANCZOS) if it is not already."""
    def run(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        images = generate(prompts, seeds)
        return [im if im.size == (size, size) else im.resize((size, size), Image.Resampling.LANCZOS)
                for im in images]
    return run


def run_coco(generate: GenerateFn, captions_json: str | Path, out_dir: str | Path, n: int = 30000,
             seed: int = 0, image_size: int = 256, batch_size: int = 8, shard: Shard = WHOLE,
             coco_images: str | Path | None = None) -> list[dict]:
    """Generate the COCO-30K images of this shard (and its reference images); returns the selection."""
    out_dir = Path(out_dir)
    selection = coco_selection(captions_json, n, seed)
    prompts_file = out_dir / "prompts.jsonl"
    text = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in selection)
    if not prompts_file.is_file() or prompts_file.read_text(encoding="utf-8") != text:
        write_text_atomic(prompts_file, text, out_dir / PARTIAL_DIR, tag=shard.tag)
    if coco_images is not None:
        write_coco_reference(selection, coco_images, out_dir / "reference", image_size, shard)
    jobs = [ImageJob(out_dir / s["file"], s["caption"], seed + s["index"]) for s in selection]
    run_image_jobs(_resized(generate, image_size), jobs, out_dir, shard, batch_size, desc="coco")
    return selection


def write_coco_reference(selection: list[dict], coco_images: str | Path, ref_dir: Path, image_size: int,
                         shard: Shard = WHOLE) -> None:
    """The chosen val2014 images, centre-cropped and resized to `image_size` (skips existing ones)."""
    for s in selection:
        target = ref_dir / f"{s['index']:05d}.png"
        if not shard.owns(s["index"]) or target.exists():
            continue
        source = Path(coco_images) / s["file_name"]
        if not source.is_file():
            raise MarsError(f"{source} not found (--coco-images must be the val2014 image folder)")
        save_image_atomic(resize_center_crop(load_image(source), image_size), target,
                          ref_dir.parent / PARTIAL_DIR, tag=shard.tag)


# --------------------------------------------------------------------------- GenEval


def read_geneval_metadata(path: str | Path) -> list[dict]:
    """The lines of GenEval's evaluation_metadata.jsonl (each needs a `prompt`)."""
    metadatas = []
    for number, metadata in read_jsonl(path, "metadata file"):
        if not isinstance(metadata, dict) or not isinstance(metadata.get("prompt"), str):
            raise MarsError(f"{path}:{number}: a GenEval metadata line needs a string 'prompt'")
        metadatas.append(metadata)
    if not metadatas:
        raise MarsError(f"{path} has no prompts")
    return metadatas


def image_grid(images: list[Image.Image], pad: int = 2) -> Image.Image:
    """The images side by side on a white strip, `pad` px apart."""
    w, h = images[0].size
    grid = Image.new("RGB", (len(images) * (w + pad) + pad, h + 2 * pad), (255, 255, 255))
    for k, image in enumerate(images):
        grid.paste(image.convert("RGB"), (pad + k * (w + pad), pad))
    return grid


def run_geneval(generate: GenerateFn, metadata_file: str | Path, out_dir: str | Path, n_samples: int = 4,
                seed: int = 0, batch_size: int = 8, shard: Shard = WHOLE, grid: bool = False) -> list[ImageJob]:
    """Generate GenEval's folders (this shard's part); returns every image job of the suite."""
    if n_samples < 1:
        raise MarsError(f"--n-samples must be >= 1, got {n_samples}")
    out_dir = Path(out_dir)
    metadatas = read_geneval_metadata(metadata_file)
    jobs = []
    for i, metadata in enumerate(metadatas):
        folder = out_dir / f"{i:0>5}"
        jobs += [ImageJob(folder / "samples" / f"{k:05}.png", metadata["prompt"], seed + i * n_samples + k)
                 for k in range(n_samples)]
        if any(shard.owns(i * n_samples + k) for k in range(n_samples)):
            text = json.dumps(metadata)  # the exact bytes of the official json.dump(metadata, fp)
            meta = folder / "metadata.jsonl"
            if not meta.is_file() or meta.read_text(encoding="utf-8") != text:
                write_text_atomic(meta, text, out_dir / PARTIAL_DIR, tag=shard.tag)
    run_image_jobs(generate, jobs, out_dir, shard, batch_size, desc="geneval")
    if grid:
        for i in range(len(metadatas)):
            folder = out_dir / f"{i:0>5}"
            samples = [folder / "samples" / f"{k:05}.png" for k in range(n_samples)]
            if shard.owns(i) and not (folder / "grid.png").exists() and all(p.is_file() for p in samples):
                save_image_atomic(image_grid([load_image(p) for p in samples]), folder / "grid.png",
                                  out_dir / PARTIAL_DIR, tag=shard.tag)
    return jobs


# --------------------------------------------------------------------------- T2I-CompBench


def read_compbench_prompts(path: str | Path) -> list[str]:
    """Prompts of a T2I-CompBench file (e.g. color_val.txt): the text before a tab, per non-blank line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MarsError(f"prompts file not found: {path}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        prompt = line.split("\t")[0].strip()
        if not prompt:
            continue
        # the prompt is part of the file name
        if "/" in prompt or "\0" in prompt or len(prompt.encode("utf-8")) > 240:
            raise MarsError(f"{path}:{number}: prompt cannot be a file name (contains '/' or is too long)")
        prompts.append(prompt)
    if not prompts:
        raise MarsError(f"{path} has no prompts")
    return prompts


def run_compbench(generate: GenerateFn, prompts_file: str | Path, out_dir: str | Path, n_samples: int = 10,
                  seed: int = 0, batch_size: int = 8, shard: Shard = WHOLE) -> list[ImageJob]:
    """Generate `DIR/samples/{prompt}_{j:06d}.png` (this shard's part); returns every image job."""
    if n_samples < 1:
        raise MarsError(f"--n-samples must be >= 1, got {n_samples}")
    out_dir = Path(out_dir)
    prompts = read_compbench_prompts(prompts_file)
    jobs = [ImageJob(out_dir / "samples" / f"{prompt}_{i * n_samples + k:06d}.png", prompt, seed + i * n_samples + k)
            for i, prompt in enumerate(prompts) for k in range(n_samples)]
    run_image_jobs(generate, jobs, out_dir, shard, batch_size, desc="t2i-compbench")
    return jobs
