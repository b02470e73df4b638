"""`tokenreduce demo`: the streaming demo web page (the `demo` extra: fastapi, uvicorn, python-multipart).

    pip install -e ".[demo]"
    tokenreduce demo --host 127.0.0.1 --port 8000      # then open http://127.0.0.1:8000

The app itself is `tokenreduce.stream.demo.app.create_app`; this module only holds the command, so the CLI can
list it without the extra installed.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-upload-mb", type=float, default=50.0, help="largest video upload accepted (default 50)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")


def main(args: argparse.Namespace) -> int:
    from tokenreduce.errors import InputError

    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  (uploads)
        import uvicorn
    except ImportError as e:
        raise InputError(f"the demo needs the demo extra ({e.name} is missing): pip install 'tokenreduce[demo]'"
                         ) from None
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be in 1..65535, got {args.port}")
    if args.max_upload_mb <= 0:
        raise InputError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    from .app import create_app

    app = create_app(max_upload_mb=args.max_upload_mb)
    print(f"tokenreduce demo on http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
