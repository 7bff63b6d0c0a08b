"""`python -m router --workers h:p,h:p --port N`: serve the public API in front of a pool of workers; with
`--processes N`, N router processes on that one port (router.processes)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import structlog

from common import event_loop
from common.logs import configure_logging
from common.ports import write_port_file
from common.signals import until_terminated
from router.config import RouterConfig, build_parser, config_from_args

log = structlog.get_logger("router.main")


@contextlib.contextmanager
def redis_for(config: RouterConfig) -> Iterator[RouterConfig]:
    """The config with a Redis: its own redis_url, or a private redis-server started here for a router on its own
    (no --redis-url), stopped on exit. With --processes, the parent starts it and every process shares it."""
    if config.redis_url is not None:
        yield config
        return
    from ratelimit.redis_server import RedisServer

    with RedisServer() as embedded:
        log.info("embedded_redis_started")
        yield dataclasses.replace(config, redis_url=embedded.url)


async def serve(config: RouterConfig, port_file: Path | None = None, parent_pid: int | None = None) -> None:
    """One router until SIGTERM or SIGINT (or, with `parent_pid`, until that parent is gone), then its drain."""
    from router.server import build_router

    with redis_for(config) as config:
        served = await build_router(config)
        try:
            if port_file is not None:
                write_port_file(port_file, served.port)
            if parent_pid is None:
                await until_terminated()
            else:
                from router.processes import until_terminated_or_orphaned

                await until_terminated_or_orphaned(parent_pid)
        finally:
            await served.cleanup()  # drain: health NOT_SERVING, no new calls, those in flight get drain_grace_s


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--port-file", type=Path, default=None, help="write the bound port here once serving")
    # set by a --processes parent in each of its processes: the index its log lines and metrics carry
    parser.add_argument("--process-index", type=int, default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    child = args.process_index is not None
    if child or config.processes > 1:
        from router.processes import whole_line_stderr

        whole_line_stderr()
    configure_logging(config.log_level, component="router", **({"process": args.process_index} if child else {}))
    if config.processes > 1:
        from router.processes import run_processes

        with redis_for(config) as config:
            return run_processes(config, argv, args.port_file)
    event_loop.run(serve(config, args.port_file, parent_pid=os.getppid() if child else None), config.event_loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
