"""The asyncio side of the engine: build validated jobs from plain values, stream their events, abort on exit.

No protobuf here: worker.server reads the Worker API's messages into these types and writes the events back.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import structlog

from common.errors import DuplicateRequest, EngineUnavailable, InvalidRequest, ModelNotFound
from worker import chat_template
from worker.chat_template import ChatMessage
from worker.engine import Engine, EngineRequest, ErrorEvent, Event, FinishEvent, TokenEvent
from worker.sequence import SamplingParams
from worker.tokenizer import Tokenizer
from worker.validation import (
    Limits,
    RequestedParameters,
    check_parameters,
    check_prompt_length,
    check_request_id,
    check_resume_tokens,
    check_tenant,
    check_text,
    resolve_parameters,
)

log = structlog.get_logger("worker.service")


@dataclass(frozen=True, slots=True)
class Job:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    deadline: float | None = None  # time.monotonic()
    is_chat_reply: bool = False
    resume_token_ids: tuple[int, ...] = ()  # output already streamed by another worker (failover)
    tenant: str = ""  # whose request (the router's API-key tenant); "" = the one shared tenant
    weight: int = 1  # the tenant's share of this replica relative to other tenants' (>= 1)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What this replica serves and how big it is (Worker.Info)."""

    model: str
    max_context: int
    tp_size: int
    kv_capacity_tokens: int  # num_blocks * block_size
    block_size: int
    max_num_seqs: int
    dtype: str
    device: str
    vocab_size: int
    default_max_new_tokens: int  # of a job that sets none


def coalesce(events: list[Event]) -> list[Event]:
    """Merge runs of consecutive TokenEvents into one (texts and ids concatenated); other events stay as they are."""
    if len(events) < 2:
        return events
    out: list[Event] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, TokenEvent) and isinstance(last, TokenEvent):
            out[-1] = TokenEvent(last.text + event.text, last.token_ids + event.token_ids,
                                 last.logprobs + event.logprobs)
        else:
            out.append(event)
    return out


def merge_final(batch: list[Event]) -> list[Event]:
    """Tokens that came in the same step as the Finish ride with it (FinishEvent.final), one message less."""
    if len(batch) >= 2 and isinstance(batch[-1], FinishEvent) and isinstance(batch[-2], TokenEvent):
        batch[-1].final = batch.pop(-2)
    return batch


