"""`mars train CONFIG.yaml [key=value ...]`: one stage of MARS training (also under torchrun);
`mars export CHECKPOINT --out DIR`: a training checkpoint as a model folder."""

from __future__ import annotations

import argparse


def add_commands(subparsers) -> None:
    """Register `mars train` and `mars export`."""
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
