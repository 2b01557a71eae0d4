"""Training tokens/s with and without the no-autograd T2I text prefix, on the same config.

    python benchmarks/train_speed.py                                   # debug preset, 256 codes, CPU
    python benchmarks/train_speed.py configs/debug/stage1.yaml device=cuda precision=bf16

Runs the real trainer (`Trainer.train_step`) twice on identical data and weights: once with
`prefix_no_grad=true` (the prompt runs once under no_grad into a KV cache, only the visual columns
[P, T) run with autograd) and once with `prefix_no_grad=false` (one full forward with autograd).
The default workload is T2I only, the debug model at 256 px (16 x 16 = 256 codes, as the paper's
images) with MARS-Shapes prompts (byte tokens, ~50 per prompt). Prints a table and the ratio.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import torch

from mars.train.config import load_train_config
from mars.train.trainer import Trainer

DEFAULT_CONFIG = "configs/debug/stage1.yaml"
DEFAULT_OVERRIDES = ["tasks={t2i: 1.0}", "model_overrides={image_size: 256, max_seq_len: 512}", "data.synthetic=64",
                     "data.cfg_dropout=0", "tensorboard=false", "save_every=0", "batch_size=16",
                     "micro_batch_size=16"]


def tokens_per_second(config: str, overrides: list[str], prefix_no_grad: bool, steps: int, warmup: int) -> tuple[float, float]:
    """(median tokens/s, mean loss) over `steps` timed train steps after `warmup` untimed ones."""
    with tempfile.TemporaryDirectory() as out:
        cfg = load_train_config(config, [*overrides, f"out_dir={out}", f"prefix_no_grad={str(prefix_no_grad).lower()}",
                                         f"max_steps={warmup + steps}"])
        trainer = Trainer(cfg)
        rates, losses = [], []
        for step in range(warmup + steps):
            start = time.perf_counter()
            metrics = trainer.train_step(step)
            if trainer.env.device.type == "cuda":
                torch.cuda.synchronize()
            if step >= warmup:
                rates.append(metrics["tokens"] / (time.perf_counter() - start))
                losses.append(metrics["loss"])
        return statistics.median(rates), statistics.mean(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default=DEFAULT_CONFIG)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (after the defaults)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    overrides = [*DEFAULT_OVERRIDES, *args.overrides]

    fast, fast_loss = tokens_per_second(args.config, overrides, True, args.steps, args.warmup)
    full, full_loss = tokens_per_second(args.config, overrides, False, args.steps, args.warmup)
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() and "device=cpu" not in overrides else "cpu"
    print(f"config {args.config} + {' '.join(overrides)}  ({device}, {torch.get_num_threads()} CPU threads)")
    print("| T2I step | tokens/s (median) | mean loss |")
    print("|---|---|---|")
    print(f"| full forward with autograd (baseline) | {full:,.0f} | {full_loss:.5f} |")
    print(f"| no-autograd text prefix + KV cache | {fast:,.0f} | {fast_loss:.5f} |")
    print(f"speed-up: {fast / full:.2f}x (same batches, same loss up to float rounding)")


if __name__ == "__main__":
    main()
