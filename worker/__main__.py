"""`python -m worker --model DIR --port N`: serve one replica."""

from __future__ import annotations

import asyncio
import sys

from common.logs import configure_logging
from worker.config import ConfigRefused, build_parser, config_from_args


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, component="worker")
    from worker.app import serve

    try:
        asyncio.run(serve(config, args.port_file))
    except ConfigRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
