"""Request ids: what a client may send, and what a worker accepts as a job's id."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

# A job's id at the worker (Job.request_id). The router derives it from the call's id as `<id>/<input>` or
# `<id>/<turn>`, so the id a client sends must leave room for that suffix.
MAX_JOB_ID_CHARS = 128
MAX_CLIENT_ID_CHARS = 96


def new_request_id() -> str:
    return uuid.uuid4().hex


def client_request_id(metadata: Iterable[tuple[str, str]] | None) -> str:
    """The call's `x-request-id` when the client sent a usable one, else a fresh id."""
    for key, value in metadata or ():
        if key == "x-request-id" and value and len(value) <= MAX_CLIENT_ID_CHARS:
            return value
    return new_request_id()
