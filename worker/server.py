"""The worker's gRPC servicer: the internal llamagrid.worker.v1.Worker API, converted to and from worker.service.

Protobuf stops here: each handler reads its request into plain values, calls the WorkerService, and writes what it
returns back as messages. A worker serves no public llamagrid.v1.Inference: the router is the product's only
public entry, and a worker's own copy of that service bypassed API keys, rate limits and tenant fairness and was a
second implementation of request semantics (fan-out of several inputs, the Chat session loop).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import grpc

from common.errors import (
    EngineUnavailable,
    FailedPrecondition,
    InvalidRequest,
    ResourceExhausted,
    handle_errors,
    handle_stream_errors,
)
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from worker.cache_events import Draining, Overflowed, Subscriber
from worker.chat_template import ChatMessage
from worker.engine import FinishEvent, LoadSnapshot, TokenEvent
from worker.sequence import JSON_OBJECT, JSON_SCHEMA, REGEX, GrammarSpec
from worker.service import Job, WorkerInfo, WorkerService
from worker.validation import RequestedParameters


def parameters_from_pb(p: pb.SamplingParameters) -> RequestedParameters:
    def opt(name: str):
        return getattr(p, name) if p.HasField(name) else None

    return RequestedParameters(
        max_new_tokens=opt("max_new_tokens"), temperature=opt("temperature"), top_p=opt("top_p"),
        top_k=opt("top_k"), seed=opt("seed"), stop=tuple(p.stop), repetition_penalty=opt("repetition_penalty"),
        ignore_eos=p.ignore_eos, presence_penalty=opt("presence_penalty"), frequency_penalty=opt("frequency_penalty"),
        min_new_tokens=opt("min_new_tokens"), logprobs=opt("logprobs"), grammar=_grammar(p),
        grammars_set=tuple(name for name in (JSON_SCHEMA, REGEX, JSON_OBJECT) if getattr(p, name)),
    )


def _grammar(p: pb.SamplingParameters) -> GrammarSpec | None:
    if p.json_schema:
        return GrammarSpec(JSON_SCHEMA, p.json_schema)
    if p.regex:
        return GrammarSpec(REGEX, p.regex)
    if p.json_object:
        return GrammarSpec(JSON_OBJECT)
    return None


def messages_from_pb(messages: Sequence[pb.ChatMessage]) -> list[ChatMessage]:
    return [ChatMessage(m.role, m.content) for m in messages]


# The call's own deadline is what ends a job: gRPC ends the call with DEADLINE_EXCEEDED and the job is aborted as its
# stream closes. The job's engine deadline trails it by this much, only as the backstop should that be lost; equal
# deadlines would race, the engine ending the job (finish CANCELLED, status OK) just before the caller's timer fired.
CALL_DEADLINE_GRACE_S = 1.0


def deadline_from(context: grpc.aio.ServicerContext, deadline_unix_ms: int = 0) -> float | None:
    """The engine deadline of a job (time.monotonic()): the earlier of the call's deadline (plus
    CALL_DEADLINE_GRACE_S) and the job's own (Unix ms, 0 = none)."""
    remaining = context.time_remaining()
    deadline = None if remaining is None else time.monotonic() + remaining + CALL_DEADLINE_GRACE_S
    if deadline_unix_ms:
        wall = time.monotonic() + (deadline_unix_ms / 1000.0 - time.time())
        deadline = wall if deadline is None else min(deadline, wall)
    return deadline


def usage_pb(event: FinishEvent) -> pb.Usage:
    return pb.Usage(prompt_tokens=event.num_prompt_tokens, completion_tokens=event.num_output_tokens,
                    cached_prompt_tokens=event.num_cached_tokens)


def info_pb(info: WorkerInfo) -> wpb.InfoResponse:
    return wpb.InfoResponse(
        model=info.model, max_context=info.max_context, tp_size=info.tp_size,
        kv_capacity_tokens=info.kv_capacity_tokens, block_size=info.block_size, max_num_seqs=info.max_num_seqs,
        dtype=info.dtype, device=info.device, vocab_size=info.vocab_size,
        default_max_new_tokens=info.default_max_new_tokens,
    )


def load_pb(load: LoadSnapshot) -> wpb.LoadResponse:
    return wpb.LoadResponse(num_waiting=load.num_waiting, num_running=load.num_running,
                            num_free_blocks=load.num_free_blocks, num_total_blocks=load.num_total_blocks,
                            num_pending_tokens=load.num_pending_tokens)


