"""Waiting in an asyncio service for the signal that stops it."""

from __future__ import annotations

import asyncio
import signal


async def until_terminated() -> None:
    """Return once SIGTERM or SIGINT arrives (the caller then drains and stops)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
