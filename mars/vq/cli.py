"""`mars tokenizer ...`: train, import, encode, decode, reconstruct and evaluate VQ-GAN tokenizers."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from mars.errors import MarsError

if TYPE_CHECKING:  # torch is imported by the handlers, not when `mars` builds its parser
    import torch


def add_commands(subparsers) -> None:
    """Register `mars tokenizer` and its sub-verbs."""
    tok = subparsers.add_parser("tokenizer", help="the VQ-GAN image tokenizer",
                                description="Train, import, use and evaluate the VQ-GAN image tokenizer. "
                                            "--model takes a tokenizer folder, a MARS model folder (its vq/) "
                                            "or a built-in model name.")
    verbs = tok.add_subparsers(dest="tokenizer_command", metavar="VERB", required=True)

    p = verbs.add_parser("train", help="train a tokenizer from a YAML config",
                         description="Train (or resume, resume=auto) a tokenizer. Writes OUT/ckpt.pt, "
                                     "OUT/metrics.jsonl, OUT/tb and the final tokenizer OUT/final.")
    p.add_argument("config", help="YAML training config (see configs/vq/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=2000 model.codebook_size=1024")
    p.set_defaults(func=run_train)

    p = verbs.add_parser("import", help="convert a taming-transformers VQGAN checkpoint",
                         description="Load a taming-transformers VQModel checkpoint (.ckpt with a state_dict; "
                                     "loss.* keys are dropped) strictly into the architecture --config "
                                     "describes and write a tokenizer folder.")
    p.add_argument("checkpoint", help=".ckpt / .pt / .pth / .safetensors file")
    p.add_argument("--config", required=True,
                   help="preset name (f16-8192, taming-f16-1024, taming-f16-16384, shapes-small, "
                        "shapes-local) or a YAML/JSON file of VQConfig fields")
    p.add_argument("--out", required=True, help="output tokenizer folder")
    p.set_defaults(func=run_import)

    p = verbs.add_parser("encode", help="images -> code grids (.npz or .npy)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--model", required=True, help="tokenizer or MARS model folder, or built-in name")
    p.add_argument("--out", required=True, help="codes.npz (codes, files, tokenizer hash) or codes.npy")
    _add_image_options(p)
    p.set_defaults(func=run_encode)

    p = verbs.add_parser("decode", help="code grids -> PNG images")
    p.add_argument("codes", help=".npz written by encode, or a .npy array (N, h, w) / (h, w)")
    p.add_argument("--model", required=True, help="tokenizer or MARS model folder, or built-in name")
    p.add_argument("--out-dir", required=True, help="folder for the PNGs")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.set_defaults(func=run_decode)

    p = verbs.add_parser("reconstruct", help="round-trip images through the tokenizer",
                         description="Encode and decode each image; NAME.EXT is written as OUT_DIR/NAME.png.")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--model", required=True, help="tokenizer or MARS model folder, or built-in name")
    p.add_argument("--out-dir", required=True, help="folder for the PNGs")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    _add_image_options(p)
    p.set_defaults(func=run_reconstruct)

    p = verbs.add_parser("eval", help="PSNR, SSIM, codebook usage, rFID proxy, shapes-checker agreement",
                         description="Round-trip a data set and report PSNR, SSIM, codebook usage, an rFID "
                                     "proxy (Frechet distance of EfficientNet-Lite0 features) and, for "
                                     "MARS-Shapes data, how often the shapes checker finds the same objects.")
    p.add_argument("--model", required=True, help="tokenizer or MARS model folder, or built-in name")
    p.add_argument("--data", required=True, help="data spec: shapes:N[:SEED], a folder, a .jsonl, .tar shards")
    p.add_argument("--n", type=int, default=None, help="evaluate the first N images (default all)")
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", default=None, help="where to write the JSON report (default MODEL/eval.json "
                                                "for a folder you can write, else ./tokenizer_eval.json)")
    p.add_argument("--checker", choices=("auto", "on", "off"), default="auto",
                   help="shapes-checker agreement (auto: on for shapes: data)")
    p.add_argument("--no-rfid", action="store_true", help="skip the rFID proxy")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.set_defaults(func=run_eval)


def _add_image_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resolution", type=int, default=256,
                   help="images are resized (shorter side) and centre-cropped to this square (default 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")


def _device(name: str) -> torch.device:
    from mars.vq.train import resolve_device

    return resolve_device(name)


def _load(args: argparse.Namespace):
    from mars.vq.io import load_tokenizer

    return load_tokenizer(args.model, device=_device(args.device))


def _check_resolution(model, resolution: int) -> None:
    f = model.config.downsample
    if resolution <= 0 or resolution % f:
        raise MarsError(f"--resolution {resolution} must be a positive multiple of {f}")


def _load_images(paths: list[str], resolution: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, (3, R, R) tensor in [-1, 1]) per usable image; unusable ones are skipped and counted."""
    from mars.data.images import UnusableImage, load_image, pil_to_tensor, resize_center_crop

    skipped = 0
    for path in paths:
        try:
            image = load_image(path)
        except (UnusableImage, OSError) as err:
            skipped += 1
            print(f"warning: skipping {path}: {err}", file=sys.stderr)
            continue
        yield path, pil_to_tensor(resize_center_crop(image, resolution))
    if skipped:
        print(f"warning: skipped {skipped} of {len(paths)} images", file=sys.stderr)


