"""A scripted fake worker: the llamagrid.worker.v1.Worker contract and grpc.health.v1 on a real socket, no model.

Prompts become token ids word by word; a reply is a deterministic chain of ids seeded by the prompt (each token
depends on the prompt and on every token before it), so a job resumed elsewhere with Job.resume_token_ids continues
exactly the sequence an uninterrupted run would have sent, and a wrong resume shows in the output. Per-token delay,
slow acceptance, faults, health and the internal token are scripted; every job received is recorded (what the router
sent, what was streamed back, how it ended) for tests to wait on instead of sleeping.

In-process: `FakeWorker(script).start()` serves from a thread with its own event loop; `stop()` ends the server at
once (its streams reset, as when a process dies) and `start()` brings it back on the same port. As a process, for
tests that kill -9 it: `python -m tests.support.fake_worker --port-file F --script JSON` (one JSON line on stderr per
job started and ended), driven by `FakeWorkerProcess`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from array import array
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from common.internal_auth import INTERNAL_TOKEN_ENV, OPEN_PREFIXES, TOKEN_METADATA, InternalTokenInterceptor
from common.request_ids import MAX_JOB_ID_CHARS
from common.rpc_guard import RequestGuard
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from tests.support.waits import wait_until
from worker import chat_template

BOS, EOS, FIRST_ID = 1, 2, 3
WORKER_SERVICE = "llamagrid.worker.v1.Worker"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ROOT = Path(__file__).resolve().parents[2]


# ---- the script


@dataclass
class Fault:
    """What goes wrong with a job. `kind`: "fail" ends the call with status `code` once `after_tokens` new tokens
    were sent (0: refused before any event); "hang" stops sending there and answers nothing more (not even a Cancel)
    until the call is cancelled; "die" stops the whole server there (in a process: exits with `exit_code`), as a
    replica that dies mid-stream. Applies to the next `times` jobs (None: every job) whose request id contains
    `match`."""

    kind: str = "fail"
    after_tokens: int = 0
    code: str = "UNAVAILABLE"
    times: int | None = None
    match: str = ""
    exit_code: int = 1


@dataclass
class Script:
    model: str = "fake-llama"
    max_context: int = 4096  # Llama-2's
    default_max_new_tokens: int = 64
    kv_capacity_tokens: int = 8192
    block_size: int = 16
    max_num_seqs: int = 64
    vocab_size: int = 32000
    token_delay_s: float = 0.002  # between two tokens of a job
    accept_delay_s: float = 0.0  # a job waits this long (counted as waiting in Load) before it runs
    eos_after: int | None = None  # the n-th reply token is the end-of-sequence id (unless ignore_eos)
    faults: list[Fault] = field(default_factory=list)
    serving: bool = True  # health at start (NOT_SERVING: a replica that never finishes starting)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Script:
        data = json.loads(text)
        data["faults"] = [Fault(**f) for f in data.get("faults", [])]
        return cls(**data)


# ---- the fake model: deterministic ids and texts


def word_id(word: str, vocab_size: int) -> int:
    return FIRST_ID + zlib.crc32(word.encode()) % (vocab_size - FIRST_ID)


def token_text(token: int) -> str:
    return "" if token == EOS else f" t{token}"


def encode_text(text: str, vocab_size: int = Script.vocab_size) -> list[int]:
    """A text prompt: the beginning-of-sequence id, then one id per whitespace-separated word."""
    return [BOS, *(word_id(w, vocab_size) for w in text.split())]


def encode_chat(messages: Sequence, vocab_size: int = Script.vocab_size, history: Sequence[int] = ()) -> list[int]:
    """A conversation (after a session's history, when given): per message a role id, its words, an end id."""
    ids = list(history) if history else [BOS]
    for m in messages:
        ids += [word_id(f"<{m.role}>", vocab_size), *(word_id(w, vocab_size) for w in m.content.split()),
                word_id("</m>", vocab_size)]
    return ids


def _mix(state: int, token: int) -> int:
    return zlib.crc32(token.to_bytes(4, "little"), state)


def _seed_state(prompt_ids: Sequence[int], params: pb.SamplingParameters) -> int:
    state = zlib.crc32(array("I", prompt_ids).tobytes())
    if params.HasField("seed") and not (params.HasField("temperature") and params.temperature == 0.0):
        state = zlib.crc32(str(params.seed).encode(), state)
    return state


def reply(prompt_ids: Sequence[int], params: pb.SamplingParameters, num_tokens: int, script: Script | None = None,
          ) -> list[int]:
    """The first `num_tokens` tokens an uninterrupted job on `prompt_ids` generates (what a test expects)."""
    script = script or Script()
    state, out = _seed_state(prompt_ids, params), []
    for _ in range(num_tokens):
        token = _next(state, len(out), params, script)
        out.append(token)
        state = _mix(state, token)
    return out


def _next(state: int, position: int, params: pb.SamplingParameters, script: Script) -> int:
    if script.eos_after is not None and position + 1 == script.eos_after:
        return EOS
    return FIRST_ID + state % (script.vocab_size - FIRST_ID)


# ---- the record of what a job was and did


@dataclass
class JobRecord:
    request_id: str
    method: str  # "Run" or "Generate"
    job: wpb.Job
    metadata: dict[str, str]
    time_remaining_s: float | None  # the call's own deadline, as the worker saw it on arrival
    received_at: float = field(default_factory=time.monotonic)
    prompt_ids: list[int] = field(default_factory=list)
    state: str = "waiting"  # waiting, running, ended
    outcome: str = ""  # finished, cancelled (a Cancel message), deadline (the job's own), call_cancelled, failed,
    #                    refused (INVALID_ARGUMENT and the like), died
    sent_token_ids: list[int] = field(default_factory=list)  # new tokens this call streamed, the last one included
    num_generated: int = 0  # resumed tokens included
    finish_reason: int = 0
    cancel_received: bool = False
    ended_at: float | None = None

    @property
    def tenant(self) -> str:
        return self.job.tenant

    @property
    def tenant_weight(self) -> int:
        return self.job.tenant_weight

    @property
    def resume_token_ids(self) -> list[int]:
        return list(self.job.resume_token_ids)

    @property
    def history_token_ids(self) -> list[int]:
        return list(self.job.history_token_ids)

    @property
    def parameters(self) -> pb.SamplingParameters:
        return self.job.parameters

    @property
    def deadline_unix_ms(self) -> int:
        return self.job.deadline_unix_ms

    @property
    def ended(self) -> bool:
        return self.state == "ended"

    def summary(self) -> dict:
        return {"request_id": self.request_id, "method": self.method, "state": self.state, "outcome": self.outcome,
                "tenant": self.tenant, "tenant_weight": self.tenant_weight,
                "resume_token_ids": self.resume_token_ids, "num_history_token_ids": len(self.job.history_token_ids),
                "num_sent": len(self.sent_token_ids), "finish_reason": self.finish_reason,
                "deadline_unix_ms": self.deadline_unix_ms, "cancel_received": self.cancel_received}


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _invalid(field_: str, problem: str) -> _Refused:
    return _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{field_}: {problem}")


def _check_parameters(p: pb.SamplingParameters, script: Script, prefix: str) -> None:
    """The worker's checks of the parameters the router passes through (same fields, same messages)."""
    if p.HasField("max_new_tokens") and p.max_new_tokens == 0:
        raise _invalid(f"{prefix}.max_new_tokens", "must be at least 1")
    if p.HasField("max_new_tokens") and p.max_new_tokens > script.max_context:
        raise _invalid(f"{prefix}.max_new_tokens",
                       f"{p.max_new_tokens} is above the model's context of {script.max_context} tokens")
    if p.HasField("temperature") and not p.temperature >= 0:
        raise _invalid(f"{prefix}.temperature", "must be >= 0 (0 means greedy)")
    if p.HasField("top_p") and not 0.0 < p.top_p <= 1.0:
        raise _invalid(f"{prefix}.top_p", "must be in (0, 1]")
    for i, s in enumerate(p.stop):
        if not s:
            raise _invalid(f"{prefix}.stop[{i}]", "must not be empty")


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
            self.fake._check_model(request.model)
            which = request.WhichOneof("input")
            if which == "text":
                if not request.text:
                    raise _invalid("text", "must not be empty")
                count = len(encode_text(request.text, s.vocab_size))
            elif which == "chat":
                count = len(self.fake._chat_prompt(request.chat.messages, (), "chat.messages"))
            else:
                raise _invalid("input", "set text or chat")
        except _Refused as exc:
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

    def _check_model(self, model: str) -> None:
        if model and model != self.script.model:
            raise _Refused(grpc.StatusCode.NOT_FOUND,
                           f"model {model!r} is not served here; this worker serves {self.script.model!r}")

    def _chat_prompt(self, messages, history: Sequence[int], field_: str) -> list[int]:
        msgs = [chat_template.ChatMessage(m.role, m.content) for m in messages]
        try:
            chat_template.validate_messages(msgs, max_message_chars=100_000, is_continuation=bool(history))
        except chat_template.ChatTemplateError as e:
            raise _invalid(f"{field_.removesuffix('.messages')}.{e.field}", e.message) from None
        return encode_chat(messages, self.script.vocab_size, history)

    def _prompt(self, job: wpb.Job) -> list[int]:
        s = self.script
        self._check_model(job.model)
        if not job.request_id or len(job.request_id) > MAX_JOB_ID_CHARS:
            raise _invalid("job.request_id", f"must be 1..{MAX_JOB_ID_CHARS} characters")
        which = job.WhichOneof("prompt")
        if which == "text":
            if not job.text:
                raise _invalid("job.text", "must not be empty")
            ids, field_ = encode_text(job.text, s.vocab_size), "job.text"
        elif which == "chat":
            ids, field_ = self._chat_prompt(job.chat.messages, job.history_token_ids, "job.chat.messages"), "job.chat"
        elif which == "token_ids":
            ids, field_ = list(job.token_ids.ids), "job.token_ids"
        else:
            raise _invalid("job.prompt", "set text, chat or token_ids")
        if len(ids) >= s.max_context:
            raise _invalid(field_, f"prompt has {len(ids)} tokens; the model's context is {s.max_context} tokens "
                                   "and at least one must be left to generate")
        _check_parameters(job.parameters, s, "job.parameters")
        for i, t in enumerate(job.resume_token_ids):
            if t >= s.vocab_size:
                raise _invalid(f"job.resume_token_ids[{i}]", f"token id {t} is outside the vocabulary of "
                                                              f"{s.vocab_size}")
        return ids

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
                record.prompt_ids = self._prompt(job)
            except _Refused as exc:
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
        state = _seed_state(record.prompt_ids, params)
        for token in generated:
            state = _mix(state, token)
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
            token = _next(state, len(generated), params, s)
            state = _mix(state, token)
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


# ---- as a process


class FakeWorkerProcess:
    """`python -m tests.support.fake_worker` in a process of its own (kill -9 it like a real replica); its stderr,
    one JSON object per line, goes to `log_path`."""

    def __init__(self, log_path: Path, script: Script | None = None, *, port: int = 0,
                 internal_token: str | None = None, timeout_s: float = 30.0, exit_after_s: float | None = None,
                 ) -> None:
        """`exit_after_s`: the process exits by itself (status 2, as a crash) that long after it serves."""
        self.log_path = log_path
        self.script = script or Script()
        port_file = Path(tempfile.mkdtemp(prefix="fake-worker-")) / "port"
        env = {**os.environ, **({INTERNAL_TOKEN_ENV: internal_token} if internal_token else {})}
        extra = ["--exit-after", str(exit_after_s)] if exit_after_s is not None else []
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.fake_worker", "--port", str(port),
                                          "--port-file", str(port_file), "--script", self.script.to_json(), *extra],
                                         cwd=ROOT, env=env, stderr=log)
        try:
            text = wait_until(lambda: port_file.exists() and port_file.read_text() or self.proc.poll() is not None,
                              "the fake worker process's port file", timeout_s)
            assert self.proc.poll() is None, f"the fake worker exited with {self.proc.returncode}"
            self.port = int(text)
        finally:
            with contextlib.suppress(OSError):
                port_file.unlink()
                port_file.parent.rmdir()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def events(self, name: str | None = None) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and (name is None or event.get("event") == name):
                    out.append(event)
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


