"""Logged exceptions keep their type and frames but never their message (it may quote user text)."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import structlog

from common.logs import configure_logging


@pytest.fixture(autouse=True)
def _restore_process_logging():
    """configure_logging changes process-wide state; the tests after these must not write to a closed capsys."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, asyncio.get_event_loop_policy(), sys.excepthook, threading.excepthook,
             sys.unraisablehook, warnings.showwarning)
    yield
    (root.handlers[:], level, policy, sys.excepthook, threading.excepthook, sys.unraisablehook,
     warnings.showwarning) = saved
    root.setLevel(level)
    asyncio.set_event_loop_policy(policy)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


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


SECRET = "Zq7secretPromptXw9"

# Triggers, after configure_logging, every way a Python process writes to stderr besides structlog: asyncio's
# loop errors (an un-retrieved task exception, a pending task destroyed, a failing callback), grpc's own logging
# (a servicer that raises, a request its deserializer refuses), other stdlib records (with arguments,
# preformatted, with an exception), a warning, an exception in a thread, an unraisable one in __del__, and last an
# uncaught one. The secret is in every exception message, task name, callback argument and log argument.
NOISY_PROCESS = r'''
import asyncio, gc, logging, sys, threading, warnings
import grpc
from common.logs import configure_logging

SECRET = sys.argv[1]
own = logging.getLogger("own.lib")  # a library that prints by itself, as transformers does once imported
own.addHandler(logging.StreamHandler())
own.propagate = False
configure_logging("debug", component="test")
own.warning(f"Token indices sequence length is longer ({SECRET})")


async def fail():
    raise ValueError(SECRET)


async def forever():
    await asyncio.Event().wait()


def raiser(text):
    raise ValueError(text)


class Dirty:
    def __del__(self):
        raise ValueError(SECRET)


async def grpc_failures():
    async def boom(request, context):
        raise ValueError(SECRET)

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(boom, request_deserializer=None, response_serializer=None)
    refused = grpc.unary_unary_rpc_method_handler(boom, request_deserializer=raiser, response_serializer=None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", {"Boom": handler,
                                                                                  "Refused": refused}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        for method in ("Boom", "Refused"):
            try:
                await ch.unary_unary(f"/t.S/{method}")(SECRET.encode(), timeout=10)
            except grpc.aio.AioRpcError:
                pass
    await server.stop(None)


loop = asyncio.new_event_loop()
failed = loop.create_task(fail(), name=SECRET)
pending = loop.create_task(forever(), name=SECRET)
loop.call_soon(raiser, SECRET)
loop.run_until_complete(asyncio.wait([failed]))  # (the others were scheduled before it ends)
loop.close()
del failed, pending
gc.collect()

asyncio.run(grpc_failures())
logging.getLogger("some.lib").warning("peer %s sent %r", "x", SECRET)
logging.getLogger("some.lib").error(f"value: {SECRET}")
logging.getLogger("some.lib").error("failed", exc_info=ValueError(SECRET))
warnings.warn(f"deprecated: {SECRET}")
thread = threading.Thread(target=raiser, args=(SECRET,), name="t1")
thread.start()
thread.join()
Dirty()
gc.collect()
print("stdout stays stdout")
raise ValueError(SECRET)
'''


def test_every_stderr_line_is_json_without_exception_text(tmp_path):
    script = tmp_path / "noisy.py"
    script.write_text(NOISY_PROCESS)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(script), SECRET], cwd=root, capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1  # the uncaught exception still fails the process
    assert SECRET not in proc.stderr and SECRET not in proc.stdout
    lines = proc.stderr.splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(e["component"] == "test" and e["level"] and e["timestamp"] for e in events)
    loop_errors = {e["message"]: e for e in events if e["event"] == "event_loop_error"}
    assert loop_errors["Task exception was never retrieved"]["exception"] == "ValueError"
    assert loop_errors["Task exception was never retrieved"]["task"] == "fail"
    assert loop_errors["Task was destroyed but it is pending!"]["task"] == "forever"
    assert loop_errors["Exception in callback raiser"]["callback"] == "raiser"
    grpc_lines = [e for e in events if e["event"] == "log_record" and e["source"].startswith("grpc")]
    assert {e.get("exception") for e in grpc_lines} >= {"ValueError"}
    assert "Unexpected [ValueError] raised by servicer method [/t.S/Boom]" in {e["message"] for e in grpc_lines}
    library = [e for e in events if e["event"] == "log_record" and e["source"] == "some.lib"]
    assert [e["message"] for e in library] == ["peer %s sent %r", "value", "failed"]
    assert [e["message"] for e in events if e.get("source") == "own.lib"] == ["Token indices sequence length is longer"]
    assert library[2]["exception"] == "ValueError" and library[2]["frames"] == []
    kinds = {e["event"] for e in events}
    assert {"python_warning", "thread_exception", "unraisable_exception", "uncaught_exception"} <= kinds
    assert next(e for e in events if e["event"] == "thread_exception")["thread"] == "t1"
    assert proc.stdout == "stdout stays stdout\n"