def _batches(items: Iterator[tuple[str, torch.Tensor]], size: int) -> Iterator[tuple[list[str], torch.Tensor]]:
    import torch

    names, tensors = [], []
    for name, tensor in items:
        names.append(name)
        tensors.append(tensor)
        if len(names) == size:
            yield names, torch.stack(tensors)
            names, tensors = [], []
    if names:
        yield names, torch.stack(tensors)


def _output_paths(inputs: list[str], out_dir: Path, overwrite: bool) -> dict[str, Path]:
    """OUT_DIR/NAME.png for each input; refuses name clashes and (without --overwrite) existing files."""
    outputs: dict[str, Path] = {}
    seen: dict[Path, str] = {}
    for path in inputs:
        target = out_dir / (Path(path).stem + ".png")
        if target in seen:
            raise MarsError(f"{path} and {seen[target]} would both be written to {target}")
        if target.exists() and not overwrite:
            raise MarsError(f"{target} exists; pass --overwrite to replace it")
        seen[target] = path
        outputs[path] = target
    return outputs


# ---------------------------------------------------------------------------------------------
# handlers
# ---------------------------------------------------------------------------------------------


def run_train(args: argparse.Namespace) -> None:
    """Handler of `mars tokenizer train`."""
    from mars.vq.train import load_train_config, train

    cfg = load_train_config(args.config, args.overrides)
    model = train(cfg)
    print(f"tokenizer {model.identity_hash()} saved to {Path(cfg.out_dir) / 'final'}")


def run_import(args: argparse.Namespace) -> None:
    """Handler of `mars tokenizer import`."""
    from mars.vq.config import VQConfig
    from mars.vq.io import import_taming_checkpoint

    model = import_taming_checkpoint(args.checkpoint, VQConfig.load(args.config))
    model.save_pretrained(args.out)
    print(f"imported {args.checkpoint} -> {args.out} (tokenizer {model.identity_hash()}, "
          f"f{model.config.downsample}, {model.config.codebook_size} codes)")


