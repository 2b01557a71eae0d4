"""Seconds per image of a model end to end: `MarsPipeline.generate` (prompt -> tokens -> VQ decode).

    python benchmarks/pipeline_speed.py                         # the built-in model, 1 thread
    python benchmarks/pipeline_speed.py --model DIR --batch 1 8 --threads 2
    python benchmarks/pipeline_speed.py --rerank 4 --rerank-drawing-weight 0 --no-compile   # best of 4
    python benchmarks/pipeline_speed.py --batch 1 --threads 2 --no-compile --jacobi-window 2 3 4
    python benchmarks/pipeline_speed.py --threads 2 --no-compile --jacobi-window 3 --shapes-prompts 40

Uses the model's own sampling settings (its generation_config.json). For each batch size, the
modes run in turn in one process, so a machine whose speed drifts affects them alike: on the CPU
first the baseline "eager, model step" (the model's own forward for each decode step, as before
`mars.model.cpu_decode.CPUImageStep`), then eager (`CPUImageStep` on the CPU) and compiled
(`compile=True`), and with `--jacobi-window N ..` speculative Jacobi decoding with N drafts per
forward (`mars.jacobi`; images of the same distribution, not the same images). After one warm-up
call each (the compiled one includes compiling, reported apart) it prints the best and the median
of `--repeats` runs, in wall and CPU seconds per image.

One prompt's time depends on its image (with Jacobi decoding, on how many drafts it accepts):
`--shapes-prompts N` instead times one image for each of N of the shapes benchmark's prompts
(every k-th of each language's 300, with the seed the benchmark gives it), the modes alternating
prompt by prompt, and prints their mean, median and range.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch

import mars.generate
from mars.eval.shapes_eval import shapes_items
from mars.pipeline import MarsPipeline

PROMPT = "a red circle to the left of a blue square"


def timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def model_step() -> contextlib.AbstractContextManager:
    """Decode with the model's own forward per step: the baseline of the CPU step."""
    return mock.patch.object(mars.generate, "uses_cpu_step", lambda model, cache: False)


Mode = tuple[bool, Callable[[], contextlib.AbstractContextManager], int]  # compile, context, Jacobi window
MODES: dict[str, Mode] = {
    "eager, model step": (False, model_step, 0),
    "eager": (False, contextlib.nullcontext, 0),
    "compiled": (True, contextlib.nullcontext, 0),
}


def time_shapes_prompts(pipe: MarsPipeline, modes: dict[str, Mode], count: int) -> None:
    """One image per benchmark prompt (`count` of them, both languages), modes alternating."""
    items = [item for lang in ("en", "zh") for item in shapes_items(50, 0, (lang,))]
    step = max(len(items) // count, 1)
    chosen = items[::step][:count]
    for mode in modes.values():  # warm-up
        run_mode(pipe, mode, [chosen[0].prompt], chosen[0].seed, 1)
    walls: dict[str, list[float]] = {name: [] for name in modes}
    for item in chosen:
        for name, mode in modes.items():
            walls[name].append(run_mode(pipe, mode, [item.prompt], item.seed, 1)[0])
    print("| mode | prompts | mean s / image (wall) | median | min | max |")
    print("|---|---|---|---|---|---|")
    for mode, times in walls.items():
        print(f"| {mode} | {len(times)} | {statistics.mean(times):.3f} | {statistics.median(times):.3f} | "
              f"{min(times):.3f} | {max(times):.3f} |", flush=True)


def run_mode(pipe: MarsPipeline, mode: Mode, prompts: list[str], seed: int, draw_batch: int, **options):
    """(wall, CPU) seconds of one `generate` call in `mode`."""
    compile, context, window = mode
    with context():
        return timed(lambda: pipe.generate(prompts, seed=seed, batch_size=draw_batch, compile=compile,
                                           jacobi_window=window, **options))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes-demo", help="model folder or built-in name")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-compile", action="store_true", help="eager runs only")
    parser.add_argument("--jacobi-window", type=int, nargs="*", default=[], metavar="N",
                        help="also speculative Jacobi decoding with N drafts per forward, for each N")
    parser.add_argument("--shapes-prompts", type=int, metavar="N",
                        help="time one image for each of N shapes benchmark prompts instead (batch 1)")
    parser.add_argument("--rerank", type=int, default=1, metavar="N", help="best of N candidates per image")
    parser.add_argument("--rerank-drawing-weight", type=float, metavar="W",
                        help="with --rerank: the drawing term's weight (default: the model's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = MarsPipeline.from_pretrained(args.model)
    jacobi = {f"eager, Jacobi window {window}": (False, contextlib.nullcontext, window)
              for window in args.jacobi_window}
    modes = {name: mode for name, mode in (MODES | jacobi).items()
             if not (args.no_compile and mode[0]) and (pipe.device.type == "cpu" or name != "eager, model step")}
    judging = f", best of {args.rerank} ({pipe.rerank_settings(args.rerank_drawing_weight)})" if args.rerank > 1 else ""
    print(f"{args.model} on {pipe.device}, {args.threads} thread(s), torch {torch.__version__}, "
          f"sampling {pipe.sampling_settings()}{judging}")
    if args.shapes_prompts:
        time_shapes_prompts(pipe, modes, args.shapes_prompts)
        return
    options = {"rerank": args.rerank, "rerank_drawing_weight": args.rerank_drawing_weight}
    print("| batch | mode | best s / image (wall) | median (wall) | best (CPU) | first call s |")
    print("|---|---|---|---|---|---|")
    for batch in args.batch:
        prompts = [PROMPT] * batch

        def run(name: str, seed: int) -> tuple[float, float]:
            # with --rerank, a call draws its images' candidates together, as `mars generate` does
            return run_mode(pipe, modes[name], prompts, seed, batch * args.rerank, **options)

        first = {m: run(m, 0)[0] for m in modes}
        runs: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
        for r in range(args.repeats):
            for m in modes:
                runs[m].append(run(m, r + 1))
        for m in modes:
            walls = [w / batch for w, _ in runs[m]]
            cpus = [u / batch for _, u in runs[m]]
            print(f"| {batch} | {m} | {min(walls):.3f} | {statistics.median(walls):.3f} | "
                  f"{min(cpus):.3f} | {first[m]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