class WorkerServicer(wpb_grpc.WorkerServicer):
    """The internal contract the router speaks: one stream per job."""

    def __init__(self, service: WorkerService):
        self.service = service

    def _job(self, job: wpb.Job, context) -> Job:
        svc = self.service
        svc.check_model(job.model)
        which = job.WhichOneof("prompt")
        if which == "text":
            prompt = svc.text_prompt(job.text, "job.text")
        elif which == "chat":
            prompt = svc.chat_prompt(messages_from_pb(job.chat.messages), "job.chat.messages", job.history_token_ids)
        elif which == "token_ids":
            prompt = svc.token_prompt(job.token_ids.ids, "job.token_ids")
        else:
            raise InvalidRequest("job.prompt", "set text, chat or token_ids")
        return svc.job(prompt, parameters_from_pb(job.parameters), request_id=job.request_id, field="job",
                       deadline=deadline_from(context, job.deadline_unix_ms), is_chat_reply=which == "chat",
                       resume_token_ids=job.resume_token_ids, tenant=job.tenant, weight=job.tenant_weight or 1)

    @handle_stream_errors
    async def Generate(self, request_iterator, context) -> AsyncIterator[wpb.WorkerEvent]:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("job"):
            raise InvalidRequest("job", "the first message must be the job")
        job = self._job(first.job, context)

        async def watch_cancel() -> None:
            async for msg in request_iterator:
                if msg.HasField("cancel"):
                    self.service.engine.abort(job.request_id)
                    return

        watcher = asyncio.create_task(watch_cancel())
        try:
            async for event in self._events(job):
                yield event
        finally:
            watcher.cancel()

    @handle_stream_errors
    async def Run(self, request: wpb.Job, context) -> AsyncIterator[wpb.WorkerEvent]:
        async for event in self._events(self._job(request, context)):
            yield event

    async def _events(self, job: Job) -> AsyncIterator[wpb.WorkerEvent]:
        async for event in self.service.stream(job):
            if isinstance(event, TokenEvent):
                if event.text or event.token_ids:
                    yield wpb.WorkerEvent(delta=self._delta(event))
            else:
                final = event.final
                yield wpb.WorkerEvent(finished=wpb.Finished(
                    finish_reason=int(event.finish_reason), usage=usage_pb(event),
                    history_token_ids=self.service.closed_history(event) if job.is_chat_reply else (),
                    last_delta=self._delta(final) if final else None,
                ))

    def _delta(self, event: TokenEvent) -> wpb.TokenDelta:
        if not event.logprobs:
            return wpb.TokenDelta(text=event.text, token_ids=event.token_ids)
        piece = self.service.tokenizer.piece
        return wpb.TokenDelta(text=event.text, token_ids=event.token_ids, logprobs=[
            pb.TokenLogprob(token_id=lp.token_id, token=piece(lp.token_id), logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t, token=piece(t), logprob=v) for t, v in lp.top])
            for lp in event.logprobs])

    @handle_errors
    async def Info(self, request, context) -> wpb.InfoResponse:
        return info_pb(self.service.info)

    @handle_errors
    async def Load(self, request, context) -> wpb.LoadResponse:
        return load_pb(self.service.engine.load)

    @handle_stream_errors
    async def CacheEvents(self, request, context) -> AsyncIterator[wpb.CacheEvent]:
        engine = self.service.engine
        if not engine.scheduler.block_manager.enable_prefix_caching:
            raise FailedPrecondition("this worker runs without prefix caching: it has no cache to publish")
        hub = engine.cache_events
        subscriber = Subscriber(asyncio.get_running_loop())
        engine.subscribe_cache(subscriber)
        try:
            while True:
                try:
                    batch = await subscriber.next()
                except Overflowed:
                    raise ResourceExhausted("cache events: the reader fell behind; subscribe again") from None
                except Draining:
                    raise EngineUnavailable("cache events: the worker is draining") from None
                yield wpb.CacheEvent(epoch=hub.epoch, snapshot=batch.snapshot, stored=batch.stored,
                                     evicted=batch.evicted, block_size=hub.block_size)
        finally:
            subscriber.close()

    @handle_errors
    async def Tokenizer(self, request, context) -> wpb.TokenizerResponse:
        return wpb.TokenizerResponse(tokenizer_json=self.service.tokenizer_json,
                                     block_size=self.service.engine.cache_events.block_size)

    @handle_errors
    async def CountTokens(self, request: pb.CountTokensRequest, context) -> pb.CountTokensResponse:
        svc = self.service
        svc.check_model(request.model)
        which = request.WhichOneof("input")
        if which == "text":
            count = svc.count_text_tokens(request.text, "text")
        elif which == "chat":
            count = len(svc.chat_ids(messages_from_pb(request.chat.messages), "chat.messages"))
        else:
            raise InvalidRequest("input", "set text or chat")
        return pb.CountTokensResponse(count=count, max_context=svc.limits.max_context)
