"""``deeplab serve (--checkpoint MODEL | --model NAME) [--host 127.0.0.1] [--port 8000] [--workers N]``: the web page
and HTTP API of :mod:`deeplab.serve.app` (extra ``[serve]``: FastAPI + uvicorn).

MODEL is a deeplab checkpoint or a file from ``deeplab export`` (``--backend`` as in
``deeplab predict``); NAME a model of the zoo (``deeplab weights list``), fetched on first use. The server binds to loopback unless ``--host`` says otherwise; it has no
authentication, so put a reverse proxy in front of it before opening it to a network.
``--workers N`` starts N server processes (uvicorn), each with its own model and queue.
"""

from __future__ import annotations

import argparse
import inspect
import ipaddress
import json
import os
import sys
from typing import Any, Dict, List, Optional

from deeplab._utils import optional_import
from deeplab.cli.common import (
    CLIError,
    add_inference_args,
    add_model_source_args,
    add_runtime_args,
    cli_command,
    inference_config,
    resolve_model_source,
)

# Worker processes (--workers > 1) re-read the command line from here: uvicorn imports the app
# by name in each of them.
ARGV_ENV = "DEEPLAB_SERVE_ARGV"
WORKER_STARTUP_S = 300


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deeplab serve",
        description="Serve a model: a web page at / and an HTTP API (POST /v1/segment, GET /v1/model, /healthz, /docs).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_source_args(parser, what="deeplab checkpoint (.pt) or exported model (.onnx / TorchScript)")
    add_runtime_args(parser, threads=False)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed)")
    parser.add_argument("--workers", type=int, default=1, help="server processes, each with its own model and queue")
    parser.add_argument("--queue", type=int, default=8, help="requests waiting or running per worker; one more gets 503 + Retry-After")
    parser.add_argument("--max-bytes", type=int, default=20 * 1024 * 1024, help="largest upload in bytes (413 above)")
    parser.add_argument("--max-pixels", type=int, default=16_000_000, help="largest image, width x height (413 above)")
    add_inference_args(parser)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads per worker (default: all cores)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's log level (access lines at info)")
    return parser


def load_segmenter(args: argparse.Namespace) -> Any:
    """The served :class:`~deeplab.segmenter.Segmenter` from the flags: the one place a model
    source is turned into a model (the zoo's ``--model NAME`` is resolved here too).

    Raises:
        CLIError: a missing or unreadable model file, or a bad inference option.
    """
    from deeplab.segmenter import Segmenter

    resolve_model_source(args)  # --model NAME -> its cached checkpoint (fetched on first use)
    return Segmenter.open(args.checkpoint, backend=args.backend, device=args.device, threads=args.threads,
                          inference=inference_config(args))


def make_app(args: argparse.Namespace) -> Any:
    """The FastAPI app of the parsed flags (model loaded, limits set)."""
    import torch

    from deeplab.serve.app import ServeLimits, create_app, describe_model

    if args.threads:
        torch.set_num_threads(args.threads)
    segmenter = load_segmenter(args)
    limits = ServeLimits(max_bytes=args.max_bytes, max_pixels=args.max_pixels, queue_size=args.queue)
    return create_app(segmenter, limits=limits, model_info=describe_model(segmenter, args.model or args.checkpoint))


def worker_app() -> Any:
    """uvicorn's app factory in each ``--workers`` process: the parent's flags from the environment."""
    argv = json.loads(os.environ[ARGV_ENV])
    return make_app(build_parser().parse_args(argv))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_serve_installed() -> None:
    missing = [name for name in ("fastapi", "uvicorn") if optional_import(name) is None]
    if optional_import("python_multipart") is None:  # python-multipart's module (``multipart`` before 0.0.13)
        missing.append("python-multipart")
    if missing:
        raise CLIError(f"deeplab serve needs {', '.join(missing)}: pip install 'deeplab[serve]'")


@cli_command("serve")
def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    check_serve_installed()
    import uvicorn

    for name in ("workers", "queue", "max_bytes", "max_pixels"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    # Load the model here even with --workers N: a bad file is one line now, not N tracebacks.
    app = make_app(args)
    segmenter = app.state.worker.segmenter
    where = f"http://{args.host}:{args.port}/" if ":" not in args.host else f"http://[{args.host}]:{args.port}/"
    print(f"deeplab serve: {args.model or args.checkpoint} ({segmenter.backend}, {segmenter.num_classes} classes) on {where} "
          f"| workers={args.workers} queue={args.queue} max_bytes={args.max_bytes} max_pixels={args.max_pixels}", flush=True)
    if not is_loopback(args.host):
        print(f"deeplab serve: note: bound to {args.host}, reachable from the network; the server has no authentication",
              file=sys.stderr, flush=True)
    if args.workers == 1:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    else:
        del app
        os.environ[ARGV_ENV] = json.dumps(argv)
        options: Dict[str, Any] = {}
        if "timeout_worker_healthcheck" in inspect.signature(uvicorn.Config).parameters:
            # uvicorn kills a worker that does not answer its ping in 5 s; loading a model takes longer
            options["timeout_worker_healthcheck"] = WORKER_STARTUP_S
        uvicorn.run("deeplab.cli.serve:worker_app", factory=True, host=args.host, port=args.port,
                    workers=args.workers, log_level=args.log_level, **options)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
