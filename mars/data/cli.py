"""`mars data ...` verbs: `mars data shapes` writes a MARS-Shapes data set to disk, `mars data mix`
a manifest of it that gives chosen categories a share."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from functools import partial
from multiprocessing import Pool

from tqdm import tqdm

from mars.data.captions import shapes_example
from mars.data.shapes import render_scene
from mars.errors import MarsError


def add_commands(subparsers) -> None:
    """Register `mars data` and its sub-verbs."""
    data = subparsers.add_parser("data", help="make and inspect training data",
                                 description="Make and inspect training data.")
    verbs = data.add_subparsers(dest="data_command", metavar="VERB", required=True)

    shapes = verbs.add_parser(
        "shapes", help="write N MARS-Shapes images and their captions",
        description="Write DIR/images/00000.png ... and DIR/captions.jsonl (one JSON object per image: "
                    "image, text, text_zh, category, relation, objects). Sample i depends only on "
                    "(--seed, --split, i), so runs are reproducible with any number of workers.")
    shapes.add_argument("--n", type=int, required=True, help="number of images")
    shapes.add_argument("--out", required=True, help="output directory")
    shapes.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    shapes.add_argument("--split", choices=("train", "eval"), default="train",
                        help="train: no held-out pairs, paraphrased captions; eval: all categories "
                             "including novel, canonical captions (default train)")
    shapes.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    shapes.add_argument("--reading-order", action="store_true",
                        help="state every relation in reading order, naming first the object on the left "
                             "or on top (\"A right of B\" becomes \"B left of A\"); the same images")
    shapes.add_argument("--workers", type=int, default=1, help="processes that draw images (default 1)")
    shapes.add_argument("--overwrite", action="store_true",
                        help="replace DIR/images and DIR/captions.jsonl if DIR is not empty")
    shapes.set_defaults(func=run_shapes)

    mix = verbs.add_parser(
        "mix", help="a manifest that gives chosen categories a share (oversampling them)",
        description="Write OUT (a jsonl manifest for `mars preprocess --data`) from a `mars data shapes` "
                    "captions.jsonl: every record of the scarcest part, and of each other part as many as "
                    "its --share asks; categories without a share fill the rest. Drawn without repetition "
                    "and shuffled with --seed; image paths are rewritten relative to OUT's folder.")
    mix.add_argument("manifest", help="captions.jsonl of `mars data shapes`")
    mix.add_argument("--share", action="append", default=[], metavar="CATEGORY=FRACTION",
                     help="a category's fraction of the output, e.g. position=0.5 (repeatable)")
    mix.add_argument("--out", required=True, help="output manifest (.jsonl)")
    mix.add_argument("--seed", type=int, default=0, help="seed of the draw and the shuffle (default 0)")
    mix.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    mix.set_defaults(func=run_mix)


def _write_one(index: int, *, out: str, seed: int, split: str, size: int, width: int,
               reading_order: bool = False) -> dict:
    """Render sample `index`, save its PNG and return its captions.jsonl entry (the scene as its
    captions state it)."""
    scene, text, text_zh = shapes_example(seed, index, split, reading_order)
    image = f"images/{index:0{width}d}.png"
    render_scene(scene, size).save(os.path.join(out, image))
    stated = scene.in_reading_order() if reading_order else scene
    return {"image": image, "text": text, "text_zh": text_zh, **stated.to_dict()}


def run_shapes(args: argparse.Namespace) -> None:
    """Handler of `mars data shapes`."""
    if args.n <= 0:
        raise MarsError(f"--n must be positive, got {args.n}")
    if args.size <= 0:
        raise MarsError(f"--size must be positive, got {args.size}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise MarsError(f"--out {args.out} exists and is not a directory")
    if os.path.isdir(args.out) and os.listdir(args.out):
        if not args.overwrite:
            raise MarsError(f"{args.out} is not empty; pass --overwrite to replace its images and captions")
        shutil.rmtree(os.path.join(args.out, "images"), ignore_errors=True)
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)

    write = partial(_write_one, out=args.out, seed=args.seed, split=args.split, size=args.size,
                    width=max(5, len(str(args.n - 1))), reading_order=args.reading_order)
    manifest = os.path.join(args.out, "captions.jsonl")
    tmp = manifest + ".tmp"
    pool = Pool(args.workers) if args.workers > 1 else None
    try:
        # imap keeps index order, so the manifest is the same whatever the number of workers
        entries = pool.imap(write, range(args.n), chunksize=64) if pool else map(write, range(args.n))
        with open(tmp, "w", encoding="utf-8") as f:
            for entry in tqdm(entries, total=args.n, desc="shapes", unit="img"):
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    finally:
        if pool:
            pool.terminate()
    os.replace(tmp, manifest)  # a killed run leaves no half-written manifest
    print(f"wrote {args.n} images and captions.jsonl to {args.out}")


def run_mix(args: argparse.Namespace) -> None:
    """Handler of `mars data mix`."""
    from mars.data.mix import mix_manifest, parse_shares

    counts = mix_manifest(args.manifest, parse_shares(args.share), args.out, args.seed, args.overwrite)
    per_category = ", ".join(f"{category} {n}" for category, n in sorted(counts.items()))
    print(f"wrote {sum(counts.values())} records to {args.out} ({per_category})")
