"""The server side of the `llamagrid` command: make-tiny-model, worker, keys and up. Each imports its server
modules only when it runs, so the client-only install (no torch, no redis) can still import the CLI."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

DEFAULT_HOME = Path(os.environ.get("LLAMAGRID_HOME", Path.home() / ".cache" / "llamagrid"))


def make_tiny_model(args: argparse.Namespace) -> int:
    from worker.model.tiny import make_tiny_model

    kwargs = dict(seed=args.seed, num_layers=args.layers, hidden_size=args.hidden_size,
                  num_heads=args.heads, num_kv_heads=args.kv_heads or args.heads,
                  intermediate_size=args.intermediate_size)
    if args.vocab_size:
        kwargs["vocab_size"] = args.vocab_size
    path = make_tiny_model(Path(args.dir), **kwargs)
    print(path)
    return 0


def worker(argv: list[str]) -> int:
    """`llamagrid worker ARGS` = `python -m worker ARGS`; with --supervise (before any `--`) = the supervisor's."""
    own = argv[:argv.index("--")] if "--" in argv else argv
    if "--supervise" in own:
        from worker.supervisor.__main__ import main as supervisor_main

        argv = list(argv)
        argv.remove("--supervise")
        return supervisor_main(argv)
    from worker.__main__ import main as worker_main

    return worker_main(argv)


def keys(argv: list[str]) -> int:
    """`llamagrid keys ARGS`, parsed by the router's own keys parser (it imports redis, so it is built only here)."""
    from router.keys_cli import add_keys_parser

    parser = argparse.ArgumentParser(prog="llamagrid")
    add_keys_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["keys", *argv])
    return args.func(args)


def ensure_tiny_model(home: Path = DEFAULT_HOME) -> Path:
    """The default checkpoint: generated once (seeded) under LLAMAGRID_HOME, reused afterwards."""
    from worker.model.tiny import make_tiny_model

    path = home / "tiny-llama-2-chat"
    if not (path / "config.json").exists():
        home.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=home))
        make_tiny_model(tmp / "m", seed=0)
        (tmp / "m").rename(path)
        tmp.rmdir()
    return path


def up(args: argparse.Namespace) -> int:
    # what the router and the workers import, imported here first: a missing server dependency then stops `up`
    # before it has started anything
    import router.server  # noqa: F401
    import worker.app  # noqa: F401
    from llamagrid.up import up

    model = Path(args.model) if args.model else ensure_tiny_model()
    return up(model, replicas=args.replicas, tp=args.tp, port=args.port, demo_only=args.demo_only,
              log_level=args.log_level, is_tiny=args.model is None, metrics=args.metrics,
              router_processes=args.router_processes, http_port=args.http_port)
