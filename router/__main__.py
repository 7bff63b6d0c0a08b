"""`python -m router --workers h:p,h:p --port N`: serve the public API in front of a pool of workers."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path

import structlog

from common.logs import configure_logging
from common.ports import write_port_file
from common.signals import until_terminated
from router.config import RouterConfig, build_parser, config_from_args

log = structlog.get_logger("router.main")


async def serve(config: RouterConfig, port_file: Path | None = None) -> None:
    from router.server import build_router

    embedded = None
    if config.redis_url is None:  # a router on its own (no --redis-url): a private redis-server beside it
        from ratelimit.redis_server import RedisServer

        embedded = RedisServer().start()
        config = dataclasses.replace(config, redis_url=embedded.url)
        log.info("embedded_redis_started")
    try:
        server, port, cleanup = await build_router(config)
        try:
            if port_file is not None:
                write_port_file(port_file, port)
            await until_terminated()
        finally:
            await cleanup()  # drain: health NOT_SERVING, refuse new calls, in-flight ones get config.drain_grace_s
    finally:
        if embedded is not None:
            embedded.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--port-file", type=Path, default=None, help="write the bound port here once serving")
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, component="router")
    asyncio.run(serve(config, args.port_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
