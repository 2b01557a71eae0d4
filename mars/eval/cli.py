"""`mars eval ...`: benchmarks and metrics.

    mars eval shapes                the MARS-Shapes benchmark (generate + exact checker)
    mars eval captions              captioning accuracy on held-out MARS-Shapes scenes
    mars eval loss                  T2I / I2T loss on held-out code shards (`mars preprocess` output)
    mars eval prompt-probe          which prompt facts a model draws and reads back (colour, count,
                                    relation, size, binding): likelihoods after counterfactual prompts
    mars eval fid                   Frechet distance between two image folders (or .npz statistics)
    mars eval clip-score            CLIP score of generated images against their prompts
    mars eval coco                  COCO-30K images (+ FID against a reference)
    mars eval geneval-sample        GenEval's folder layout, for its evaluate_images.py
    mars eval t2i-compbench-sample  T2I-CompBench's samples/ layout, for its scripts

The generating verbs resume (existing PNGs are kept) and split across processes with
`--shard r/w` or under torchrun (RANK / WORLD_SIZE): rank r makes images i with i % w == r.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from mars.cli import comma_list
from mars.data.shapes import EVAL_CATEGORIES
from mars.errors import MarsError


def _device(requested: str | None) -> str:
    """--device, else the local GPU of this rank (torchrun's LOCAL_RANK), else the CPU."""
    import torch

    if requested:
        return requested
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def _langs(value: str) -> tuple[str, ...]:
    return ("en", "zh") if value == "both" else (value,)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder or built-in name (default shapes-demo)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=8, help="images per generate call (default 8)")


def _add_sampling_args(p: argparse.ArgumentParser, seed_help: str) -> None:
    _add_model_args(p)
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale "
                                                                 "(default: the model's, else 4)")
    p.add_argument("--top-k", type=int, default=None, help="top-k filter, 0 = off (default: the model's, else 0)")
    p.add_argument("--top-p", type=float, default=None, help="top-p filter, 1 = off (default: the model's, else 1)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: the model's, else 1)")
    p.add_argument("--rerank", type=int, default=1, metavar="N",
                   help="best of N candidates per image by the model's own caption likelihood of the prompt, "
                        "with the drawing term below (mars.rerank; N times the work; default 1 = off)")
    p.add_argument("--rerank-drawing-weight", type=float, default=None, metavar="W",
                   help="with --rerank: add W times the log-likelihood of a candidate's codes after the prompt to "
                        "its score (0 = reading alone; default: the model's)")
    p.add_argument("--jacobi-window", type=int, default=0, metavar="N",
                   help="speculative Jacobi decoding with N drafted codes per forward (images of the same "
                        "distribution from fewer forwards; for single images, not batches; default 0 = off)")
    p.add_argument("--shard", default=None, metavar="R/W",
                   help="make only images i with i %% W == R (default: torchrun's RANK/WORLD_SIZE, else all)")


def _load_pipeline(args: argparse.Namespace):
    from mars.model_dir import DEFAULT_MODEL, resolve_model_path
    from mars.pipeline import MarsPipeline

    name = args.model or DEFAULT_MODEL
    path = resolve_model_path(name)  # a clear error before anything heavy loads
    return MarsPipeline.from_pretrained(name, device=_device(args.device)), str(path)


