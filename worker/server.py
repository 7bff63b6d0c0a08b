"""grpc.aio servicers: the public llamagrid.v1.Inference and the internal Worker API, one core each."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from common.errors import InvalidRequest, ServiceError, handle_errors, handle_stream_errors
from common.request_ids import MAX_JOB_ID_CHARS
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from worker.engine import ErrorEvent, FinishEvent, TokenEvent
from worker.service import InferenceService, Job, new_request_id
from worker.validation import check_text


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and value and len(value) <= 128:
            return value
    return new_request_id()


def _usage(event: FinishEvent) -> pb.Usage:
    return pb.Usage(prompt_tokens=event.num_prompt_tokens, completion_tokens=event.num_output_tokens,
                    cached_prompt_tokens=event.num_cached_tokens)


class InferenceServicer(pb_grpc.InferenceServicer):
    """llamagrid.v1.Inference served directly by one worker."""

    def __init__(self, service: InferenceService):
        self.service = service

    def _jobs(self, request: pb.GenerateRequest, context) -> list[Job]:
        svc = self.service
        svc.check_model(request.model)
        if not request.inputs:
            raise InvalidRequest("inputs", "at least one input is required")
        if len(request.inputs) > svc.limits.max_num_inputs:
            raise InvalidRequest("inputs", f"at most {svc.limits.max_num_inputs} inputs per request")
        base, deadline = _request_id(context), _deadline(context)
        return [
            svc.job(svc.text_prompt(text, f"inputs[{i}]"), request.parameters,
                    request_id=f"{base}/{i}", deadline=deadline)
            for i, text in enumerate(request.inputs)
        ]

    async def _merged(self, jobs: list[Job], merge_final: bool = False) -> AsyncIterator[tuple[int, object]]:
        """Run all jobs concurrently; yield (index, event) as events arrive."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, job: Job) -> None:
            try:
                async for event in self.service.stream(job, merge_final=merge_final):
                    await merged.put((index, event))
            except ServiceError as e:
                await merged.put((index, ErrorEvent(e)))

        tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
        remaining = len(jobs)
        try:
            while remaining:
                index, event = await merged.get()
                if isinstance(event, ErrorEvent):
                    raise event.error
                if isinstance(event, FinishEvent):
                    remaining -= 1
                yield index, event
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @handle_errors
    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        jobs = self._jobs(request, context)
        outputs = [pb.Completion() for _ in jobs]
        texts: list[list[str]] = [[] for _ in jobs]
        async for index, event in self._merged(jobs):
            if isinstance(event, TokenEvent):
                texts[index].append(event.text)
                outputs[index].token_ids.extend(event.token_ids)
            else:
                outputs[index].finish_reason = int(event.finish_reason)
                outputs[index].usage.CopyFrom(_usage(event))
        for out, parts in zip(outputs, texts, strict=True):
            out.text = "".join(parts)
        return pb.GenerateResponse(outputs=outputs)

    @handle_stream_errors
    async def GenerateStream(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateChunk]:
        jobs = self._jobs(request, context)
        async for index, event in self._merged(jobs, merge_final=True):  # an input's last tokens ride with its end
            if isinstance(event, TokenEvent):
                yield pb.GenerateChunk(index=index, text=event.text, token_ids=event.token_ids)
            else:
                final = event.final
                yield pb.GenerateChunk(index=index, text=final.text if final else "",
                                       token_ids=final.token_ids if final else (),
                                       finish_reason=int(event.finish_reason), usage=_usage(event))

    @handle_stream_errors
    async def Chat(self, request_iterator, context) -> AsyncIterator[pb.ChatEvent]:
        svc = self.service
        inbox: asyncio.Queue = asyncio.Queue()

        async def read() -> None:
            try:
                async for req in request_iterator:
                    await inbox.put(("request", req))
            finally:
                await inbox.put(("closed", None))

        async def pump(job: Job) -> None:
            try:
                async for event in svc.stream(job):
                    await inbox.put(("event", event))
            except ServiceError as e:
                await inbox.put(("event", ErrorEvent(e)))

        reader = asyncio.create_task(read())
        turn: asyncio.Task | None = None
        turn_id: str | None = None
        history: list[int] = []
        num_turns = 0
        closed = False
        base = _request_id(context)
        try:
            while not (closed and turn is None):
                kind, item = await inbox.get()
                if kind == "closed":
                    closed = True
                elif kind == "request" and item.HasField("cancel"):
                    if turn_id is not None:
                        svc.engine.abort(turn_id)
                elif kind == "request":
                    if turn is not None:
                        raise InvalidRequest("turn", "a reply is still streaming; send cancel first")
                    field = f"turns[{num_turns}]"
                    if num_turns == 0:
                        svc.check_model(item.turn.model)
                    prompt = svc.chat_prompt(item.turn.messages, f"{field}.messages", history)
                    job = svc.job(prompt, item.turn.parameters, request_id=f"{base}/{num_turns}",
                                  deadline=_deadline(context), params_field=f"{field}.parameters",
                                  is_chat_reply=True)
                    num_turns += 1
                    turn_id = job.request_id
                    turn = asyncio.create_task(pump(job))
                elif isinstance(item, ErrorEvent):
                    raise item.error
                elif isinstance(item, TokenEvent):
                    if item.text or item.token_ids:
                        yield pb.ChatEvent(delta=pb.ChatDelta(text=item.text, token_ids=item.token_ids))
                else:
                    history = svc.closed_history(item)
                    await turn
                    turn, turn_id = None, None
                    yield pb.ChatEvent(end=pb.TurnEnd(finish_reason=int(item.finish_reason), usage=_usage(item)))
        finally:
            reader.cancel()
            if turn is not None:
                turn.cancel()
                await asyncio.gather(turn, return_exceptions=True)

    @handle_errors
    async def CountTokens(self, request: pb.CountTokensRequest, context) -> pb.CountTokensResponse:
        return count_tokens(self.service, request)

    @handle_errors
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        svc = self.service
        return pb.ListModelsResponse(models=[pb.ModelInfo(name=svc.model_name, max_context=svc.limits.max_context)])


