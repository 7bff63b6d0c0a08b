"""Call records: one request (one Chat turn) as the router saw it, settled and logged once when it ends."""

from __future__ import annotations

import asyncio
import contextvars
import time
from dataclasses import dataclass, field

import grpc
import structlog

from common.request_ids import client_request_id
from protos.llamagrid.v1 import inference_pb2 as pb
from ratelimit.tiers import Tier
from router.concurrency import Slot
from router.keys import KeyRecord

log = structlog.get_logger("router.server")


@dataclass
class CallRecord:
    """Who sent the call, what it reserved from whose bucket, what the workers reported using, how it went.
    Settled once (unused tokens refunded, excess charged) and logged once, when it ends, as `request_finished` —
    ids, names and numbers only, never text."""

    method: str
    request_id: str
    started: float = field(default_factory=time.monotonic)
    key_id: str = ""
    tenant: str = ""
    model: str = ""
    turn: int | None = None
    inputs: int = 0
    tier: Tier | None = None  # set once charged; then settled
    reserved: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    first_token_at: float | None = None
    failovers: int = 0
    worker: str = ""
    settled: bool = False
    logged: bool = False
    headers: tuple | None = None  # the rate-limit headers charge decided, until headers_out sends them
    slot: Slot | None = None  # the key's concurrency slot this call holds (router.concurrency), released at settle

    @property
    def used(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add_usage(self, usage: pb.Usage) -> None:
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.cached_prompt_tokens += usage.cached_prompt_tokens

    def authenticated(self, record: KeyRecord) -> None:
        self.key_id, self.tenant = record.key_id, record.tenant

    def fields(self, code: grpc.StatusCode) -> dict:
        out = {"request_id": self.request_id, "method": self.method, "key_id": self.key_id, "tenant": self.tenant,
               "model": self.model, "status": code.name, "inputs": self.inputs,
               "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
               "cached_prompt_tokens": self.cached_prompt_tokens, "reserved_tokens": self.reserved,
               "ttft_ms": None if self.first_token_at is None else round(1e3 * (self.first_token_at - self.started), 2),
               "duration_ms": round(1e3 * (time.monotonic() - self.started), 2), "failovers": self.failovers,
               "worker": self.worker}
        if self.turn is not None:
            out["turn"] = self.turn
        return out


# The call served by this task (grpc.aio runs each call in its own task): read when the call ends, by
# call_ended, to log its request_finished with the status the error decorators mapped.
_CURRENT: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar("llamagrid_router_call", default=None)


def begin_call(method: str, context) -> CallRecord:
    """The record of a call that starts now (also the task's current record, for call_ended)."""
    record = CallRecord(method, client_request_id(context.invocation_metadata()))
    _CURRENT.set(record)
    return record


def next_turn(record: CallRecord, request_id: str, turn: int) -> CallRecord:
    """The record of a Chat session's next turn (the session's first turn reuses the session's record)."""
    if turn > 0:
        fresh = CallRecord(record.method, request_id, key_id=record.key_id, tenant=record.tenant)
        _CURRENT.set(fresh)
        record = fresh
    record.request_id, record.turn, record.inputs, record.started = request_id, turn, 1, time.monotonic()
    return record


def call_ended(code: grpc.StatusCode) -> None:
    """The task's call ended with `code`: its request_finished is logged unless it was already (a Chat logs each
    turn as it ends). Rendering happens just after, so the call's status goes out first."""
    record = _CURRENT.get()
    if record is not None and not record.logged:
        record.logged = True
        asyncio.get_running_loop().call_soon(log_finished, record, code)


def log_finished(record: CallRecord, code: grpc.StatusCode) -> None:
    record.logged = True
    log.info("request_finished", **record.fields(code))
