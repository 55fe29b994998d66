"""`multimodal serve`: a search page and JSON API over an embedding folder or an index (docs/serve.md).

Everything a user can get wrong is found before the server answers its first request, each as one sentence:
the arguments, the folder, the port (bound before the model loads), the model against the folder's
embeddings, and the images the thumbnails are read from.
"""

import argparse
import errno
import ipaddress
import os
import re
import socket
import sys
from pathlib import Path

from multimodal.cli.args import add_checkpoint_args, check_counts, check_weights, load_model, weights_given
from multimodal.errors import UserError
from multimodal.paths import check_input

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
TOKEN_VARIABLE = "MULTIMODAL_SERVE_TOKEN"  # the token without putting it on the command line, which `ps` shows


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multimodal serve", description="Serve a search page and a JSON API over "
                                     "an embedding folder or an index.")
    parser.add_argument("--index", type=Path, required=True,
                        help="an embedding folder from `multimodal embed` (searched exactly) or an index folder from "
                             "`multimodal index` (faiss)")
    add_checkpoint_args(parser, required=False, help="model for the queries (default: the one that made the index)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1, this machine only; another prints a warning)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free one)")
    parser.add_argument("--token", default=None,
                        help="require 'Authorization: Bearer TOKEN' on every request (the page: open /#token=TOKEN); "
                             f"default: the environment variable {TOKEN_VARIABLE}, if set")
    parser.add_argument("--max_upload_mb", type=int, default=16, help="largest image upload, in MiB (default 16)")
    parser.add_argument("--max_batch", type=int, default=64,
                        help="most queries encoded together in one batch (default 64)")
    return parser


def serve(argv: list[str]) -> int:
    args = serve_parser().parse_args(argv)
    token = args.token if args.token is not None else os.environ.get(TOKEN_VARIABLE) or None
    check_counts(args, positive=("max_upload_mb", "max_batch"))
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be from 0 to 65535, got {args.port}.")
    if token is not None and not re.fullmatch(r"[A-Za-z0-9._~+/=-]{1,512}", token):
        raise UserError(f"--token (or {TOKEN_VARIABLE}) must be 1 to 512 letters, digits and ._~+/=- (what "
                        "`openssl rand -hex 24` prints will do).")
    check_input(args.index, "Index", "pass a folder written by `multimodal embed` or `multimodal index` with --index",
                "folder")
    if not (args.index / "info.json").is_file():  # both kinds of folder have one
        raise UserError(f"{args.index} is neither an embedding folder (`multimodal embed --out`) nor an index folder "
                        "(`multimodal index --out`): pass one of those with --index.")
    check_weights(args)
    if args.host not in LOCAL_HOSTS:
        print(f"warning: --host {args.host} lets other machines reach this server"
              f"{'' if token else ' and search the index with no password: add --token'}; "
              "it speaks plain HTTP, unencrypted.", file=sys.stderr, flush=True)
    sock = bind(args.host, args.port)
    try:
        return run(args, sock, token)
    finally:
        sock.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one sentence: the port in use, the address not this machine's."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise UserError(f"--host {host} is not an address of this machine ({exc.strerror}).") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"Port {port} on {host} is in use (another server?): choose another --port, or stop the "
                            "one using it.") from None
        raise UserError(f"Cannot listen on {host} port {port} ({exc.strerror}): choose another --host or --port.") \
            from None
    return sock


def run(args: argparse.Namespace, sock: socket.socket, token: str | None) -> int:
    import torch
    import uvicorn

    from multimodal import weights
    from multimodal.eval.search import check_query_model
    from multimodal.serve.app import create_app
    from multimodal.serve.engine import Engine, open_targets
    from multimodal.serve.thumbnails import for_target

    targets = open_targets(args.index)
    info = next(iter(targets.values())).collection.info
    check_query_model(info, args.index, args.checkpoint, args.model, args.pretrained)
    thumbnails = for_target(targets["images"], args.index) if "images" in targets else None
    model = load_model(args) if weights_given(args) else \
        weights.load_model(info["checkpoint"], args.model or info["model"], pretrained=info.get("pretrained"),
                           cache_dir=args.cache_dir, setting="--{}")
    # The model's thread leaves a core to the HTTP side: on this project's 2-core machine, two torch threads
    # beside the event loop made a batch 4x slower than one (docs/serve.md).
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))
    engine = Engine(model, targets, args.index)
    app = create_app(engine, thumbnails, token, args.max_upload_mb << 20, args.max_batch)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    rows = ", ".join(f"{t.count:,} {name} ({t.how})" for name, t in targets.items())
    print(f"Serving {rows} of {args.index} at http://{shown}:{port}/"
          f"{'#token=' + token if token else ''} (Ctrl-C stops).", flush=True)
    if thumbnails is not None and thumbnails.remote:
        print(f"{len(thumbnails.remote)} shards or files are not on this machine (such as "
              f"{next(iter(thumbnails.remote))}): their images have no thumbnails.", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3,
                            server_header=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down on Ctrl-C, then raises it again: the way a server is stopped
        pass
    print("Stopped.", flush=True)
    return 0