def run_encode(args: argparse.Namespace) -> None:
    """Handler of `mars tokenizer encode`."""
    out = Path(args.out)
    if out.suffix not in (".npz", ".npy"):
        raise MarsError(f"--out must end in .npz or .npy, got {out.name}")
    model = _load(args)
    _check_resolution(model, args.resolution)
    files, grids = [], []
    for names, images in tqdm(_batches(_load_images(args.images, args.resolution), args.batch_size),
                              desc="encode", total=-(-len(args.images) // args.batch_size)):
        grids.append(model.encode_to_codes(images).cpu())
        files += names
    if not files:
        raise MarsError("no usable images to encode")
    codes = np.concatenate([grid.numpy() for grid in grids]).astype(np.int32)  # (N, h, w)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, codes)
    else:
        np.savez(out, codes=codes, files=np.array(files), tokenizer=np.array(model.identity_hash()),
                 codes_tokenizer=np.array(model.codes_hash()),
                 codebook_size=np.array(model.config.codebook_size))
    print(f"encoded {len(files)} images -> {out} (codes {tuple(codes.shape)})")


def run_decode(args: argparse.Namespace) -> None:
    """Handler of `mars tokenizer decode`."""
    import torch

    from mars.data.images import tensor_to_pil

    path = Path(args.codes)
    if not path.is_file():
        raise MarsError(f"codes file not found: {path}")
    model = _load(args)
    names = None
    try:
        if path.suffix == ".npz":
            with np.load(path) as data:
                codes = data["codes"]
                names = [str(f) for f in data["files"]] if "files" in data else None
                made_by = str(data["tokenizer"]) if "tokenizer" in data else None
                codes_by = str(data["codes_tokenizer"]) if "codes_tokenizer" in data else None
        else:
            codes, made_by, codes_by = np.load(path), None, None
    except (ValueError, KeyError, OSError) as err:
        raise MarsError(f"cannot read codes from {path}: {err}") from None
    if made_by is not None and made_by != model.identity_hash() and codes_by != model.codes_hash():
        raise MarsError(f"{path} was encoded by tokenizer {made_by}, but {args.model} is "
                        f"{model.identity_hash()}; decode with the tokenizer that made the codes")
    if codes.ndim == 2:
        codes = codes[None]
    if codes.ndim != 3 or not np.issubdtype(codes.dtype, np.integer):
        raise MarsError(f"{path}: expected integer codes of shape (N, h, w), got {codes.dtype} {codes.shape}")
    if codes.min() < 0 or codes.max() >= model.config.codebook_size:
        raise MarsError(f"{path}: codes must lie in [0, {model.config.codebook_size})")
    names = names or [f"{i:05d}" for i in range(codes.shape[0])]
    out_dir = Path(args.out_dir)
    targets = _output_paths(names, out_dir, args.overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensor = torch.from_numpy(codes.astype(np.int64))
    for start in tqdm(range(0, len(names), 8), desc="decode"):
        images = model.decode_codes(tensor[start:start + 8])
        for name, image in zip(names[start:start + 8], images, strict=True):
            tensor_to_pil(image).save(targets[name])
    print(f"decoded {len(names)} images -> {out_dir}")


def run_reconstruct(args: argparse.Namespace) -> None:
    """Handler of `mars tokenizer reconstruct`."""
    from mars.data.images import tensor_to_pil

    out_dir = Path(args.out_dir)
    targets = _output_paths(args.images, out_dir, args.overwrite)
    model = _load(args)
    _check_resolution(model, args.resolution)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = 0
    for names, images in tqdm(_batches(_load_images(args.images, args.resolution), args.batch_size),
                              desc="reconstruct", total=-(-len(args.images) // args.batch_size)):
        recon = model.decode_codes(model.encode_to_codes(images))
        for name, image in zip(names, recon, strict=True):
            tensor_to_pil(image).save(targets[name])
            done += 1
    print(f"reconstructed {done} images -> {out_dir}")


def run_eval(args: argparse.Namespace) -> None:
    """Handler of `mars tokenizer eval`."""
    from mars.vq.evaluate import evaluate_reconstruction, source_images, write_report

    model = _load(args)
    _check_resolution(model, args.resolution)
    if args.n is not None and args.n <= 0:
        raise MarsError(f"--n must be positive, got {args.n}")
    checker = args.checker == "on" or (args.checker == "auto" and args.data.startswith("shapes:"))
    images, total = source_images(args.data, args.resolution, args.n)
    report = evaluate_reconstruction(model, images, batch_size=args.batch_size, rfid=not args.no_rfid,
                                     checker=checker, total=total)
    print(f"tokenizer {model.identity_hash()} on {args.data}")
    print(report.table())
    if args.json:
        target = Path(args.json)
    else:
        folder = Path(args.model)
        target = folder / "eval.json" if folder.is_dir() and os.access(folder, os.W_OK) else Path("tokenizer_eval.json")
    write_report(report, target)
    print(f"wrote {target}")

