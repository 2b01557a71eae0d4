"""`mars train CONFIG.yaml [key=value ...]`: one stage of MARS training (also under torchrun)."""

from __future__ import annotations

import argparse


def add_commands(subparsers) -> None:
    """Register `mars train`."""
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
