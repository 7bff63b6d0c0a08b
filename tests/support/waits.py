"""Waits on conditions, each with a deadline: tests never sleep a fixed time to let something happen."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

POLL_S = 0.02  # how often a condition is checked again (the wait itself ends when the condition holds)


def wait_until(condition: Callable[[], T], what: str, timeout_s: float = 10.0, poll_s: float = POLL_S,
               describe: Callable[[], object] | None = None) -> T:
    """condition()'s first truthy value; AssertionError naming `what` and the last value (or, with `describe`,
    what describe() says then) past the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            last = describe() if describe is not None else value
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")
        time.sleep(poll_s)


async def until(condition: Callable[[], T | Awaitable[T]], what: str, timeout_s: float = 10.0,
                poll_s: float = POLL_S) -> T:
    """wait_until for a coroutine: `condition` may be a plain or an async function."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {value!r})")
        await asyncio.sleep(poll_s)


def settled(read: Callable[[], T], what: str, quiet_s: float = 0.3, timeout_s: float = 10.0) -> T:
    """read()'s value once it has stayed the same for `quiet_s` (e.g. background work that has no end signal has
    finished): for a quantity that only grows while work is pending."""
    deadline = time.monotonic() + timeout_s
    last, since = read(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} never settled within {timeout_s} s (last: {last!r})")
        time.sleep(POLL_S)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
    return last
