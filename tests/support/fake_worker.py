"""A scripted fake worker: the llamagrid.worker.v1.Worker contract and grpc.health.v1 on a real socket, no model.

What it generates is tests.support.fake_model's (deterministic from the prompt, so a resumed job continues exactly);
per-token delay, slow acceptance, faults, health and the internal token are scripted; every job received is recorded
(what the router sent, what was streamed back, how it ended) for tests to wait on instead of sleeping.

In-process: `FakeWorker(script).start()` serves from a thread with its own event loop; `stop()` ends the server at
once (its streams reset, as when a process dies) and `start()` brings it back on the same port. As a process, for
tests that kill -9 it: `python -m tests.support.fake_worker --port-file F --script JSON` (tests.support.fake_process).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
import zlib
from array import array
from collections.abc import AsyncIterator, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from common.internal_auth import OPEN_PREFIXES, TOKEN_METADATA, InternalTokenInterceptor
from common.rpc_guard import RequestGuard
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from tests.support.fake_model import (
    EOS,
    Fault,
    JobRecord,
    Refused,
    Script,
    chat_prompt,
    check_model,
    encode_text,
    invalid,
    job_prompt,
    mix,
    next_token,
    seed_state,
    token_text,
)
from tests.support.waits import wait_until

WORKER_SERVICE = "llamagrid.worker.v1.Worker"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _TokenCheck(InternalTokenInterceptor):
    """The worker's internal-token check, noting the method of every call it refuses."""

    def __init__(self, token: str, refused: list[str]) -> None:
        super().__init__(token)
        self._token_text, self._refused = token, refused

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        presented = dict(handler_call_details.invocation_metadata or ()).get(TOKEN_METADATA)
        if not method.startswith(OPEN_PREFIXES) and presented != self._token_text:
            self._refused.append(method)
        return await super().intercept_service(continuation, handler_call_details)


# ---- the servicer


class _Servicer(wpb_grpc.WorkerServicer):
    def __init__(self, fake: FakeWorker) -> None:
        self.fake = fake

    async def Info(self, request, context):
        await self.fake._thawed.wait()
        s = self.fake.script
        return wpb.InfoResponse(model=s.model, max_context=s.max_context, tp_size=1,
                                kv_capacity_tokens=s.kv_capacity_tokens, block_size=s.block_size,
                                max_num_seqs=s.max_num_seqs, dtype="float32", device="cpu",
                                vocab_size=s.vocab_size, default_max_new_tokens=s.default_max_new_tokens)

    async def Load(self, request, context):
        await self.fake._thawed.wait()
        return self.fake.load()

    async def CountTokens(self, request: pb.CountTokensRequest, context):
        await self.fake._thawed.wait()
        s = self.fake.script
        try:
            check_model(request.model, s)
            which = request.WhichOneof("input")
            if which == "text":
                if not request.text:
                    raise invalid("text", "must not be empty")
                count = len(encode_text(request.text, s.vocab_size))
            elif which == "chat":
                count = len(chat_prompt(request.chat.messages, (), "chat.messages", s))
            else:
                raise invalid("input", "set text or chat")
        except Refused as exc:
            await context.abort(exc.code, exc.message)
        return pb.CountTokensResponse(count=count, max_context=s.max_context)

    async def Run(self, request: wpb.Job, context) -> AsyncIterator[wpb.WorkerEvent]:
        async for event in self.fake._serve(request, context, "Run", None):
            yield event

    async def Generate(self, request_iterator, context) -> AsyncIterator[wpb.WorkerEvent]:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("job"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "job: the first message must be the job")
        cancel = asyncio.Event()
        records: list[JobRecord] = []

        async def watch() -> None:
            async for msg in request_iterator:
                if msg.HasField("cancel"):
                    if records:
                        records[0].cancel_received = True
                    cancel.set()

        watcher = asyncio.create_task(watch())
        try:
            async for event in self.fake._serve(first.job, context, "Generate", cancel, records):
                yield event
        finally:
            watcher.cancel()
            with contextlib.suppress(BaseException):
                await watcher


