"""`mars preprocess`: encode a data set into VQ code shards for training (see mars/data/preprocess.py)."""

from __future__ import annotations

import os

from mars.errors import MarsError


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "preprocess", help="encode images and captions into VQ code shards for training",
        description="Encode every image of --data into VQ codes and every caption into text ids, "
                    "written as memory-mappable shards plus index.json under --out. Re-running with the "
                    "same arguments resumes an interrupted run. Under torchrun (RANK / WORLD_SIZE set) "
                    "each rank encodes the shards s with s % WORLD_SIZE == RANK; the output is the same "
                    "as a single-process run. On a CPU shared with other jobs, OMP_NUM_THREADS=1 is "
                    "much faster than several threads that wait on each other.")
    p.add_argument("--tokenizer", required=True, help="VQ tokenizer directory, or a MARS model directory (its vq/)")
    p.add_argument("--text-tokenizer", required=True,
                   help="text tokenizer: qwen, bytes, or a folder with tokenizer.json (or a MARS model's tokenizer/)")
    p.add_argument("--data", required=True,
                   help="data source: shapes:N[:SEED], a folder, a .jsonl manifest or webdataset .tar shards")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--shard-size", type=int, default=4096, help="samples per shard (default 4096)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per tokenizer batch (default: 32 on a GPU, 1 on CPU, where every large "
                        "batch of 256 px activations is fresh memory to page in, which costs more than it saves)")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader processes that read and resize images (default 0: in the main process)")
    p.add_argument("--device", default=None, help="device of the tokenizer (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier run's shards in --out first")
    p.set_defaults(func=run)


def _rank_from_env() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them; (0, 1) without torchrun."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise MarsError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} "
                        "are not integers") from None


def run(args) -> int:
    import torch

    from mars.data.preprocess import preprocess
    from mars.text_tokenizer import load_text_tokenizer
    from mars.vq import load_tokenizer

    rank, world = _rank_from_env()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    vq = load_tokenizer(args.tokenizer, device=device)
    text_tokenizer = load_text_tokenizer(args.text_tokenizer)
    batch_size = args.batch_size or (32 if device.startswith("cuda") else 1)
    result = preprocess(vq, text_tokenizer, args.data, args.out, resolution=args.resolution,
                        shard_size=args.shard_size, batch_size=batch_size, workers=args.workers,
                        rank=rank, world_size=world, overwrite=args.overwrite)
    who = f"rank {rank}: " if world > 1 else ""
    print(f"{who}encoded {result.images} images in {result.shards_written} shards in {result.seconds:.1f} s "
          f"({result.images_per_second:.1f} images/s)")
    print(f"{who}{result.skips}")
    if result.index_written:
        print(f"wrote {os.path.join(args.out, 'index.json')}")
    else:
        print(f"{who}other ranks' shards are not finished; the last rank to finish writes index.json")
    return 0
