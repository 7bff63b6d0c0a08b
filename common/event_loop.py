"""Which event loop a server process runs on: uvloop when installed (the default, "auto"), or asyncio's own.

grpc.aio takes one new call from gRPC per pass of the event loop, so under a burst of new calls the time a pass
takes is what every new call waits for, many times over. uvloop's passes cost less than asyncio's pure-Python
selector loop: bench/router_overhead.py measures the difference (`--relay-uvloop` runs its baseline on it too)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine

EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def loop_name(choice: str) -> str:
    """The loop `choice` ("auto", "uvloop" or "asyncio") runs on here; ValueError when uvloop is asked for and
    missing, or the choice is unknown."""
    if choice not in EVENT_LOOPS:
        raise ValueError(f"event loop must be one of {', '.join(EVENT_LOOPS)}, got {choice!r}")
    if choice == "asyncio" or (choice == "auto" and not uvloop_available()):
        return "asyncio"
    if not uvloop_available():
        raise ValueError("event loop 'uvloop' asked for, but uvloop is not installed (pip install uvloop)")
    return "uvloop"


def run(main: Coroutine, choice: str = "auto"):
    """asyncio.run(main) on the loop `choice` names (loop_name)."""
    if loop_name(choice) == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
