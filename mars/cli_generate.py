"""`mars generate` (prompts -> PNGs + manifest.jsonl) and `mars caption` (images -> text)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from mars.errors import MarsError
from mars.jsonl import read_jsonl, read_lines
from mars.model_dir import DEFAULT_MODEL

MANIFEST = "manifest.jsonl"
GRID = "grid.png"


def add_commands(subparsers) -> None:
    """Register `mars generate` and `mars caption`."""
    gen = subparsers.add_parser(
        "generate", help="generate images from text prompts",
        description="Generate images from English or Chinese prompts. One prompt: `mars generate \"PROMPT\" "
                    "-o out.png`. Many: `mars generate --prompts-file F --out-dir D`, which writes one PNG per "
                    "image and D/manifest.jsonl (file, prompt, seed, settings per image). Image i of a run "
                    "(prompt-major) uses seed SEED + i. Existing files are never replaced without --overwrite.")
    gen.add_argument("prompt", nargs="?", help="the prompt (or use --prompts-file)")
    gen.add_argument("-o", "--output", default="out.png",
                     help="output PNG for a single prompt (default out.png; with --num-images N: out_0.png ...)")
    gen.add_argument("--prompts-file", help="text file with one prompt per line, or .jsonl with a 'prompt' key")
    gen.add_argument("--out-dir", help="folder for the PNGs and manifest.jsonl")
    gen.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the first image (default 0)")
    # Sampling settings not given take the model's defaults (its generation_config.json), else 4 / 0 / 1 / 1.
    gen.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale; 1 = off (default: the model's)")
    gen.add_argument("--top-k", type=int, help="keep the k most likely codes; 0 = off (default: the model's)")
    gen.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1]; 1 = off (default: the model's)")
    gen.add_argument("--temperature", type=float, help="sampling temperature; 0 = greedy (default: the model's)")
    gen.add_argument("--negative-prompt", help="what to steer away from: it replaces the null prompt in guidance "
                                               "(needs --cfg-scale != 1)")
    gen.add_argument("--rerank", type=int, default=1, metavar="N",
                     help="draw N candidates per image and keep the one whose prompt the model, reading the image "
                          "back, finds the likeliest caption, with the drawing term below (N times the work; "
                          "default 1 = off)")
    gen.add_argument("--rerank-drawing-weight", type=float, metavar="W",
                     help="with --rerank: add W times the log-likelihood of a candidate's codes after the prompt "
                          "to its score (0 = reading alone; default: the model's)")
    gen.add_argument("--batch-size", type=int, default=8,
                     help="images drawn at once, candidates with --rerank (default 8)")
    gen.add_argument("--image-size", type=int, help="output side in pixels (default: the model's)")
    gen.add_argument("--grid", action="store_true", help="also write a contact sheet of all images")
    gen.add_argument("--overwrite", action="store_true", help="replace existing output files")
    gen.add_argument("--jacobi-window", type=int, default=0, metavar="N",
                     help="speculative Jacobi decoding: feed N drafted codes per forward and keep those the model "
                          "accepts; images of the same distribution from fewer forwards, each image at its own pace "
                          "(fastest at batch 1 on a CPU; 3 for the built-in model; default 0 = off)")
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile the decode step (pays off on many batches; on CUDA the step "
                          "is replayed as a CUDA graph either way)")
    _add_model_args(gen)
    gen.set_defaults(func=run_generate)

    cap = subparsers.add_parser(
        "caption", help="describe images in English or Chinese",
        description="Caption images with the model's image-to-text ability. Prints `PATH<TAB>CAPTION` per "
                    "image, or with --json one line {\"image\": PATH, \"caption\": TEXT} per image. Unreadable "
                    "images are reported on stderr and skipped (exit status 2).")
    cap.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    cap.add_argument("--lang", choices=("en", "zh"), default="en", help="caption language (default en)")
    cap.add_argument("--json", action="store_true", help="one JSON object per line")
    cap.add_argument("--max-new-tokens", type=int, default=64, help="caption length limit in tokens (default 64)")
    cap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    cap.add_argument("--seed", type=int, default=0, help="seed of the first caption when sampling (default 0)")
    _add_caption_guidance_args(cap)
    cap.add_argument("--batch-size", type=int, default=16, help="images captioned at once (default 16)")
    _add_model_args(cap)
    cap.set_defaults(func=run_caption)


def _add_caption_guidance_args(parser: argparse.ArgumentParser) -> None:
    """--cfg-scale / --plausibility of captioning (also used by `mars eval captions`)."""
    parser.add_argument("--cfg-scale", type=float,
                        help="guide each caption by its image against the text model alone; 1 = off "
                             "(default: the model's)")
    parser.add_argument("--plausibility", type=float,
                        help="with guidance, only words at least this fraction as likely as the best one "
                             "given the image are chosen (default: the model's)")
    parser.add_argument("--rerank", type=int, default=1, metavar="N",
                        help="also draw N - 1 captions per image and keep the one under which the model, "
                             "drawing, finds the image likeliest (default 1 = off)")
    parser.add_argument("--refine", type=int, metavar="R",
                        help="then edit each caption for up to R rounds, a word at a time, keeping an edit when "
                             "drawing and reading both find it likelier (tens of forwards per round; 0 = off; "
                             "default: the model's)")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model folder or built-in name (default {DEFAULT_MODEL})")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="default: bf16 on CUDA, fp32 on CPU")


def _load_pipeline(args: argparse.Namespace):
    from mars.pipeline import MarsPipeline  # heavy: only when a verb runs

    return MarsPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype)


# --- mars generate -------------------------------------------------------------------------------


@dataclass
class Job:
    """One image to make: its prompt, seed and file."""

    prompt_index: int
    prompt: str
    seed: int
    path: Path


def read_prompts(file: str) -> list[str]:
    """Prompts from a text file (one per non-empty line) or a .jsonl file (`prompt` or `text` key)."""
    path = Path(file)
    if path.suffix != ".jsonl":
        prompts = [line.strip() for _, line in read_lines(path, "prompts file")]
    else:
        prompts = []
        for n, row in read_jsonl(path, "prompts file"):
            text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise MarsError(f"{file}:{n} has no 'prompt' (or 'text') string")
            prompts.append(text)
    if not prompts:
        raise MarsError(f"{file} holds no prompts")
    return prompts


def plan_jobs(args: argparse.Namespace) -> tuple[list[Job], list[Path]]:
    """Every image to make, with its file, and the extra files (manifest, grid) of the run."""
    if args.num_images < 1:
        raise MarsError(f"--num-images must be >= 1, got {args.num_images}")
    if (args.prompt is None) == (args.prompts_file is None):
        raise MarsError("give either a PROMPT or --prompts-file")
    prompts = read_prompts(args.prompts_file) if args.prompts_file else [args.prompt]
    n = args.num_images
    if args.out_dir is None:
        if args.prompts_file:
            raise MarsError("--prompts-file needs --out-dir")
        out = Path(args.output)
        if out.suffix.lower() != ".png":
            raise MarsError(f"-o {args.output}: the output must be a .png file")
        paths = [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]
        extras = [out.with_name(f"{out.stem}_grid.png")] if args.grid else []
    else:
        out_dir = Path(args.out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise MarsError(f"--out-dir {out_dir} exists and is not a folder")
        wp, wi = max(5, len(str(len(prompts) - 1))), max(2, len(str(n - 1)))
        paths = [out_dir / f"{p:0{wp}d}_{i:0{wi}d}.png" for p in range(len(prompts)) for i in range(n)]
        extras = [out_dir / MANIFEST] + ([out_dir / GRID] if args.grid else [])
    jobs = [Job(k // n, prompts[k // n], args.seed + k, path) for k, path in enumerate(paths)]
    return jobs, extras


def contact_sheet(images: list[Image.Image], columns: int) -> Image.Image:
    """All images on one sheet, `columns` per row."""
    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for k, im in enumerate(images):
        sheet.paste(im, ((k % columns) * w, (k // columns) * h))
    return sheet


def run_generate(args: argparse.Namespace) -> int:
    """Handler of `mars generate`."""
    jobs, extras = plan_jobs(args)
    existing = [p for p in [j.path for j in jobs] + extras if p.exists()]
    if existing and not args.overwrite:  # before any work
        more = f" (and {len(existing) - 1} more output files)" if len(existing) > 1 else ""
        raise MarsError(f"{existing[0]} already exists{more}; pass --overwrite to replace")
    if args.batch_size < 1:
        raise MarsError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.rerank < 1:
        raise MarsError(f"--rerank must be >= 1, got {args.rerank}")
    from mars.generate import RerankConfig, with_given
    from mars.jacobi import check_jacobi_window

    check_jacobi_window(args.jacobi_window, args.compile)
    with_given(RerankConfig(), drawing_weight=args.rerank_drawing_weight)  # its rule, before the model loads
    pipe = _load_pipeline(args)
    judging = pipe.rerank_settings(args.rerank_drawing_weight)
    settings = pipe.sampling_settings(args.cfg_scale, args.top_k, args.top_p, args.temperature)
    prompts = list(dict.fromkeys(j.prompt for j in jobs))
    pipe.encode_prompts(prompts, pipe.image_tokens(args.image_size))  # reject bad prompts before any work
    manifest_path = Path(args.out_dir) / MANIFEST if args.out_dir else None
    record = {**settings, "image_size": args.image_size or pipe.model.config.image_size, "model": str(args.model),
              "rerank": args.rerank}
    if args.rerank > 1:
        record["rerank_drawing_weight"] = judging.drawing_weight
    if args.jacobi_window:
        record["jacobi_window"] = args.jacobi_window
    if args.negative_prompt is not None:  # checked before any work, like the prompts above
        from mars.generate import SampleConfig

        if not SampleConfig(**settings).guided:
            raise MarsError("--negative-prompt works through guidance: set --cfg-scale to something other than 1")
        pipe.encode_negative_prompts(args.negative_prompt, 1, pipe.image_tokens(args.image_size))
        record["negative_prompt"] = args.negative_prompt
    jobs[0].path.parent.mkdir(parents=True, exist_ok=True)
    images = []
    with contextlib.ExitStack() as stack, tqdm(total=len(jobs), desc="images", unit="img") as bar:
        manifest = stack.enter_context(open(manifest_path, "w", encoding="utf-8")) if manifest_path else None
        for start in range(0, len(jobs), args.batch_size):
            chunk = jobs[start : start + args.batch_size]
            # batch_size counts what is drawn at once: with --rerank, the chunk's candidates
            made = pipe.generate([j.prompt for j in chunk], seed=chunk[0].seed, batch_size=args.batch_size,
                                 image_size=args.image_size, compile=args.compile,
                                 negative_prompt=args.negative_prompt, rerank=args.rerank,
                                 rerank_drawing_weight=judging.drawing_weight, jacobi_window=args.jacobi_window,
                                 **settings)
            for job, image in zip(chunk, made):
                image.save(job.path)
                if manifest:
                    line = {"file": job.path.name, "prompt": job.prompt, "prompt_index": job.prompt_index,
                            "seed": job.seed, "settings": record}
                    manifest.write(json.dumps(line, ensure_ascii=False) + "\n")
                    manifest.flush()  # a killed run leaves a manifest of the images it wrote
            images.extend(made if args.grid else [])
            bar.update(len(chunk))
    if args.grid:
        grid_path = extras[-1]
        columns = args.num_images if args.num_images > 1 else math.ceil(math.sqrt(len(images)))
        contact_sheet(images, columns).save(grid_path)
    where = args.out_dir or jobs[0].path
    print(f"wrote {len(jobs)} image{'s' if len(jobs) > 1 else ''} to {where}", file=sys.stderr)
    return 0


# --- mars caption --------------------------------------------------------------------------------


def run_caption(args: argparse.Namespace) -> int:
    """Handler of `mars caption`."""
    from mars.data.images import UnusableImage, load_image
    from mars.generate import CaptionConfig, with_given

    if args.max_new_tokens < 1 or args.batch_size < 1 or args.rerank < 1:
        raise MarsError("--max-new-tokens, --batch-size and --rerank must be >= 1")
    # bad caption settings refused before the model loads, by the rules a model's defaults obey
    with_given(CaptionConfig(), cfg_scale=args.cfg_scale, plausibility=args.plausibility, refine=args.refine)
    readable, failed = [], 0
    for file in args.images:
        try:
            readable.append((file, load_image(file)))
        except UnusableImage as err:
            print(f"error: cannot read image {file}: {err}", file=sys.stderr)
            failed += 1
    if not readable:
        raise MarsError("no readable images to caption")
    pipe = _load_pipeline(args)
    with tqdm(total=len(readable), desc="captions", unit="img", disable=len(readable) < 2 * args.batch_size) as bar:
        for start in range(0, len(readable), args.batch_size):
            chunk = readable[start : start + args.batch_size]
            texts = pipe.caption([im for _, im in chunk], lang=args.lang, temperature=args.temperature,
                                 max_new_tokens=args.max_new_tokens, seed=args.seed + start,
                                 cfg_scale=args.cfg_scale, plausibility=args.plausibility, rerank=args.rerank,
                                 refine=args.refine)
            for (file, _), text in zip(chunk, texts):
                if args.json:
                    tqdm.write(json.dumps({"image": file, "caption": text}, ensure_ascii=False), file=sys.stdout)
                else:
                    tqdm.write(f"{file}\t{text}", file=sys.stdout)
            bar.update(len(chunk))
    return 2 if failed else 0