class Respawner:
    """What a supervisor does for a fake worker process: start it again on the same port whenever it exits, until
    stopped. Life n logs to `<base>-<n>.stderr`; `exit_codes` holds how each life ended."""

    def __init__(self, base: Path, script: Script, port: int = 0, **kwargs) -> None:
        self.base, self.script, self.kwargs = base, script, kwargs
        self.lives: list[FakeWorkerProcess] = []
        self.exit_codes: list[int] = []
        self._stop = threading.Event()
        self._spawn(port)
        self.port = self.lives[0].port
        self._thread = threading.Thread(target=self._watch, name="fake-respawner", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, port: int) -> None:
        self.lives.append(FakeWorkerProcess(self.base.with_name(f"{self.base.name}-{len(self.lives) + 1}.stderr"),
                                            self.script, port=port, **self.kwargs))

    def _watch(self) -> None:
        while not self._stop.is_set():
            code = self.lives[-1].proc.wait()
            if self._stop.is_set():
                return
            self.exit_codes.append(code)
            self._spawn(self.port)

    def events(self, name: str | None = None, life: int | None = None) -> list[dict]:
        """Events of one life (1-based), or of all."""
        lives = self.lives if life is None else [self.lives[life - 1]]
        return [e for p in list(lives) for e in p.events(name)]

    def stop(self) -> None:
        self._stop.set()
        for life in list(self.lives):
            life.stop()
        self._thread.join(10)
        for life in list(self.lives):  # (one the watcher may have started meanwhile)
            life.stop()


def _log_event(name: str, record: JobRecord) -> None:
    sys.stderr.write(json.dumps({"event": name, **record.summary()}) + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.fake_worker")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--script", default="{}", help="a Script as JSON")
    parser.add_argument("--exit-after", type=float, default=None, help="exit with status 2 this long after serving")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    fake = FakeWorker(Script.from_json(args.script), port=args.port,
                      internal_token=os.environ.get(INTERNAL_TOKEN_ENV) or None, on_event=_log_event,
                      exit_process=True).start()
    tmp = args.port_file.with_suffix(".tmp")
    tmp.write_text(str(fake.port))
    tmp.rename(args.port_file)
    _log_event_plain("fake_worker_serving", port=fake.port, model=fake.script.model)
    if args.exit_after is not None and not stop.wait(args.exit_after):
        _log_event_plain("fake_worker_crashing")
        os._exit(2)
    while not stop.wait(1.0):  # (a plain wait() may not wake for the signal handler)
        pass
    fake.stop(grace_s=5)
    _log_event_plain("fake_worker_stopped")
    return 0


def _log_event_plain(name: str, **fields) -> None:
    sys.stderr.write(json.dumps({"event": name, **fields}) + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
