"""The router's public llamagrid.v1.Inference: admit each call (router.admission), relay its jobs from workers
(router.relay), Chat sessions turn by turn (router.chat). Holds no per-session state outside a live stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import structlog

from common.errors import InvalidRequest, handle_errors, handle_stream_errors
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from router.admission import Admission
from router.auth import Presented
from router.calls import CallRecord, begin_call, call_ended
from router.chat import ChatCall
from router.concurrency import REQUESTS, SESSIONS
from router.config import RouterConfig
from router.costs import estimate_chat, estimate_text, max_new
from router.errors import NoHealthyWorker, ServiceError, from_rpc_error
from router.fanout import Fanout, Single
from router.keys import KeyRecord
from router.metrics import RouterMetrics
from router.relay import Relay, new_job

log = structlog.get_logger("router.server")

MAX_INPUTS = 64
MAX_N = 16  # completions per input
MAX_SEED = 2**63 - 1  # (the workers' largest seed)
Jobs = Single | Fanout
_NO_NEW_TOKENS = pb.SamplingParameters(max_new_tokens=0)  # CountTokens generates nothing


class RouterServicer(pb_grpc.InferenceServicer):
    def __init__(self, config: RouterConfig, admission: Admission, relay: Relay, metrics: RouterMetrics) -> None:
        self.config = config
        self.admission = admission
        self.relay = relay
        self.metrics = metrics

    def rpc_observer(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """Called by common.errors' decorators when a call ends: metrics, and the call's request_finished."""
        self.metrics.rpc_observer(method, code, seconds)
        call_ended(code)

    # ---- Generate and GenerateStream

    @handle_errors
    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        return await self.generate(request, context, begin_call("Generate", context))

    @handle_errors
    async def GenerateStream(self, request: pb.GenerateRequest, context) -> None:
        await self.generate_stream(request, context, begin_call("GenerateStream", context))

    # The calls' bodies, shared with the HTTP edge (router.http), which passes a context of its own: errors are
    # raised as ServiceError, for the caller to map to its protocol's status.

    async def generate(self, request: pb.GenerateRequest, context, record: CallRecord) -> pb.GenerateResponse:
        jobs = None
        try:
            jobs = await self._admit_generate(request, context, record)
            n = completions(request)
            outputs = [pb.Completion() for _ in jobs.jobs]
            texts: list[list[str]] = [[] for _ in jobs.jobs]
            async for index, event in jobs.events():
                if event.HasField("delta"):
                    delta = event.delta
                else:
                    fin = event.finished
                    delta = fin.last_delta
                    outputs[index].finish_reason = fin.finish_reason
                    outputs[index].usage.CopyFrom(fin.usage)
                    record.add_usage(billed(fin.usage, index, n))
                texts[index].append(delta.text)
                outputs[index].token_ids.extend(delta.token_ids)
                if delta.logprobs:
                    outputs[index].logprobs.extend(delta.logprobs)
            for out, parts in zip(outputs, texts, strict=True):
                out.text = "".join(parts)
            return pb.GenerateResponse(outputs=outputs)
        finally:
            await self.relay.close(jobs)
            self.admission.settle(record)

    async def generate_stream(self, request: pb.GenerateRequest, context, record: CallRecord) -> None:
        # Written with context.write (not as an async generator): each message goes from the worker's stream to the
        # client's in the same step of this call's task, with no generator layers in between.
        jobs = None
        try:
            jobs = await self._admit_generate(request, context, record)
            n = completions(request)
            write = context.write
            async for index, event in jobs.events():
                if event.HasField("delta"):
                    delta = event.delta
                    chunk = pb.GenerateChunk(index=index, text=delta.text, token_ids=delta.token_ids)
                else:
                    fin = event.finished
                    record.add_usage(billed(fin.usage, index, n))
                    delta = fin.last_delta
                    chunk = pb.GenerateChunk(index=index, text=delta.text, token_ids=delta.token_ids,
                                             finish_reason=fin.finish_reason, usage=fin.usage)
                if delta.logprobs:
                    chunk.logprobs.extend(delta.logprobs)
                await write(chunk)
        finally:
            await self.relay.close(jobs)
            self.admission.settle(record)

    def _jobs(self, request: pb.GenerateRequest, model: str, context, record: CallRecord,
              key: KeyRecord) -> list[wpb.Job]:
        tier = self.admission.tiers.get(key.tier)
        weight = tier.weight if tier is not None else 1
        n = completions(request)
        base = request.parameters
        if base.HasField("n"):  # (a worker runs one completion per job)
            base = pb.SamplingParameters()
            base.CopyFrom(request.parameters)
            base.ClearField("n")
        jobs = []
        for i, prompt in enumerate([*request.inputs, *request.conversations]):
            for j in range(n):
                params = base
                if j and base.HasField("seed"):  # the j-th completion's own seeded stream
                    params = pb.SamplingParameters()
                    params.CopyFrom(base)
                    params.seed = (base.seed + j) & MAX_SEED
                job = new_job(f"{record.request_id}/{i * n + j}", model, params, context, key.tenant, weight)
                if isinstance(prompt, str):
                    job.text = prompt
                else:
                    job.chat.messages.extend(prompt.messages)
                jobs.append(job)
        return jobs

    async def _admit_generate(self, request: pb.GenerateRequest, context, record: CallRecord) -> Jobs:
        """Authenticate and charge a Generate/GenerateStream request; its jobs, started (possibly while the
        admission was in flight: _dispatch_ahead)."""
        admission = self.admission
        presented = admission.begin(context)
        conversations = request.conversations
        count = len(request.inputs) + len(conversations)
        record.inputs = count
        num_chars = (sum(len(t) for t in request.inputs)
                     + sum(len(m.content) for c in conversations for m in c.messages))
        n = completions(request)
        well_formed = (0 < count <= MAX_INPUTS and not (request.inputs and conversations) and 1 <= n <= MAX_N
                       and num_chars <= self.config.max_request_chars)
        default_max_new = admission.default_max_new(request.model)
        cost = 0
        if well_formed:  # each prompt once, each completion's budget
            params = request.parameters
            cost = (sum(estimate_text(t, params, default_max_new) for t in request.inputs)
                    + sum(estimate_chat(c.messages, params, default_max_new) for c in conversations)
                    + (n - 1) * count * max_new(params, default_max_new))
        # Started ahead, the jobs' worker calls are on their way before the admission's Redis command is (gRPC sends
        # a call from a task it schedules at once; the limiter's commands go out at the end of this loop pass).
        ahead = self._dispatch_ahead(presented, request, cost, context, record) if well_formed else None
        try:
            admitted = await admission.admit(presented, request.model, cost, record, well_formed)
            key, model = admitted.key, admitted.model
            record.model = model
            _check_inputs(request)
            admission.check_size(num_chars, "conversations" if conversations else "inputs")
            record.slot = admission.hold(key, REQUESTS, cost, admitted.decided)
            await admission.charge(key, cost, context, record, decided=admitted.decided,
                                   field="conversations" if conversations else "inputs")
        except BaseException:
            if ahead is not None:
                await self._drop_ahead(ahead[1])
            raise
        log.debug("request_admitted", request_id=record.request_id, key_id=key.key_id, inputs=len(request.inputs),
                  reserved=cost, one_round_trip=admitted.decided is not None, dispatched_ahead=ahead is not None)
        jobs = await self._kept_ahead(ahead, model)
        if jobs is None:
            jobs = self.relay.fanout(self._jobs(request, model, context, record, key), context, record,
                                     completions(request))
        try:
            await admission.headers_out(record, context)  # meanwhile the jobs run; their first events wait for it
        except BaseException:
            await self.relay.close(jobs)
            raise
        return jobs

    def _dispatch_ahead(self, presented: Presented, request: pb.GenerateRequest, cost: int, context,
                        record: CallRecord) -> tuple[str, Jobs] | None:
        """Start the request's jobs before its admission is decided, when it is all but certain to be admitted
        (router.ahead): (model, the started jobs), or None."""
        if not self.config.dispatch_ahead:
            return None
        key = self.admission.known(presented)
        if key is None:
            return None
        try:
            model = self.admission.resolve_model(key, request.model)
        except ServiceError:
            return None
        if not self.admission.room_ahead(key, cost):
            return None
        return model, self.relay.fanout(self._jobs(request, model, context, record, key), context, record,
                                        completions(request))

    async def _kept_ahead(self, ahead: tuple[str, Jobs] | None, model: str) -> Jobs | None:
        """The jobs dispatched ahead, if they are what was admitted."""
        if ahead is None:
            return None
        if ahead[0] != model:  # the pool changed meanwhile: never serve what was not asked
            await self._drop_ahead(ahead[1])
            return None
        self.metrics.dispatch_ahead("kept")
        return ahead[1]

    async def _drop_ahead(self, jobs: Jobs) -> None:
        """Cancel jobs sent ahead whose admission said no (or whose call ended first)."""
        self.metrics.dispatch_ahead("cancelled")
        await self.relay.close(jobs)

    # ---- Chat

    @handle_stream_errors
    async def Chat(self, request_iterator, context) -> AsyncIterator[pb.ChatEvent]:
        record = begin_call("Chat", context)  # the session until its first turn, then each turn's own
        presented = self.admission.begin(context)
        key = (await self.admission.admit(presented, None, 0, record, one_round_trip=False)).key
        session_slot = self.admission.hold(key, SESSIONS)
        try:
            call = ChatCall(self.config, self.admission, self.relay, self.metrics, context, presented, key, record)
            async for event in call.run(request_iterator):
                yield event
        finally:
            session_slot.release()

    # ---- CountTokens and ListModels

    @handle_errors
    async def CountTokens(self, request: pb.CountTokensRequest, context) -> pb.CountTokensResponse:
        record = begin_call("CountTokens", context)
        admission = self.admission
        presented = admission.begin(context)
        # metered like any call: one request, and the text's token estimate (settled to the exact count)
        which = request.WhichOneof("input")
        if which == "chat":
            field_, num_chars = "chat.messages", sum(len(m.content) for m in request.chat.messages)
            cost = estimate_chat(request.chat.messages, _NO_NEW_TOKENS, 0)
        else:
            field_, num_chars = "text", len(request.text)
            cost = estimate_text(request.text, _NO_NEW_TOKENS, 0)
        well_formed = which is not None and num_chars <= self.config.max_request_chars
        admitted = await admission.admit(presented, request.model, cost, record, well_formed)
        record.model, record.inputs = admitted.model, 1
        if which is None:
            raise InvalidRequest("input", "set text or chat")
        admission.check_size(num_chars, field_)
        record.slot = admission.hold(admitted.key, REQUESTS, cost, admitted.decided)
        try:
            await admission.charge(admitted.key, cost, context, record, decided=admitted.decided, field=field_)
            await admission.headers_out(record, context)
            return await self._count_tokens(request, admitted.model, context, record)
        finally:
            admission.settle(record)

    async def _count_tokens(self, request: pb.CountTokensRequest, model: str, context,
                            record: CallRecord) -> pb.CountTokensResponse:
        pool = self.relay.pool
        picked = pool.pick(model)
        if picked is None:
            raise NoHealthyWorker("no healthy worker for the model")
        record.worker = picked[0].address
        forwarded = pb.CountTokensRequest()
        forwarded.CopyFrom(request)
        forwarded.model = model
        try:
            response = await pool.stub(picked[0].address).CountTokens(
                forwarded, timeout=context.time_remaining(), metadata=pool.metadata)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc
        record.prompt_tokens = response.count
        return response

    @handle_errors
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return await self.list_models(context, begin_call("ListModels", context))

    async def list_models(self, context, record: CallRecord) -> pb.ListModelsResponse:
        admitted = await self.admission.admit(self.admission.begin(context), None, 0, record)  # metered: 1 request
        await self.admission.charge(admitted.key, 0, context, record, decided=admitted.decided)
        await self.admission.headers_out(record, context)
        pool = self.relay.pool
        return pb.ListModelsResponse(models=[pb.ModelInfo(name=name, max_context=pool.max_context(name))
                                             for name in pool.models()])


def billed(usage: pb.Usage, index: int, n: int) -> pb.Usage:
    """What a completion costs its key: a prompt's later completions (index % n > 0) share its prefill, so only
    their generated tokens count."""
    if index % n == 0:
        return usage
    return pb.Usage(completion_tokens=usage.completion_tokens)


def completions(request: pb.GenerateRequest) -> int:
    """Completions per input (SamplingParameters.n, default 1)."""
    return request.parameters.n if request.parameters.HasField("n") else 1


def _check_inputs(request: pb.GenerateRequest) -> None:
    if not 1 <= completions(request) <= MAX_N:
        raise InvalidRequest("parameters.n", f"must be between 1 and {MAX_N}")
    if request.inputs and request.conversations:
        raise InvalidRequest("conversations", "set inputs or conversations, not both")
    if request.conversations:
        if len(request.conversations) > MAX_INPUTS:
            raise InvalidRequest("conversations", f"at most {MAX_INPUTS} conversations per request")
        for i, conversation in enumerate(request.conversations):
            if not conversation.messages:
                raise InvalidRequest(f"conversations[{i}].messages", "at least one message is required")
        return
    if not request.inputs:
        raise InvalidRequest("inputs", "at least one input is required")
    if len(request.inputs) > MAX_INPUTS:
        raise InvalidRequest("inputs", f"at most {MAX_INPUTS} inputs per request")
