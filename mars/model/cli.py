"""`mars init`: a MARS model folder from a Hugging Face Qwen (v1) / Qwen2 / Llama checkpoint;
`mars average`: the weight average of MARS models of one architecture."""

from __future__ import annotations

import argparse
import time

from mars.model.dtypes import DTYPE_NAMES, torch_dtype


def add_commands(subparsers) -> None:
    """Register `mars init` and `mars average`."""
    init = subparsers.add_parser(
        "init", help="make a MARS model from a Qwen / Qwen2 / Llama checkpoint",
        description="Convert a local Hugging Face checkpoint folder (config.json + safetensors or .bin "
                    "weights + tokenizer) into a MARS model folder: the LLM becomes the frozen language "
                    "expert of every layer, the visual experts start as its copies and the new image / "
                    "special vocabulary rows as the mean of its text rows.")
    init.add_argument("--backbone", required=True, metavar="HF_DIR", help="Hugging Face checkpoint folder")
    init.add_argument("--out", required=True, metavar="DIR", help="MARS model folder to write")
    init.add_argument("--image-vocab-size", type=int, default=8192,
                      help="VQ codebook size: image-code rows added to the vocabulary (default 8192)")
    init.add_argument("--image-size", type=int, default=256,
                      help="default generation resolution in pixels; the VQ-GAN downsamples it 16x (default 256)")
    init.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                      help="weight dtype of the written model (default: the checkpoint's)")
    init.add_argument("--max-seq-len", type=int, default=None,
                      help="context length recorded in the config (default: the checkpoint's)")
    init.add_argument("--overwrite", action="store_true", help="replace a model already in DIR")
    init.set_defaults(func=run_init)

    average = subparsers.add_parser(
        "average", help="average the weights of MARS models of one architecture (a model soup)",
        description="Write the (weighted) average of the weights of two or more MARS model folders with the "
                    "same config, e.g. checkpoints of one run or fine-tunes of one model; tokenizer/, vq/ and "
                    "generation_config.json come from the first model.")
    average.add_argument("models", nargs="+", metavar="MODEL_DIR", help="model folders to average")
    average.add_argument("--out", required=True, metavar="DIR", help="model folder to write")
    average.add_argument("--weights", type=float, nargs="+", default=None,
                         help="one weight per model, summing to 1 (default: uniform)")
    average.add_argument("--overwrite", action="store_true", help="replace a model already in DIR")
    average.set_defaults(func=run_average)


def run_average(args: argparse.Namespace) -> None:
    from mars.model.average import average_models

    out = average_models(args.models, args.out, args.weights, overwrite=args.overwrite)
    print(f"wrote {out}: the average of {len(args.models)} models")


def run_init(args: argparse.Namespace) -> None:
    from mars.model.convert import init_model_dir, parameter_counts

    start = time.time()
    print(f"converting {args.backbone} ...", flush=True)
    model = init_model_dir(args.backbone, args.out, image_vocab_size=args.image_vocab_size, image_size=args.image_size,
                           dtype=torch_dtype(args.dtype) if args.dtype else None, max_seq_len=args.max_seq_len,
                           overwrite=args.overwrite)
    cfg = model.config
    counts = parameter_counts(model)
    dtype = next(model.parameters()).dtype
    print(f"backbone: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads "
          f"({cfg.num_kv_heads} kv) x {cfg.head_dim}, FFN {cfg.intermediate_size}, {cfg.text_vocab_size} text rows, "
          f"{dtype}")
    print(f"vocabulary: {cfg.text_vocab_size} text + {cfg.image_vocab_size} image codes + "
          f"{cfg.num_special_tokens} specials = {cfg.vocab_size}")
    print(f"parameters: {counts['total']:,} total, {counts['trainable']:,} trainable "
          f"(visual experts {counts['visual_expert']:,} + new vocabulary rows {counts['new_vocab']:,}), "
          f"{counts['frozen']:,} frozen")
    print(f"wrote {args.out} in {time.time() - start:.1f}s")