class FakeWorker:
    """One fake replica. `script` may be changed while it serves (new faults, delays); `jobs` is every job received."""

    def __init__(self, script: Script | None = None, *, port: int = 0, internal_token: str | None = None,
                 on_event: Callable[[str, JobRecord], None] | None = None, exit_process: bool = False) -> None:
        self.script = script or Script()
        self.port = port
        self.internal_token = internal_token
        self.jobs: list[JobRecord] = []
        self.refused: list[str] = []  # methods of the calls refused for want of the internal token
        self._on_event = on_event
        self._exit_process = exit_process  # a "die" fault exits the process (process mode)
        self._cache: set[int] = set()  # prefix hashes at block boundaries of what jobs computed (a prefix cache)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self._health: HealthServicer | None = None
        self._thawed: asyncio.Event | None = None

    # ---- lifecycle (called from the test's thread)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def is_running(self) -> bool:
        return self._thread is not None

    def start(self) -> FakeWorker:
        assert self._thread is None, "already started"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"fake-worker-{self.port}", daemon=True)
        self._thread.start()
        self.port = self._call(self._start())
        return self

    def stop(self, grace_s: float | None = 0) -> None:
        """Stop serving. With the default grace of 0 every call in flight is reset at once, as when a process dies."""
        if self._thread is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._stop(grace_s), timeout_s=(grace_s or 0) + 10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        with contextlib.suppress(Exception):  # handlers' async generators, so none is finalized after close()
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()
        self._thread = self._loop = self._server = None

    def __enter__(self) -> FakeWorker:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def set_serving(self, serving: bool) -> None:
        """grpc health of "" and of the Worker service: SERVING or NOT_SERVING."""
        self._call(self._set_health(SERVING if serving else NOT_SERVING))

    def freeze(self) -> None:
        """Answer nothing (Info, Load, CountTokens, jobs) until thaw(), as a stopped process whose connections stay
        open; its health watch stays open too, with no news."""
        self._loop.call_soon_threadsafe(self._thawed.clear)

    def thaw(self) -> None:
        self._loop.call_soon_threadsafe(self._thawed.set)

    def add_fault(self, fault: Fault) -> Fault:
        self.script.faults.append(fault)
        return fault

    # ---- what was received (read from the test's thread)

    def job(self, request_id: str) -> JobRecord | None:
        return next((j for j in reversed(self.jobs) if j.request_id == request_id), None)

    def jobs_matching(self, text: str) -> list[JobRecord]:
        return [j for j in list(self.jobs) if text in j.request_id]

    def active(self) -> list[JobRecord]:
        return [j for j in list(self.jobs) if not j.ended]

    def wait_for(self, condition: Callable[[FakeWorker], object], what: str, timeout_s: float = 10.0):
        return wait_until(lambda: condition(self), f"{what} on the fake worker {self.address}", timeout_s)

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Until no job runs or waits here (every call the router made has ended, one way or another)."""
        wait_until(lambda: not self.active(), f"no job in flight on {self.address} (still: "
                   f"{[j.summary() for j in self.active()]})", timeout_s)

    def load(self) -> wpb.LoadResponse:
        s = self.script
        active = self.active()
        total = s.kv_capacity_tokens // s.block_size
        used = sum(-(-(len(j.prompt_ids) + j.num_generated) // s.block_size) for j in active if j.state == "running")
        pending = sum(max(0, self._max_new(j) - j.num_generated) for j in active)
        return wpb.LoadResponse(num_waiting=sum(j.state == "waiting" for j in active),
                                num_running=sum(j.state == "running" for j in active),
                                num_free_blocks=max(0, total - used), num_total_blocks=total,
                                num_pending_tokens=pending)

    # ---- internals (on the fake's own loop)

    def _call(self, coro, timeout_s: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    async def _start(self) -> int:
        self._thawed = asyncio.Event()
        self._thawed.set()
        interceptors = [_TokenCheck(self.internal_token, self.refused)] if self.internal_token else []
        self._server = grpc.aio.server(interceptors=[*interceptors, RequestGuard()],
                                       options=[("grpc.so_reuseport", 0)])
        wpb_grpc.add_WorkerServicer_to_server(_Servicer(self), self._server)
        self._health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        port = self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        if port == 0:
            raise RuntimeError(f"the fake worker could not bind port {self.port}")
        await self._server.start()
        await self._set_health(SERVING if self.script.serving else NOT_SERVING)
        return port

    async def _stop(self, grace_s: float | None) -> None:
        self._thawed.set()
        await self._server.stop(grace_s)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:  # whatever the server left running (a handler's watcher of its request stream)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _set_health(self, status) -> None:
        for service in ("", WORKER_SERVICE):
            await self._health.set(service, status)

    def _max_new(self, record: JobRecord) -> int:
        p = record.job.parameters
        wanted = p.max_new_tokens if p.HasField("max_new_tokens") else self.script.default_max_new_tokens
        return max(0, min(wanted, self.script.max_context - len(record.prompt_ids)))

    def _fault(self, record: JobRecord) -> Fault | None:
        for fault in list(self.script.faults):
            if fault.match in record.request_id and (fault.times is None or fault.times > 0):
                if fault.times is not None:
                    fault.times -= 1
                return fault
        return None

    def _cached_tokens(self, prompt_ids: list[int]) -> int:
        bs, crc, cached = self.script.block_size, 0, 0
        for end in range(bs, len(prompt_ids), bs):  # at least one prompt token is always computed
            crc = zlib.crc32(array("I", prompt_ids[end - bs:end]).tobytes(), crc)
            if crc not in self._cache:
                break
            cached = end
        return cached

    def _remember(self, computed: list[int]) -> None:
        bs, crc = self.script.block_size, 0
        for end in range(bs, len(computed) + 1, bs):
            crc = zlib.crc32(array("I", computed[end - bs:end]).tobytes(), crc)
            self._cache.add(crc)

    def _emit(self, name: str, record: JobRecord) -> None:
        if self._on_event is not None:
            self._on_event(name, record)

    async def _serve(self, job: wpb.Job, context, method: str, cancel: asyncio.Event | None,
                     records: list[JobRecord] | None = None) -> AsyncIterator[wpb.WorkerEvent]:
        record = JobRecord(job.request_id, method, job, {k: v for k, v in context.invocation_metadata() or ()},
                           context.time_remaining())
        if records is not None:
            records.append(record)
        self.jobs.append(record)
        self._emit("job_started", record)
        generated: list[int] = list(job.resume_token_ids)
        try:
            await self._thawed.wait()
            try:
                record.prompt_ids = job_prompt(job, self.script)
            except Refused as exc:
                record.outcome = "refused"
                await context.abort(exc.code, exc.message)
            fault = self._fault(record)
            if fault is not None and fault.kind == "fail" and fault.after_tokens == 0:
                record.outcome = "failed"
                await context.abort(grpc.StatusCode[fault.code], "fake worker: scripted failure")
            if self.script.accept_delay_s:
                await asyncio.sleep(self.script.accept_delay_s)
            record.state = "running"
            record.num_generated = len(generated)
            async for event in self._generate(record, generated, fault, cancel, context):
                yield event
        except (asyncio.CancelledError, GeneratorExit):  # (GeneratorExit: cancelled while at a yield)
            if not record.outcome:
                record.outcome = "call_cancelled"
            raise
        finally:
            record.state = "ended"
            record.ended_at = time.monotonic()
            if not record.outcome:
                record.outcome = "failed"
            if record.prompt_ids:
                self._remember(record.prompt_ids + generated[:-1])
            self._emit("job_ended", record)

    async def _generate(self, record: JobRecord, generated: list[int], fault: Fault | None,
                        cancel: asyncio.Event | None, context) -> AsyncIterator[wpb.WorkerEvent]:
        job, s = record.job, self.script
        params = job.parameters
        max_new = self._max_new(record)
        state = seed_state(record.prompt_ids, params)
        for token in generated:
            state = mix(state, token)
        deadline = job.deadline_unix_ms / 1000.0 if job.deadline_unix_ms else None

        def finish_reason() -> int:
            if generated and generated[-1] == EOS and not params.ignore_eos:
                return pb.EOS
            return pb.LENGTH if len(generated) >= max_new else 0

        reason, last = finish_reason(), None
        while not reason:
            if fault is not None and len(record.sent_token_ids) >= fault.after_tokens:
                await self._apply(fault, record, context)
            if s.token_delay_s:
                await asyncio.sleep(s.token_delay_s)
            await self._thawed.wait()
            if cancel is not None and cancel.is_set():
                reason = pb.CANCELLED
                record.outcome = "cancelled"
                break
            if deadline is not None and time.time() >= deadline:
                reason = pb.CANCELLED
                record.outcome = "deadline"
                break
            token = next_token(state, len(generated), params, s)
            state = mix(state, token)
            generated.append(token)
            record.sent_token_ids.append(token)
            record.num_generated = len(generated)
            reason = finish_reason()
            if reason:
                last = token
            else:
                yield wpb.WorkerEvent(delta=wpb.TokenDelta(text=token_text(token), token_ids=[token]))
        record.finish_reason = reason
        record.outcome = record.outcome or "finished"
        usage = pb.Usage(prompt_tokens=len(record.prompt_ids), completion_tokens=len(generated),
                         cached_prompt_tokens=self._cached_tokens(record.prompt_ids))
        finished = wpb.Finished(finish_reason=reason, usage=usage)
        if last is not None:
            finished.last_delta.CopyFrom(wpb.TokenDelta(text=token_text(last), token_ids=[last]))
        if job.WhichOneof("prompt") == "chat":
            history = record.prompt_ids + generated
            finished.history_token_ids.extend(history if generated and generated[-1] == EOS else [*history, EOS])
        yield wpb.WorkerEvent(finished=finished)

    async def _apply(self, fault: Fault, record: JobRecord, context) -> None:
        if fault.kind == "fail":
            record.outcome = "failed"
            await context.abort(grpc.StatusCode[fault.code], "fake worker: scripted failure")
        if fault.kind == "die":
            record.outcome = "died"
            if self._exit_process:
                self._emit("job_ended", record)
                sys.stderr.flush()
                os._exit(fault.exit_code)
            asyncio.get_running_loop().create_task(self._server.stop(0))
        await asyncio.Event().wait()  # hung (or dying): only the call's cancellation ends this


class FakeFleet:
    """Fake workers started for a test (or a module), all stopped at its end."""

    def __init__(self) -> None:
        self.started: list[FakeWorker] = []

    def start(self, script: Script | None = None, **kwargs) -> FakeWorker:
        fake = FakeWorker(script, **kwargs).start()
        self.started.append(fake)
        return fake

    def start_many(self, n: int, script_fn=Script, **kwargs) -> list[FakeWorker]:
        return [self.start(script_fn(), **kwargs) for _ in range(n)]

    def stop_all(self) -> None:
        for fake in self.started:
            with contextlib.suppress(Exception):
                fake.stop()


if __name__ == "__main__":  # the process form lives in tests.support.fake_process
    from tests.support.fake_process import main

    sys.exit(main())
