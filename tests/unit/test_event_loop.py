"""common.event_loop: the loop a server process runs on, chosen by name."""

from __future__ import annotations

import asyncio

import pytest

from common import event_loop


async def _loop_type() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_runs_on_uvloop_when_installed_and_asyncio_on_request():
    assert event_loop.uvloop_available()  # a [router] install brings it
    assert event_loop.loop_name("auto") == "uvloop"
    assert event_loop.run(_loop_type(), "auto").startswith("uvloop")
    assert event_loop.run(_loop_type(), "asyncio").startswith("asyncio")


def test_an_unknown_loop_is_refused_by_name():
    with pytest.raises(ValueError, match="one of auto, uvloop, asyncio, got 'trio'"):
        event_loop.loop_name("trio")
