"""Logged exceptions keep their type and frames but never their message (it may quote user text)."""

from __future__ import annotations

import json

import structlog

from worker.logs import configure_logging


def test_exception_message_is_not_logged(capsys):
    configure_logging("info", component="test")
    log = structlog.get_logger("t")
    try:
        raise ValueError("secret prompt text")
    except ValueError:
        log.exception("boom", request_id="r1")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    event = json.loads(line)
    assert event["exception"] == "ValueError" and event["request_id"] == "r1" and event["frames"]
    assert "secret" not in line
    structlog.reset_defaults()
