"""`mars train CONFIG.yaml [key=value ...]`: one stage of MARS training (also under torchrun);
`mars export CHECKPOINT --out DIR`: a training checkpoint as a model folder;
`mars preferences --model M --data shapes:N:SEED --out DIR [--judge checker | --counterfactual FACT]`: preference
pairs for a DPO stage."""

from __future__ import annotations

import argparse
import sys

from mars.cli import comma_list
from mars.data.counterfactual_scenes import FACT_CATEGORIES, FACTS
from mars.data.shapes import TRAIN_CATEGORIES
from mars.errors import MarsError


def add_commands(subparsers) -> None:
    """Register `mars train`, `mars export` and `mars preferences`."""
    train = subparsers.add_parser(
        "train", help="train one stage (stage0 text LM, stage1 T2I+I2T, stage2 T2I, stage3 512 px)",
        description="Train one stage from a YAML config (configs/stages/*.yaml, configs/debug/*.yaml). "
                    "Any config key can be overridden as key=value (dotted keys reach data.*), e.g. "
                    "out_dir=runs/x max_steps=100 save_every=50 resume=auto. Under "
                    "`torchrun --nproc_per_node N -m mars.cli train ...` the model is sharded with FSDP2. "
                    "Writes OUT/metrics.jsonl, OUT/tb, OUT/checkpoints/step_*, OUT/final.")
    train.add_argument("config", help="stage YAML file")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    train.set_defaults(func=run_train)
    export = subparsers.add_parser(
        "export", help="a training checkpoint as a model folder (generate, caption, eval, serve from it)",
        description="Write OUT/checkpoints/step_* of a `mars train` run as a model folder, like the run's "
                    "final/: weights, the run's tokenizer/ and vq/, and the starting model's "
                    "generation_config.json when it has one.")
    export.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/x/checkpoints/step_00001000")
    export.add_argument("--out", required=True, help="the model folder to write")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.set_defaults(func=run_export)
    prefs = subparsers.add_parser(
        "preferences", help="preference pairs for a DPO stage: each prompt's best and worst of N of the model's images",
        description="Draw N candidate images per prompt with the model's sampling settings, score them as "
                    "`generate --rerank N` does (the model reading each back; --judge checker: SHAPES_SPEC's "
                    "checker), and keep the best and the worst as a preference pair (mars.train.preferences). "
                    "Train on them with a stage whose tasks are {dpo: 1} and data.preferences DIR. Rerunning "
                    "the same command resumes.")
    prefs.add_argument("--model", default="shapes-demo", help="model folder or built-in name (default shapes-demo)")
    source = prefs.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help="text file with one prompt per line, or .jsonl with a 'prompt' key")
    source.add_argument("--data", help="shapes:N:SEED: the captions of N training scenes (English and Chinese "
                                       "alternately; use a seed other than the training data's); canonical:N:SEED: "
                                       "N canonical prompts of training scenes that the shapes benchmark never asks")
    prefs.add_argument("--categories", type=comma_list,
                       help="canonical:N:SEED prompts of these categories, in turn; one named twice gets twice the "
                            "prompts (default: all training ones; with --counterfactual all that state the fact)")
    prefs.add_argument("--judge",
                       help="self: the model's own reading, as --rerank (default); checker: SHAPES_SPEC's checker "
                            "(canonical prompts only)")
    prefs.add_argument("--mirror", metavar="FACT", choices=FACTS,
                       help="with --judge checker: a candidate that shows the prompt with FACT made false (binding: "
                            "colours exchanged; relation: the other order; size: sizes exchanged) scores -1, so "
                            "pairs with a score gap of 2 differ in FACT alone (train with dpo_min_score_gap: 2)")
    prefs.add_argument("--counterfactual", metavar="FACT", choices=FACTS,
                       help="instead of the model's images: each canonical:N:SEED scene's render against the render "
                            "of the same scene with FACT made false (binding: the objects' colours exchanged; "
                            "relation: the pair mirrored; size: the sizes exchanged); no judge, no candidates")
    prefs.add_argument("--out", required=True, help="folder for the pairs (resumed when it exists)")
    prefs.add_argument("--candidates", type=int, help="images per prompt (default 8)")
    prefs.add_argument("--seed", type=int, default=0, help="prompt i draws with seed SEED + i (default 0)")
    prefs.add_argument("--part-size", type=int, default=64, help="prompts per saved part (default 64)")
    prefs.add_argument("--batch-size", type=int, default=32, help="images drawn at once (default 32)")
    prefs.add_argument("--drawing-weight", type=float,
                       help="weight of the drawing likelihood in the score (default: the model's rerank setting)")
    prefs.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    prefs.set_defaults(func=run_preferences)


def run_train(args: argparse.Namespace) -> int:
    from mars.train.config import load_train_config
    from mars.train.parallel import init_distributed, shutdown
    from mars.train.trainer import Trainer

    cfg = load_train_config(args.config, args.overrides)
    env = init_distributed(cfg.device)
    try:
        Trainer(cfg, env).run()
    finally:
        shutdown(env)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from mars.train.export import export_checkpoint

    print(export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite))
    return 0


def run_preferences(args: argparse.Namespace) -> int:
    from mars.cli_generate import read_prompts
    from mars.pipeline import MarsPipeline
    from mars.train.preferences import canonical_prompts_outside_benchmark, make_preferences, shapes_prompts

    if args.counterfactual:
        return run_counterfactual_preferences(args)
    if args.prompts:
        prompts = read_prompts(args.prompts)
    elif args.data.startswith("shapes:"):
        prompts = shapes_prompts(args.data)
    elif args.data.startswith("canonical:"):
        prompts = canonical_prompts_outside_benchmark(args.data, args.categories or TRAIN_CATEGORIES)
    else:
        raise MarsError(f"--data takes shapes:N:SEED or canonical:N:SEED, got {args.data!r}; pass other prompts "
                        "with --prompts FILE")
    pipeline = MarsPipeline.from_pretrained(args.model, device=args.device)
    out = make_preferences(pipeline, prompts, args.out, candidates=args.candidates or 8, seed=args.seed,
                           part_size=args.part_size, batch_size=args.batch_size, drawing_weight=args.drawing_weight,
                           judge=args.judge or "self", mirror_fact=args.mirror)
    print(out)
    return 0


def run_counterfactual_preferences(args: argparse.Namespace) -> int:
    """`mars preferences --counterfactual FACT`: rendered pairs, only the model's VQ-GAN used."""
    from mars.pipeline import MarsPipeline
    from mars.train.preferences import make_counterfactual_preferences

    if args.prompts or not args.data.startswith("canonical:"):
        raise MarsError("--counterfactual renders training scenes: give them as --data canonical:N:SEED")
    if args.judge or args.mirror or args.candidates or args.drawing_weight is not None:
        raise MarsError("--counterfactual pairs are renders, not judged candidates: drop --judge, --mirror, "
                        "--candidates and --drawing-weight")
    categories = args.categories or FACT_CATEGORIES[args.counterfactual]
    pipeline = MarsPipeline.from_pretrained(args.model, device=args.device)
    out, passed_over = make_counterfactual_preferences(pipeline, args.data, categories, args.counterfactual, args.out,
                                                       part_size=args.part_size)
    print(f"{passed_over} scenes passed over: the {args.counterfactual} could not be made false in them",
          file=sys.stderr)
    print(out)
    return 0