def _generator(args: argparse.Namespace):
    """(GenerateFn, settings recorded next to the images) from the sampling arguments."""
    from mars.eval.runner import pipeline_generate_fn
    from mars.generate import RerankConfig, with_given
    from mars.jacobi import check_jacobi_window

    if args.rerank < 1:  # before the model loads or the output folder is made
        raise MarsError(f"--rerank must be >= 1, got {args.rerank}")
    check_jacobi_window(args.jacobi_window)
    with_given(RerankConfig(), drawing_weight=args.rerank_drawing_weight)  # its rule, before the model loads
    pipe, model_path = _load_pipeline(args)
    sampling = pipe.sampling_settings(args.cfg_scale, args.top_k, args.top_p, args.temperature)
    judging = pipe.rerank_settings(args.rerank_drawing_weight)
    settings = {"model": model_path, **sampling, "seed": args.seed}
    if args.rerank > 1:  # absent when off, so earlier runs' settings.json still match
        settings |= {"rerank": args.rerank, "rerank_drawing_weight": judging.drawing_weight}
    if args.jacobi_window:  # absent when off, as rerank
        settings["jacobi_window"] = args.jacobi_window
    settings |= pipe.prompt_order_settings()
    return pipeline_generate_fn(pipe, **sampling, rerank=args.rerank, rerank_drawing_weight=judging.drawing_weight,
                                jacobi_window=args.jacobi_window), settings


