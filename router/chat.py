"""A Chat session on the router: turns admitted one by one, each relayed from the session's worker (which keeps
the conversation's KV cache), the conversation's token ids carried from turn to turn."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import structlog

from common.errors import InvalidRequest
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from router.admission import Admission
from router.auth import Presented
from router.calls import CallRecord, log_finished, next_turn
from router.concurrency import REQUESTS
from router.config import RouterConfig
from router.costs import estimate_chat
from router.errors import SessionOver
from router.keys import KeyRecord
from router.metrics import RouterMetrics
from router.outbox import Outbox
from router.relay import FollowUps, Relay, new_job, turn_renames

log = structlog.get_logger("router.server")

_CLOSED = object()  # the client half-closed its side of a Chat stream
_AGED = object()  # a Chat session reached config.chat_max_age_s
_IDLE = object()  # a Chat session waited config.chat_idle_timeout_s for its next turn


@dataclass
class ChatSession:
    request_id: str = ""
    model: str = ""
    address: str | None = None  # the worker that holds the conversation's KV cache
    num_turns: int = 0
    history: list[int] = field(default_factory=list)  # the conversation's token ids, closed by end-of-sequence

    def pin(self, address: str) -> None:
        if self.address is not None and address != self.address:
            log.info("chat_session_moved", request_id=self.request_id, turn=self.num_turns, worker=address)
        self.address = address


def session_over(aged: bool, config: RouterConfig) -> SessionOver:
    if aged:
        return SessionOver(f"the chat session reached its maximum age of {config.chat_max_age_s:g} s; open a new "
                           "session with the conversation so far")
    return SessionOver(f"the chat session was idle for {config.chat_idle_timeout_s:g} s; open a new session with "
                       "the conversation so far")


class ChatCall:
    """One Chat stream. Its inbox merges the client's requests (unmerged) with the current turn's worker events
    (coalesced while the client lags). A session is bounded in age and in idle time (it holds a slot of its key
    and a worker's cached history): past either it ends with UNAVAILABLE between turns, and the client reopens it
    with the conversation so far."""

    def __init__(self, config: RouterConfig, admission: Admission, relay: Relay, metrics: RouterMetrics, context,
                 presented: Presented, key: KeyRecord, record: CallRecord) -> None:
        self.config, self.admission, self.relay, self.metrics = config, admission, relay, metrics
        self.context, self.presented, self.key, self.record = context, presented, key, record
        self.session = ChatSession(request_id=record.request_id)
        self.inbox = Outbox()
        self.turn: asyncio.Task | None = None
        self.follow_ups: FollowUps | None = None  # the current turn's cancel and end, for its worker streams
        self.sent_metadata = False
        self.expiring = False
        loop = self.loop = asyncio.get_running_loop()
        self.aged = loop.call_later(config.chat_max_age_s, self.inbox.put, _AGED)
        self.idle = loop.call_later(config.chat_idle_timeout_s, self.inbox.put, _IDLE)

    async def run(self, request_iterator) -> AsyncIterator[pb.ChatEvent]:
        reader = asyncio.create_task(self._read(request_iterator))
        closed = False
        try:
            while not (closed and self.turn is None):
                index, item = await self.inbox.get()
                if item is _CLOSED:
                    closed = True
                elif item is _AGED or item is _IDLE:
                    self._expire(item)
                elif isinstance(item, Exception):
                    raise item
                elif index is None and item.HasField("cancel"):
                    if self.follow_ups is not None:
                        self.follow_ups.cancel()
                elif index is None:
                    await self._start_turn(item.turn)
                elif item.HasField("delta"):
                    yield pb.ChatEvent(delta=_chat_delta(item.delta))
                else:
                    async for event in self._end_turn(item.finished):
                        yield event
        finally:
            await self._close(reader)

    async def _read(self, request_iterator) -> None:
        try:
            async for req in request_iterator:
                self.inbox.put(req)
        except Exception as exc:  # e.g. a message that does not parse (common.rpc_guard): the loop raises it
            self.inbox.put(exc)
        finally:
            self.inbox.put(_CLOSED)

    async def _pump(self, job: wpb.Job, follow_ups: FollowUps, record: CallRecord) -> None:
        try:
            async for event in self.relay.events(job, self.context, prefer=self.session.address, follow_ups=follow_ups,
                                                 on_address=self.session.pin, record=record, renamed=turn_renames(job)):
                self.inbox.put_event(0, event)
        except Exception as exc:
            self.inbox.put(exc)

    def _expire(self, item: object) -> None:
        self.expiring = self.expiring or item is _AGED
        # an _IDLE counts only from the session's current idle timer (one that fired just as a turn came in may
        # still be queued when the next idle period starts)
        idle_due = not self.idle.cancelled() and self.idle.when() <= self.loop.time()
        if self.turn is None and (item is _AGED or idle_due):
            raise session_over(item is _AGED, self.config)

    async def _start_turn(self, turn: pb.ChatTurn) -> None:
        if self.turn is not None:
            raise InvalidRequest("turn", "a reply is still streaming; send cancel first")
        self.idle.cancel()
        session, n = self.session, self.session.num_turns
        record = self.record = next_turn(self.record, f"{session.request_id}/{n}", n)
        field_ = f"turns[{n}]"
        self.admission.check_size(sum(len(m.content) for m in turn.messages), f"{field_}.messages")
        if turn.parameters.HasField("n") and turn.parameters.n != 1:
            raise InvalidRequest(f"{field_}.parameters.n", "a Chat turn has one reply; use Generate with "
                                                           "conversations for n completions")
        if n == 0:
            session.model = self.admission.resolve_model(self.key, turn.model)
        record.model = session.model
        cost = estimate_chat(turn.messages, turn.parameters, self.admission.default_max_new(session.model))
        tier = self.admission.tiers.get(self.key.tier)
        job = new_job(record.request_id, session.model, turn.parameters, self.context, self.key.tenant,
                      tier.weight if tier is not None else 1)
        job.chat.messages.extend(turn.messages)
        job.history_token_ids.extend(session.history)
        self.follow_ups = FollowUps()
        # the session's key was verified when it opened: a turn may go ahead when its room allows
        ahead = self.admission.room_ahead(self.key, cost)
        if ahead:  # the turn runs while its admission is in flight; its events wait in the inbox
            self.turn = asyncio.create_task(self._pump(job, self.follow_ups, record))
        try:
            await self._admit_turn(cost, record, field_)
        except BaseException:
            if ahead:  # sent ahead, then denied (or the client left): _close stops it
                self.metrics.dispatch_ahead("cancelled")
            raise
        self.sent_metadata = True
        session.num_turns += 1
        log.debug("chat_turn_admitted", request_id=job.request_id, key_id=self.key.key_id, reserved=cost,
                  history=len(session.history), field=field_, dispatched_ahead=ahead)
        if ahead:
            self.metrics.dispatch_ahead("kept")
        else:
            self.turn = asyncio.create_task(self._pump(job, self.follow_ups, record))
        await self.admission.headers_out(record, self.context)  # the headers go out before any event of the session

    async def _admit_turn(self, cost: int, record: CallRecord, field_: str) -> None:
        """The key is verified again with the turn's charge (one round trip): a key revoked or moved to another tier
        since the session opened is seen at its next turn."""
        admitted = await self.admission.admit(self.presented, self.session.model, cost, record)
        self.key = admitted.key
        record.slot = self.admission.hold(self.key, REQUESTS, cost, admitted.decided)
        await self.admission.charge(self.key, cost, self.context, record, send_metadata=not self.sent_metadata,
                                    decided=admitted.decided, field=field_)

    async def _end_turn(self, fin: wpb.Finished) -> AsyncIterator[pb.ChatEvent]:
        if fin.last_delta.token_ids or fin.last_delta.text:
            yield pb.ChatEvent(delta=_chat_delta(fin.last_delta))
        self.session.history = list(fin.history_token_ids)
        await self.turn
        self.follow_ups.close()  # half-close the finished turn's worker stream (ends its reader)
        self.turn, self.follow_ups = None, None
        self.record.add_usage(fin.usage)
        self.admission.settle(self.record)
        log_finished(self.record, grpc.StatusCode.OK)
        yield pb.ChatEvent(end=pb.TurnEnd(finish_reason=fin.finish_reason, usage=fin.usage))
        if self.expiring:
            raise session_over(True, self.config)
        self.idle = self.loop.call_later(self.config.chat_idle_timeout_s, self.inbox.put, _IDLE)

    async def _close(self, reader: asyncio.Task) -> None:
        self.aged.cancel()
        self.idle.cancel()
        reader.cancel()
        if self.follow_ups is not None:
            # half-close the current turn's worker streams. When a worker call is already over (the worker refused
            # the turn, it failed over, or the job finished and the client left before its end was relayed),
            # cancelling the call or the turn does nothing, and gRPC's task feeding the call's requests would wait
            # forever, to be destroyed pending by the garbage collector ("Task was destroyed but it is pending!")
            self.follow_ups.close()
        if self.turn is not None:
            self.turn.cancel()
        # both are awaited: a task left pending or with an unread exception would be reported by asyncio
        await asyncio.gather(reader, *([self.turn] if self.turn is not None else []), return_exceptions=True)
        self.admission.settle(self.record)


def _chat_delta(delta: wpb.TokenDelta) -> pb.ChatDelta:
    out = pb.ChatDelta(text=delta.text, token_ids=delta.token_ids)
    if delta.logprobs:
        out.logprobs.extend(delta.logprobs)
    return out
