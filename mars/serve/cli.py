"""`mars serve`: the HTTP API and the web page for one model."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from mars.errors import MarsError


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve the HTTP API and the web page",
        description="Serve a model over HTTP: POST /v1/images/generations, POST /v1/captions, GET /health, "
                    "GET /v1/models, the web page at /, and the OpenAPI schema at /openapi.json. "
                    "Concurrent requests are batched on one worker thread that owns the model.",
    )
    p.add_argument("--model", default=None, help="model folder or built-in name (default: shapes-demo)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000, help="default: 8000")
    p.add_argument("--max-batch-size", type=int, default=8, help="most images (or captions) per batch, also the "
                   "most images one request may ask for (default: 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="most images waiting; beyond it requests get 503 (default: 64)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch waits to fill up (default: 10)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the image decode step (on CUDA it is replayed as a CUDA graph either way): "
                        "~1.8x faster single images on a CPU; each new batch size compiles once, on first use")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise MarsError(f"--port must lie in 0..65535, got {args.port}")
    if args.max_batch_size < 1:
        raise MarsError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if args.max_queue < args.max_batch_size:
        raise MarsError(f"--max-queue ({args.max_queue}) must be >= --max-batch-size ({args.max_batch_size})")
    if args.batch_wait_ms < 0:
        raise MarsError(f"--batch-wait-ms must be >= 0, got {args.batch_wait_ms}")
    try:
        import uvicorn

        from mars.serve.app import create_app
    except ImportError as err:
        raise MarsError(f"serving needs the serve extra: pip install 'mars[serve]' ({err.name} is missing)") from None
    from mars.model_dir import DEFAULT_MODEL, resolve_model_path
    from mars.pipeline import MarsPipeline

    name = args.model or DEFAULT_MODEL
    resolve_model_path(name)  # a clear error before anything heavy loads
    pipeline = MarsPipeline.from_pretrained(name, device=args.device)
    # the API names a model by its folder's name, not its path on this machine
    app = create_app(pipeline, model_name=Path(str(name)).name, max_batch_size=args.max_batch_size,
                     max_queue=args.max_queue, batch_wait_ms=args.batch_wait_ms, compile=args.compile)
    if not _is_loopback(args.host):
        print(f"warning: binding {args.host}: the server is reachable from other machines", file=sys.stderr)
    print(f"serving {name} on http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
