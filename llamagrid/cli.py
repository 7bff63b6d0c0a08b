"""The `llamagrid` command: make-tiny-model, worker, keys, up (a whole local cluster with a streamed demo), and the
clients generate and chat.

Importing this module, parsing and --help need only the client's dependencies (grpcio, the stubs). The server
commands import their modules when they run; without the server dependencies they exit 2 and say what to install.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from llamagrid import server_commands
from llamagrid.client_commands import add_client_parsers

# the extra that brings each server command's dependencies
EXTRA_OF_COMMAND = {"make-tiny-model": "server", "worker": "server", "up": "server", "keys": "router"}
# a missing module of these is a broken install or a bug, never a missing extra
OWN_PACKAGES = {"llamagrid", "protos", "common", "ratelimit", "router", "worker"}
# commands whose arguments are parsed by the server module they run, so their parsers are built only there
PASSTHROUGH = {"worker": server_commands.worker, "keys": server_commands.keys}


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
    t.set_defaults(func=server_commands.make_tiny_model)

    # worker and keys are listed for --help only: main() hands them their argv before this parser sees it
    sub.add_parser("worker", add_help=False,
                   help="run one worker (same flags as python -m worker); with --supervise, restart it on failure "
                        "(llamagrid worker --supervise [supervisor options] -- <worker flags>)")

    u = sub.add_parser("up", help="a local cluster: embedded Redis, supervised worker replicas, a router, a demo key "
                                  "and a demo chat through the router; Ctrl-C stops it all")
    u.add_argument("--model", default=None, help="checkpoint directory (default: the generated tiny model)")
    u.add_argument("--replicas", type=int, default=2, help="worker replicas, each under its supervisor")
    u.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per replica")
    u.add_argument("--port", type=int, default=50051, help="the router's port (0 picks a free one)")
    u.add_argument("--http-port", type=int, default=8000,
                   help="the router's OpenAI- and MosaicML-compatible HTTP API (0 picks a free one)")
    u.add_argument("--router-processes", type=int, default=1,
                   help="router processes sharing its port, one core each (python -m router --processes)")
    u.add_argument("--demo-only", action="store_true", help="exit after the demo")
    u.add_argument("--log-level", default="info", help="log level of every process (JSON lines in the run dir)")
    u.add_argument("--no-metrics", dest="metrics", action="store_false",
                   help="serve no Prometheus /metrics (default: every process serves one on a free loopback port)")
    u.set_defaults(func=server_commands.up)

    sub.add_parser("keys", add_help=False, help="create, list or revoke router API keys")

    add_client_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in PASSTHROUGH:
        return _run_server_command(argv[0], lambda: PASSTHROUGH[argv[0]](argv[1:]))
    args = build_parser().parse_args(argv)
    if args.command in EXTRA_OF_COMMAND:
        return _run_server_command(args.command, lambda: args.func(args))
    return args.func(args)


def _run_server_command(command: str, run: Callable[[], int]) -> int:
    try:
        return run()
    except ImportError as e:
        missing = (e.name or "").partition(".")[0]
        if not missing or missing in OWN_PACKAGES:
            raise
        print(f"llamagrid {command}: needs the {EXTRA_OF_COMMAND[command]} dependencies ({missing} is not "
              f"installed): pip install 'llamagrid[{EXTRA_OF_COMMAND[command]}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