def count_tokens(svc: InferenceService, request: pb.CountTokensRequest) -> pb.CountTokensResponse:
    svc.check_model(request.model)
    which = request.WhichOneof("input")
    if which == "text":
        check_text(request.text, svc.limits, "text")
        count = len(svc.tokenizer.encode_prompt(request.text))
    elif which == "chat":
        count = len(svc.chat_ids(request.chat.messages, "chat.messages"))
    else:
        raise InvalidRequest("input", "set text or chat")
    return pb.CountTokensResponse(count=count, max_context=svc.limits.max_context)


class WorkerServicer(wpb_grpc.WorkerServicer):
    """The internal contract the router speaks: one bidirectional stream per request."""

    def __init__(self, service: InferenceService, info: wpb.InfoResponse):
        self.service = service
        self.info = info

    def _job(self, job: wpb.Job, context) -> Job:
        svc = self.service
        svc.check_model(job.model)
        if not job.request_id or len(job.request_id) > MAX_JOB_ID_CHARS:
            raise InvalidRequest("job.request_id", f"must be 1..{MAX_JOB_ID_CHARS} characters")
        which = job.WhichOneof("prompt")
        if which == "text":
            prompt = svc.text_prompt(job.text, "job.text")
        elif which == "chat":
            prompt = svc.chat_prompt(job.chat.messages, "job.chat.messages", job.history_token_ids)
        elif which == "token_ids":
            prompt = svc.token_prompt(job.token_ids.ids, "job.token_ids")
        else:
            raise InvalidRequest("job.prompt", "set text, chat or token_ids")
        if len(job.tenant) > 128:
            raise InvalidRequest("job.tenant", "must be at most 128 characters")
        deadline = _deadline(context)
        if job.deadline_unix_ms:
            wall = time.monotonic() + (job.deadline_unix_ms / 1000.0 - time.time())
            deadline = wall if deadline is None else min(deadline, wall)
        return svc.job(prompt, job.parameters, request_id=job.request_id, deadline=deadline,
                       params_field="job.parameters", is_chat_reply=which == "chat",
                       resume_token_ids=job.resume_token_ids, resume_field="job.resume_token_ids",
                       tenant=job.tenant, weight=job.tenant_weight or 1)

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
        async for event in self.service.stream(job, merge_final=True):
            if isinstance(event, ErrorEvent):
                raise event.error
            if isinstance(event, TokenEvent):
                if event.text or event.token_ids:
                    yield wpb.WorkerEvent(delta=wpb.TokenDelta(text=event.text, token_ids=event.token_ids))
            else:
                final = event.final
                yield wpb.WorkerEvent(finished=wpb.Finished(
                    finish_reason=int(event.finish_reason), usage=_usage(event),
                    history_token_ids=self.service.closed_history(event) if job.is_chat_reply else (),
                    last_delta=wpb.TokenDelta(text=final.text, token_ids=final.token_ids) if final else None,
                ))

    @handle_errors
    async def Info(self, request, context) -> wpb.InfoResponse:
        return self.info

    @handle_errors
    async def Load(self, request, context) -> wpb.LoadResponse:
        load = self.service.engine.load
        return wpb.LoadResponse(
            num_waiting=load.num_waiting,
            num_running=load.num_running,
            num_free_blocks=load.num_free_blocks,
            num_total_blocks=load.num_total_blocks,
            num_pending_tokens=load.num_pending_tokens,
        )

    @handle_errors
    async def CountTokens(self, request: pb.CountTokensRequest, context) -> pb.CountTokensResponse:
        return count_tokens(self.service, request)
