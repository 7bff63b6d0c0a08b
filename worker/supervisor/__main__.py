"""`python -m worker.supervisor [options] -- <python -m worker args>`: see worker.supervisor."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.logs import configure_logging
from worker.supervisor.supervisor import Supervisor, SupervisorConfig, WorkerCommand


def build_parser() -> argparse.ArgumentParser:
    d = SupervisorConfig.__dataclass_fields__
    p = argparse.ArgumentParser(
        prog="python -m worker.supervisor", allow_abbrev=False,
        usage="%(prog)s [options] -- <python -m worker args>",
        description="Run one replica's rank group and restart it whenever a rank fails.",
        epilog="Worker args: see python -m worker --help (--port 0 picks a free port once, kept across restarts).")
    p.add_argument("--port-file", type=Path, default=None,
                   help="write the replica's port here once it first serves (default: the worker args' --port-file)")
    p.add_argument("--backoff-initial", type=float, default=d["backoff_initial_s"].default, metavar="S",
                   help="delay before the first restart; doubles per failure")
    p.add_argument("--backoff-max", type=float, default=d["backoff_max_s"].default, metavar="S")
    p.add_argument("--stable-after", type=float, default=d["stable_after_s"].default, metavar="S",
                   help="a group serving this long resets the backoff")
    p.add_argument("--heartbeat-timeout", type=float, default=d["heartbeat_timeout_s"].default, metavar="S",
                   help="a rank whose heartbeat is older than this (once serving) is hung")
    p.add_argument("--startup-grace", type=float, default=d["startup_grace_s"].default, metavar="S",
                   help="a group not serving after this long is hung")
    p.add_argument("--crash-loop-max-failures", type=int, default=d["crash_loop_max_failures"].default, metavar="N")
    p.add_argument("--crash-loop-window", type=float, default=d["crash_loop_window_s"].default, metavar="S",
                   help="N failures within this window: give up (exit status 1)")
    p.add_argument("--stop-timeout", type=float, default=d["stop_timeout_s"].default, metavar="S",
                   help="on SIGTERM/SIGINT: how long rank 0 may drain before the group is killed")
    p.add_argument("--kill-timeout", type=float, default=d["kill_timeout_s"].default, metavar="S",
                   help="SIGTERM to SIGKILL for what is left of a failed group")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus /metrics (restarts by cause) here; 0 picks a free port")
    p.add_argument("--metrics-host", default=d["metrics_host"].default)
    p.add_argument("--log-level", default="info")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Supervisor args before `--`, worker args after; without `--` all are worker args (except a lone -h)."""
    if "--" not in argv:
        return (argv, []) if argv in (["-h"], ["--help"]) else ([], argv)
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def main(argv: list[str] | None = None) -> int:
    own, worker_args = split_argv(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(own)
    try:
        config = SupervisorConfig(
            port_file=args.port_file,
            backoff_initial_s=args.backoff_initial,
            backoff_max_s=args.backoff_max,
            stable_after_s=args.stable_after,
            heartbeat_timeout_s=args.heartbeat_timeout,
            startup_grace_s=args.startup_grace,
            crash_loop_max_failures=args.crash_loop_max_failures,
            crash_loop_window_s=args.crash_loop_window,
            stop_timeout_s=args.stop_timeout,
            kill_timeout_s=args.kill_timeout,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
        )
    except ValueError as e:
        parser.error(str(e))
    command = WorkerCommand.from_args(worker_args)
    configure_logging(args.log_level, component="supervisor")
    return Supervisor(config, command).run()


if __name__ == "__main__":
    sys.exit(main())
