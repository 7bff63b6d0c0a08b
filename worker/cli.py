"""The `llamagrid` command: make-tiny-model, worker, up (a whole local cluster with a streamed demo,
llamagrid.up), keys, and the clients generate and chat (llamagrid.cli)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

DEFAULT_HOME = Path(os.environ.get("LLAMAGRID_HOME", Path.home() / ".cache" / "llamagrid"))


def _make_tiny_model(args: argparse.Namespace) -> int:
    from worker.model.tiny import make_tiny_model

    kwargs = dict(seed=args.seed, num_layers=args.layers, hidden_size=args.hidden_size,
                  num_heads=args.heads, num_kv_heads=args.kv_heads or args.heads,
                  intermediate_size=args.intermediate_size)
    if args.vocab_size:
        kwargs["vocab_size"] = args.vocab_size
    path = make_tiny_model(Path(args.dir), **kwargs)
    print(path)
    return 0


def _worker(argv: list[str]) -> int:
    """`llamagrid worker ARGS` = `python -m worker ARGS`; with --supervise (before any `--`) = the supervisor's."""
    own = argv[:argv.index("--")] if "--" in argv else argv
    if "--supervise" in own:
        from worker.supervisor.__main__ import main as supervisor_main

        argv = list(argv)
        argv.remove("--supervise")
        return supervisor_main(argv)
    from worker.__main__ import main as worker_main

    return worker_main(argv)


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


def _up(args: argparse.Namespace) -> int:
    from llamagrid.up import up

    model = Path(args.model) if args.model else ensure_tiny_model()
    return up(model, replicas=args.replicas, tp=args.tp, port=args.port, demo_only=args.demo_only,
              log_level=args.log_level, is_tiny=args.model is None, metrics=args.metrics)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamagrid", description="llamagrid: serve Llama-2 chat models over gRPC")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("make-tiny-model", help="write a small random Llama-2-format checkpoint")
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--hidden-size", type=int, default=64)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--kv-heads", type=int, default=None)
    t.add_argument("--intermediate-size", type=int, default=176)
    t.add_argument("--vocab-size", type=int, default=None)
    t.set_defaults(func=_make_tiny_model)

    # Listed for --help only: main() hands `worker ...` to _worker before argparse sees the worker's flags.
    sub.add_parser("worker", add_help=False,
                   help="run one worker (same flags as python -m worker); with --supervise, restart it on failure "
                        "(llamagrid worker --supervise [supervisor options] -- <worker flags>)")

    u = sub.add_parser("up", help="a local cluster: embedded Redis, supervised worker replicas, a router, a demo key "
                                  "and a demo chat through the router; Ctrl-C stops it all")
    u.add_argument("--model", default=None, help="checkpoint directory (default: the generated tiny model)")
    u.add_argument("--replicas", type=int, default=2, help="worker replicas, each under its supervisor")
    u.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per replica")
    u.add_argument("--port", type=int, default=50051, help="the router's port (0 picks a free one)")
    u.add_argument("--demo-only", action="store_true", help="exit after the demo")
    u.add_argument("--log-level", default="info", help="log level of every process (JSON lines in the run dir)")
    u.add_argument("--no-metrics", dest="metrics", action="store_false",
                   help="serve no Prometheus /metrics (default: every process serves one on a free loopback port)")
    u.set_defaults(func=_up)

    from router.keys_cli import add_keys_parser

    add_keys_parser(sub)

    from llamagrid.cli import add_client_parsers

    add_client_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return _worker(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
