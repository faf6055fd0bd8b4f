"""``ldm serve``: the HTTP API and web page (``ldm.serve``), run by uvicorn.

FastAPI and uvicorn are the optional ``serve`` extra; without them the command says which extra to install
(one line, exit status 2) before anything loads.
"""

from __future__ import annotations

import argparse
import sys

from ldm.cli.options import UsageError, add_model_arguments, add_vae_argument, positive_int

EXTRA_HINT = "ldm serve needs FastAPI and uvicorn: pip install 'ldm-diffusion[serve]' (from a checkout: " \
             "pip install -e \".[serve]\")"


def port_number(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (1-65535)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_vae_argument(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=port_number, default=7860, help="TCP port (default 7860, as A1111)")
    parser.add_argument("--data", metavar="DIR", default="ldm-serve",
                        help="folder for the job queue (SQLite) and the images (default ./ldm-serve); a restart "
                             "with the same folder finishes the jobs a killed server left")
    parser.add_argument("--api-key", metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on every request (default: none)")
    parser.add_argument("--max-queue", type=positive_int, default=100, metavar="N",
                        help="unfinished jobs the queue holds before answering 429 (default 100)")
    parser.add_argument("--max-size", type=positive_int, default=1024, metavar="PX",
                        help="largest width or height a request may ask for (default 1024)")
    parser.add_argument("--max-steps", type=positive_int, default=150, metavar="N",
                        help="most sampler steps a request may ask for (default 150)")
    parser.add_argument("--control-dir", metavar="DIR",
                        help="folder of ControlNet / T2I-Adapter files that A1111 ControlNet units name (by stem)")
    parser.epilog = "--device takes a comma-separated list (cuda:0,cuda:1): one worker per device."


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401 - only to tell the user what is missing
        import uvicorn
    except ImportError:
        raise UsageError(EXTRA_HINT) from None

    from ldm.serve import Server, ServeSettings
    from ldm.serve.app import create_app

    devices = tuple(d.strip() or None for d in args.device.split(",")) if args.device else (None,)
    settings = ServeSettings(model=args.model, host=args.host, port=args.port, data=args.data,
                             api_key=args.api_key, max_queue=args.max_queue, max_size=args.max_size,
                             max_steps=args.max_steps, devices=devices, dtype=args.dtype, vae=args.vae,
                             control_dir=args.control_dir,
                             models_dir=args.models_dir)
    server = Server(settings)
    again = f", {server.recovered} unfinished jobs resumed" if server.recovered else ""
    print(f"ldm serve: http://{args.host}:{args.port} (model {server.model_card()['model_name']}, "
          f"{len(server.workers)} worker(s), data {args.data}{again})", file=sys.stderr, flush=True)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0