def add_commands(subparsers) -> None:
    """Register `mars eval` and its verbs."""
    ev = subparsers.add_parser("eval", help="benchmarks and metrics (shapes, captions, FID, COCO, GenEval, ...)",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = ev.add_subparsers(dest="eval_command", metavar="VERB", required=True)

    p = verbs.add_parser("shapes", help="MARS-Shapes benchmark: per-category prompt following, checked exactly",
                         description="Generate canonical prompts of every MARS-Shapes category (single, two, "
                                     "counting, position, size, novel), judge each image with the spec's checker "
                                     "and print accuracy per category and language (overall = mean of categories). "
                                     "Writes OUT/images/{lang}/{category}/NNNN.png and OUT/results.json.")
    p.add_argument("--categories", type=comma_list, default=EVAL_CATEGORIES,
                   help="comma-separated categories to run (default all; e.g. position): the prompts and seeds a "
                        "whole run of the same --n-per-category and --seed gives them; no overall score")
    _add_sampling_args(p, "seed of the prompts and of the images (default 0)")
    p.add_argument("--lang", choices=("en", "zh", "both"), default="both", help="prompt language (default both)")
    p.add_argument("--n-per-category", type=int, default=50, help="prompts per category and language (default 50)")
    p.add_argument("--out-dir", default="mars-eval-shapes", help="output folder (default mars-eval-shapes)")
    p.set_defaults(func=run_shapes)

    p = verbs.add_parser("captions", help="captioning accuracy on held-out MARS-Shapes scenes",
                         description="Render N evaluation scenes, caption them, and count a caption correct when "
                                     "the (colour, shape) multiset it names equals the picture's.")
    _add_model_args(p)
    p.add_argument("--n", type=int, default=200, help="number of scenes (default 200)")
    p.add_argument("--seed", type=int, default=0, help="scene seed (default 0)")
    p.add_argument("--lang", choices=("en", "zh", "both"), default="both", help="caption language (default both)")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="caption guidance by the image, 1 = off (default: the model's)")
    p.add_argument("--plausibility", type=float, default=None,
                   help="with guidance, the least probability relative to the best word (default: the model's)")
    p.add_argument("--rerank", type=int, default=1, metavar="N",
                   help="best of N captions per image by how likely the model, drawing, finds the image "
                        "(default 1 = off)")
    p.add_argument("--refine", type=int, metavar="R",
                   help="then up to R rounds of one-word edits per caption (MarsPipeline.caption; 0 = off; "
                        "default: the model's)")
    p.add_argument("--out-dir", default="mars-eval-captions", help="output folder (default mars-eval-captions)")
    p.set_defaults(func=run_captions)

    p = verbs.add_parser("loss", help="T2I / I2T loss on held-out code shards",
                         description="The training losses (no CFG dropout) of a model on code shards it was not "
                                     "trained on, e.g. `mars preprocess --data shapes:512:99 --out D` with the "
                                     "model's tokenizers: nats per token and perplexity per task.")
    _add_model_args(p)
    p.add_argument("--shards", required=True, help="folder of code shards (mars preprocess --out)")
    p.add_argument("--n", type=int, default=512, help="samples used, from the first (default 512)")
    p.add_argument("--tasks", type=comma_list, default="t2i,t2i-null,i2t",
                   help="comma-separated: t2i, t2i-null (the same images after the null prompt), i2t "
                        "(default all three)")
    p.add_argument("--max-text-len", type=int, default=40, help="text tokens kept per caption (default 40, "
                                                                "as the built-in recipe trains)")
    p.set_defaults(func=run_loss)

    p = verbs.add_parser("prompt-probe", help="which parts of a prompt a model reads, by likelihood",
                         description="For held-out MARS-Shapes scenes, score the image's codes after its canonical "
                                     "prompt and after a counterfactual one that changes one fact (colour, count, "
                                     "relation, its axis, size, binding), and both prompts read as the image's "
                                     "caption. Prints, for drawing and for reading, the mean gap in nats (0 = the "
                                     "model ignores that fact) and the fraction of scenes whose own prompt wins (0.5 "
                                     "= chance). No sampling: seconds on a CPU.")
    _add_model_args(p)
    p.add_argument("--n", type=int, default=48, help="scenes per probe and language (default 48)")
    p.add_argument("--seed", type=int, default=0, help="scene seed (default 0)")
    p.add_argument("--lang", choices=("en", "zh", "both"), default="both", help="prompt language (default both)")
    p.add_argument("--json", default=None, help="also write the summary and every scene's gap here")
    p.set_defaults(func=run_prompt_probe_cli)

    p = verbs.add_parser("fid", help="Frechet distance between two image sets",
                         description="Frechet distance between image folders (searched recursively) or .npz "
                                     "statistics (mu, sigma). Default features: EfficientNet-Lite0 (no download; "
                                     "comparable only with itself). --features inception is the standard FID "
                                     "(pytorch-fid's network; needs --weights pt_inception-2015-12-05-6726825d.pth).")
    p.add_argument("--real", required=True, help="reference images: folder or .npz")
    p.add_argument("--fake", default=None, help="generated images: folder or .npz")
    p.add_argument("--features", choices=("effnet-lite0", "inception"), default="effnet-lite0",
                   help="feature network (default effnet-lite0)")
    p.add_argument("--weights", default=None, help="Inception weights file (pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--batch-size", type=int, default=50, help="images per forward pass (default 50)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--save-stats", default=None, metavar="NPZ",
                   help="write the statistics of --real to this .npz (then --fake is optional)")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.set_defaults(func=run_fid)

    p = verbs.add_parser("clip-score", help="CLIP score of images against their prompts (needs CLIP weights)",
                         description="Mean 100 * max(cos(image, text), 0) with a CLIP model in Hugging Face format "
                                     "(a folder with config.json, the weights and the tokenizer files, e.g. a local "
                                     "copy of openai/clip-vit-base-patch32).")
    p.add_argument("--manifest", required=True,
                   help="JSONL with one {\"file\": ..., \"prompt\"|\"caption\": ...} per image, files relative to it "
                        "(mars generate's manifest.jsonl, mars eval coco's prompts.jsonl)")
    p.add_argument("--clip", default=None, help="CLIP model folder (Hugging Face format)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.set_defaults(func=run_clip_score)

    p = verbs.add_parser("coco", help="COCO-30K: generate images for val2014 captions, then FID",
                         description="Draw N val2014 images with --seed, one caption each (prompts.jsonl), "
                                     "generate OUT/images/NNNNN.png at --image-size, and, given a reference, "
                                     "compute FID.")
    _add_sampling_args(p, "seed of the caption draw and of the images (default 0)")
    p.add_argument("--captions", required=True, help="captions_val2014.json")
    p.add_argument("--n", type=int, default=30000, help="number of images (default 30000)")
    p.add_argument("--out-dir", required=True, help="output folder")
    p.add_argument("--image-size", type=int, default=256, help="saved image side (default 256)")
    p.add_argument("--coco-images", default=None,
                   help="val2014 image folder: also write the chosen pictures, centre-cropped, to OUT/reference")
    p.add_argument("--reference", default=None,
                   help="reference folder or .npz for FID (default OUT/reference when --coco-images is given)")
    p.add_argument("--features", choices=("effnet-lite0", "inception"), default="effnet-lite0",
                   help="FID feature network (default effnet-lite0)")
    p.add_argument("--weights", default=None, help="Inception weights file for --features inception")
    p.set_defaults(func=run_coco)

    p = verbs.add_parser("geneval-sample", help="generate GenEval's image folders",
                         description="For line i of evaluation_metadata.jsonl write OUT/{i:05d}/metadata.jsonl and "
                                     "OUT/{i:05d}/samples/{k:05d}.png (GenEval's diffusers_generate.py layout).")
    _add_sampling_args(p, "base seed; image j gets seed + j (default 0)")
    p.add_argument("--metadata", required=True, help="GenEval evaluation_metadata.jsonl")
    p.add_argument("--out-dir", required=True, help="output folder")
    p.add_argument("--n-samples", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--grid", action="store_true", help="also write OUT/{i:05d}/grid.png")
    p.set_defaults(func=run_geneval_sample)

    p = verbs.add_parser("t2i-compbench-sample", help="generate T2I-CompBench's samples/ folder",
                         description="For each prompt of a T2I-CompBench file (e.g. color_val.txt) write "
                                     "OUT/samples/{prompt}_{j:06d}.png, j counting images over the whole file.")
    _add_sampling_args(p, "base seed; image j gets seed + j (default 0)")
    p.add_argument("--prompts", required=True, help="T2I-CompBench prompt file (one prompt per line)")
    p.add_argument("--out-dir", required=True, help="output folder")
    p.add_argument("--n-samples", type=int, default=10, help="images per prompt (default 10)")
    p.set_defaults(func=run_compbench_sample)


# --------------------------------------------------------------------------- handlers

def run_shapes(args: argparse.Namespace) -> int:
    from mars.eval.runner import check_settings, resolve_shard
    from mars.eval.shapes_eval import RESULTS_FILE, diagnostics_table, run_shapes_eval, shapes_items, summary_table

    shard = resolve_shard(args.shard)
    shapes_items(args.n_per_category, args.seed, _langs(args.lang), args.categories)  # argument errors before loading
    generate, settings = _generator(args)
    check_settings(args.out_dir, settings)
    results = run_shapes_eval(generate, args.out_dir, args.n_per_category, args.seed, _langs(args.lang),
                              args.batch_size, shard, settings, args.categories)
    if results is not None:
        print(summary_table(results["summary"]))
        print(diagnostics_table(results["diagnostics"]))
        print(f"verdicts of every image: {Path(args.out_dir) / RESULTS_FILE}")
    return 0


def run_captions(args: argparse.Namespace) -> int:
    from mars.eval.captions_eval import RESULTS_FILE, relations_line, run_captions_eval, summary_table
    from mars.generate import CaptionConfig, with_given

    if args.n < 1 or args.rerank < 1:
        raise MarsError(f"--n and --rerank must be >= 1, got {args.n} and {args.rerank}")
    # bad values refused before the model loads
    with_given(CaptionConfig(), cfg_scale=args.cfg_scale, plausibility=args.plausibility, refine=args.refine)
    pipe, _ = _load_pipeline(args)
    guidance = pipe.caption_settings(args.cfg_scale, args.plausibility, args.refine)
    results = run_captions_eval(lambda images, lang: pipe.caption(images, lang=lang, cfg_scale=guidance.cfg_scale,
                                                                  plausibility=guidance.plausibility,
                                                                  rerank=args.rerank, refine=guidance.refine),
                                args.out_dir, args.n, args.seed, _langs(args.lang), args.batch_size,
                                settings=dataclasses.asdict(guidance) | {"rerank": args.rerank})
    print(summary_table(results["summary"]))
    if results["relations"]:
        print(relations_line(results["relations"]))
    print(f"every caption: {Path(args.out_dir) / RESULTS_FILE}")
    return 0


def run_loss(args: argparse.Namespace) -> int:
    from mars.data.shards import open_shards
    from mars.eval.io import format_table
    from mars.eval.loss_eval import heldout_loss

    pipe, _ = _load_pipeline(args)
    dataset = open_shards(args.shards, expect_text_tokenizer=pipe.tokenizer,
                          expect_image_tokens=pipe.model.config.image_tokens)
    results = heldout_loss(pipe.model, pipe.tokenizer, dataset, args.n, args.batch_size, args.tasks,
                           max_text_len=args.max_text_len)
    print(format_table(["task", "loss (nats/token)", "perplexity", "tokens"],
                       [[t, r["loss"], r["perplexity"], r["tokens"]] for t, r in results.items()]))
    if "t2i" in results and "t2i-null" in results:
        t2i = results["t2i"]
        gain = results["t2i-null"]["loss"] - t2i["loss"]
        print(f"the prompt lowers the T2I loss by {gain:.3f} nats/token "
              f"({gain * t2i['tokens'] / t2i['images']:.1f} nats per image)")
    return 0


def run_prompt_probe_cli(args: argparse.Namespace) -> int:
    from mars.eval.io import format_table, write_json_atomic
    from mars.eval.prompt_probe import run_prompt_probe
    from mars.pipeline import AS_WRITTEN

    pipe, model_path = _load_pipeline(args)
    result = run_prompt_probe(pipe.model, pipe.tokenizer, pipe.vq, n=args.n, langs=_langs(args.lang),
                              seed=args.seed, batch_size=args.batch_size, restate=pipe.model_prompt)
    if pipe.prompt_order != AS_WRITTEN:
        print(f"prompts read as the model reads them (prompt_order {pipe.prompt_order!r})")
    rows = [[probe, lang, r["gap"], r["median_gap"], r["preferred"], r["read_gap"], r["read_preferred"]]
            for probe, by_lang in result["summary"].items() for lang, r in by_lang.items()]
    print(format_table(["probe", "lang", "draws: gap (nats/image)", "median gap", "own prompt preferred",
                        "reads: gap (nats/caption)", "own caption preferred"], rows))
    if args.json:
        write_json_atomic(args.json, {"model": model_path, "n": args.n, "seed": args.seed,
                                      "prompt_order": pipe.prompt_order, **result})
    return 0


def _print_fid(result: dict, json_path: str | None) -> None:
    from mars.eval.io import format_table, write_json_atomic

    print(format_table(["metric", "features", "n_real", "n_fake", "value"],
                       [["FD", result["features"], result["n_real"] or "?", result["n_fake"] or "?", result["fid"]]]))
    if json_path:
        write_json_atomic(json_path, result)


def run_fid(args: argparse.Namespace) -> int:
    from mars.eval.fid import build_features, fid, save_statistics, set_statistics

    if args.fake is None and args.save_stats is None:
        raise MarsError("give --fake (to compute FID) or --save-stats (to save the statistics of --real)")
    features = build_features(args.features, args.weights, _device(args.device))
    if args.save_stats:
        mu, sigma, n = set_statistics(args.real, features, args.batch_size)
        save_statistics(args.save_stats, mu, sigma, n, features.name)
        print(f"statistics of {n} images written to {args.save_stats}")
        if args.fake is None:
            return 0
        args.real = args.save_stats  # do not compute them twice
    _print_fid(fid(args.real, args.fake, features, args.batch_size), args.json)
    return 0


def run_clip_score(args: argparse.Namespace) -> int:
    from mars.eval.clip_score import clip_score_manifest
    from mars.eval.io import format_table, write_json_atomic

    result = clip_score_manifest(args.manifest, args.clip, args.batch_size, _device(args.device))
    print(format_table(["metric", "n", "value"], [["CLIP score", result["n"], result["clip_score"]]]))
    if args.json:
        write_json_atomic(args.json, result)
    return 0


def run_coco(args: argparse.Namespace) -> int:
    from mars.eval.fid import build_features, fid
    from mars.eval.runner import check_settings, resolve_shard
    from mars.eval.suites import coco_selection
    from mars.eval.suites import run_coco as generate_coco

    shard = resolve_shard(args.shard)
    if args.image_size < 1:
        raise MarsError(f"--image-size must be >= 1, got {args.image_size}")
    coco_selection(args.captions, args.n, args.seed)  # argument errors before loading the model
    generate, settings = _generator(args)
    check_settings(args.out_dir, {**settings, "image_size": args.image_size})
    selection = generate_coco(generate, args.captions, args.out_dir, args.n, args.seed, args.image_size,
                              args.batch_size, shard, args.coco_images)
    out = Path(args.out_dir)
    missing = [s["file"] for s in selection if not (out / s["file"]).is_file()]
    reference = args.reference or (str(out / "reference") if args.coco_images else None)
    if missing:
        print(f"{len(missing)} of {len(selection)} images are not there yet (other shards?); "
              "run `mars eval fid` once every shard is done")
    elif reference is None:
        print(f"{len(selection)} images in {out / 'images'}; give --reference (or --coco-images) for FID")
    else:
        features = build_features(args.features, args.weights, _device(args.device))
        _print_fid(fid(reference, out / "images", features), str(out / "fid.json"))
    return 0


def _print_run(suite: str, jobs, n_samples: int, out_dir: str, settings: dict) -> None:
    """Table of a suite run (prompts, images done) and the same numbers in OUT/run_summary.json."""
    from mars.eval.io import format_table, write_json_atomic

    prompts = len(jobs) // n_samples
    done = sum(job.path.is_file() for job in jobs)
    print(format_table(["suite", "prompts", "images", "done"], [[suite, prompts, len(jobs), done]]))
    write_json_atomic(Path(out_dir) / "run_summary.json",
                      {"suite": suite, "prompts": prompts, "images": len(jobs), "done": done, "settings": settings})


def run_geneval_sample(args: argparse.Namespace) -> int:
    from mars.eval.runner import check_settings, resolve_shard
    from mars.eval.suites import read_geneval_metadata, run_geneval

    shard = resolve_shard(args.shard)
    read_geneval_metadata(args.metadata)
    generate, settings = _generator(args)
    check_settings(args.out_dir, {**settings, "n_samples": args.n_samples})
    jobs = run_geneval(generate, args.metadata, args.out_dir, args.n_samples, args.seed, args.batch_size, shard,
                       args.grid)
    _print_run("geneval", jobs, args.n_samples, args.out_dir, settings)
    print(f"score them with GenEval: python evaluation/evaluate_images.py {args.out_dir}")
    return 0


def run_compbench_sample(args: argparse.Namespace) -> int:
    from mars.eval.runner import check_settings, resolve_shard
    from mars.eval.suites import read_compbench_prompts, run_compbench

    shard = resolve_shard(args.shard)
    read_compbench_prompts(args.prompts)
    generate, settings = _generator(args)
    check_settings(args.out_dir, {**settings, "n_samples": args.n_samples})
    jobs = run_compbench(generate, args.prompts, args.out_dir, args.n_samples, args.seed, args.batch_size, shard)
    _print_run("t2i-compbench", jobs, args.n_samples, args.out_dir, settings)
    print(f"score them with T2I-CompBench, e.g. python BLIPvqa_eval/BLIP_vqa.py --out_dir {args.out_dir}/")
    return 0