class WorkerService:
    """Everything the Worker API needs, in one place: prompt building, checks and streaming."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, limits: Limits, info: WorkerInfo):
        self.engine = engine
        self.tokenizer = tokenizer
        self.limits = limits
        self.info = info
        self.is_accepting = False
        self._in_flight: set[str] = set()
        self.metrics = None  # worker.metrics.WorkerMetrics when --metrics-port is set

    @property
    def model_name(self) -> str:
        return self.info.model

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    # --- building jobs ------------------------------------------------------------------------
    @functools.cached_property
    def tokenizer_json(self) -> str:
        """The tokenizer that encodes text prompts, as `tokenizers` serializes it (Worker.Tokenizer)."""
        return self.tokenizer.hf.backend_tokenizer.to_str()

    def check_model(self, model: str) -> None:
        if model and model != self.model_name:
            raise ModelNotFound(f"model {model!r} is not served here; this worker serves {self.model_name!r}")

    def text_prompt(self, text: str, field: str) -> list[int]:
        check_text(text, self.limits, field)
        ids = self.tokenizer.encode_prompt(text)
        check_prompt_length(len(ids), self.limits, field)
        return ids

    def chat_prompt(self, messages: Sequence[ChatMessage], field: str,
                    history_token_ids: Sequence[int] = ()) -> list[int]:
        ids = self.chat_ids(messages, field, history_token_ids)
        check_prompt_length(len(ids), self.limits, field)
        return ids

    def token_prompt(self, token_ids: Sequence[int], field: str) -> list[int]:
        vocab = self.tokenizer.decoder.vocab_size
        for i, t in enumerate(token_ids):
            if t >= vocab:
                raise InvalidRequest(f"{field}[{i}]", f"token id {t} is outside the vocabulary of {vocab}")
        check_prompt_length(len(token_ids), self.limits, field)
        return list(token_ids)

    def chat_ids(self, messages: Sequence[ChatMessage], field: str,
                 history_token_ids: Sequence[int] = ()) -> list[int]:
        """Prompt ids of a conversation (or of a session's next turn after history_token_ids)."""
        try:
            chat_template.validate_messages(
                messages, max_message_chars=self.limits.max_message_chars, is_continuation=bool(history_token_ids)
            )
        except chat_template.ChatTemplateError as e:
            raise InvalidRequest(f"{field.removesuffix('.messages')}.{e.field}", e.message) from None
        if history_token_ids:
            return list(history_token_ids) + self.tokenizer.encode_next_turn(messages)
        return self.tokenizer.encode_dialog(messages)

    def count_text_tokens(self, text: str, field: str) -> int:
        check_text(text, self.limits, field)
        return len(self.tokenizer.encode_prompt(text))

    def closed_history(self, finished: FinishEvent) -> list[int]:
        """A chat session's token ids after a finished turn: its prompt and reply, the reply closed by the
        end-of-sequence token (added unless the reply ended with one), ready to prefix the next turn."""
        history = finished.prompt_token_ids + finished.output_token_ids
        eos = self.tokenizer.eos_token_ids
        if not finished.output_token_ids or finished.output_token_ids[-1] not in eos:
            history.append(min(eos))
        return history

    def job(self, prompt_ids: list[int], params: RequestedParameters, *, request_id: str, field: str = "job",
            deadline: float | None = None, is_chat_reply: bool = False, resume_token_ids: Sequence[int] = (),
            tenant: str = "", weight: int = 1) -> Job:
        """A job ready to run, or InvalidRequest naming `{field}.<its field>` (request_id, tenant, parameters,
        resume_token_ids)."""
        check_request_id(request_id, f"{field}.request_id")
        check_tenant(tenant, f"{field}.tenant")
        check_parameters(params, self.limits, f"{field}.parameters")
        if params.grammar is not None:
            self.engine.grammars.check(params.grammar, f"{field}.parameters.{params.grammar.kind}")
        check_resume_tokens(resume_token_ids, len(prompt_ids), self.tokenizer.decoder.vocab_size, self.limits,
                            f"{field}.resume_token_ids")
        sampling = resolve_parameters(params, len(prompt_ids), self.limits, self.tokenizer.defaults)
        return Job(request_id, prompt_ids, sampling, deadline, is_chat_reply, tuple(resume_token_ids), tenant,
                   weight)

    # --- running jobs --------------------------------------------------------------------------
    async def stream(self, job: Job) -> AsyncIterator[TokenEvent | FinishEvent]:
        """Run one job; yield its token events, then its FinishEvent (tokens of the finishing step ride with it,
        FinishEvent.final); an engine error is raised as its ServiceError. Aborts the job if the consumer stops
        early (client cancelled, stream broken)."""
        if not self.is_accepting:
            raise EngineUnavailable("the worker is not serving (warming up or draining)")
        if job.request_id in self._in_flight:
            raise DuplicateRequest(f"request id {job.request_id!r} is already in flight")
        self._in_flight.add(job.request_id)
        clock = _JobClock()
        queue = self._submit(job)
        done = False
        try:
            while not done:
                events = await queue.get()
                while not queue.empty():  # the consumer fell behind: send what piled up as fewer messages
                    events = events + queue.get_nowait()
                for event in merge_final(coalesce(events)):
                    clock.saw(event)
                    if isinstance(event, FinishEvent | ErrorEvent):
                        done = True
                        self._record_end(job, event, clock)
                    if isinstance(event, ErrorEvent):
                        raise event.error
                    yield event
        finally:
            self._in_flight.discard(job.request_id)
            if not done:
                self.engine.abort(job.request_id)
                log.info("request_aborted", request_id=job.request_id)

    def _submit(self, job: Job) -> asyncio.Queue:
        """Hand the job to the engine thread; its events arrive on the returned queue, a step's worth at a time."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(events: list[Event]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, events)

        self.engine.submit(
            EngineRequest(job.request_id, job.prompt_token_ids, job.params, sink, job.deadline, job.is_chat_reply,
                          list(job.resume_token_ids), tenant=job.tenant, weight=job.weight)
        )
        return queue

    def _record_end(self, job: Job, event: FinishEvent | ErrorEvent, clock: _JobClock) -> None:
        _log_end(job, event, clock)
        if self.metrics is not None:
            self.metrics.job_finished(event, clock.started, clock.first_token_at, len(job.resume_token_ids))


class _JobClock:
    """When a job was submitted and when its first token came (time.monotonic())."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.first_token_at: float | None = None

    def saw(self, event: Event) -> None:
        if self.first_token_at is None and (
                isinstance(event, TokenEvent) or (isinstance(event, FinishEvent) and event.final is not None)):
            self.first_token_at = time.monotonic()


def _log_end(job: Job, event: FinishEvent | ErrorEvent, clock: _JobClock) -> None:
    now = time.monotonic()
    if isinstance(event, FinishEvent):
        first = clock.first_token_at
        log.info(
            "request_finished",
            request_id=job.request_id,
            prompt_tokens=event.num_prompt_tokens,
            completion_tokens=event.num_output_tokens,
            resumed_tokens=len(job.resume_token_ids),
            finish_reason=event.finish_reason.name,
            ttft_ms=round((first - clock.started) * 1e3, 2) if first else None,
            duration_ms=round((now - clock.started) * 1e3, 2),
        )
    else:
        log.warning("request_failed", request_id=job.request_id, status=event.error.status.name)
