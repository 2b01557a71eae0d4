"""`mars recipe shapes-demo`: train the built-in model from nothing (see mars/recipes/shapes_demo.py)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from mars.errors import MarsError


def add_commands(subparsers) -> None:
    """Register `mars recipe` and its recipes."""
    recipe = subparsers.add_parser("recipe", help="end-to-end training recipes",
                                   description="Run every step of a training recipe; finished steps are skipped.")
    names = recipe.add_subparsers(dest="recipe_name", metavar="RECIPE", required=True)
    p = names.add_parser(
        "shapes-demo", help="the built-in model: VQ, BPE, stage 0, stage I, stage II on MARS-Shapes",
        description="Data -> VQ tokenizer -> text tokenizer -> code shards -> stage 0 (text LM) -> stage I "
                    "(T2I + I2T) -> stage II (T2I) [-> ship]. Settings: configs/shapes-demo/*.yaml. A step "
                    "whose output is complete is skipped, training steps resume from their checkpoints, "
                    "and each step's wall time is added to OUT/recipe_times.json.")
    p.add_argument("--out", default="runs/shapes-demo", help="output folder (default runs/shapes-demo)")
    p.add_argument("--vq", default=None, help="use this trained VQ-GAN folder instead of training one")
    p.add_argument("--ship", action="store_true",
                   help="finally copy stage II's model to mars/assets/shapes-demo (the default model)")
    p.add_argument("--until", default=None, help="stop after this step (captions, vq, text_tokenizer, "
                                                 "preprocess, stage0, stage1, stage2, vq_decoder)")
    p.add_argument("--only", default=None, help="run just this step (if not done yet)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="CONFIG.KEY=VALUE",
                   help="override a setting of one config (recipe, vq, vq-refine, vq-decoder, vq-sharpen, "
                        "stage0, stage1, stage2), e.g. stage1.max_steps=10 (repeatable)")
    p.add_argument("--config-dir", default=None, help="folder of the recipe's YAML files "
                                                      "(default configs/shapes-demo)")
    p.set_defaults(func=run_shapes_demo)


def parse_settings(settings: list[str]) -> dict[str, list[str]]:
    """["stage1.max_steps=10", ...] -> {"stage1": ["max_steps=10"], ...}."""
    out: dict[str, list[str]] = {}
    for item in settings:
        key, sep, value = item.partition("=")
        config, dot, field = key.partition(".")
        if not sep or not dot or not field:
            raise MarsError(f"--set {item!r} is not of the form CONFIG.KEY=VALUE (e.g. stage1.max_steps=10)")
        out.setdefault(config, []).append(f"{field}={value}")
    return out


def run_shapes_demo(args: argparse.Namespace) -> int:
    from mars.recipes.shapes_demo import REPO_CONFIGS, SHIP_DIR, Recipe

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log = logging.getLogger("mars.recipes")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    # A `kill` (SIGTERM) unwinds like an exception, so the interrupted step's time is still recorded.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    recipe = Recipe(args.out, vq=args.vq, ship_to=SHIP_DIR if args.ship else None,
                    config_dir=args.config_dir or REPO_CONFIGS, overrides=parse_settings(args.settings))
    if args.until and args.only:
        raise MarsError("--until and --only exclude each other")
    status = recipe.run(until=args.until, only=args.only)
    for step, what in status.items():
        print(f"{step}: {what}")
    print(f"step times: {recipe.out / 'recipe_times.json'}")
    return 0
