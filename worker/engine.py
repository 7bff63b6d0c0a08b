"""The engine loop: one dedicated thread runs schedule -> model step -> update and emits events.

Out of memory (torch.OutOfMemoryError from the model step, real or injected): the engine sheds load and
retries rather than failing requests. Each OOM step frees the prefix cache (and PyTorch's cached CUDA
memory) and has the scheduler shrink its batch (Scheduler.shrink_batch: half of the running sequences are
preempted, the newest from tenants above their share first; recompute: they finish later with the same tokens;
max_num_seqs and the token budget go down); after OOM_RECOVERY_STEPS good steps in a row the limits double back
towards the configured ones (Scheduler.restore_batch). OOM_MAX_CONSECUTIVE OOM steps in a row (no good step
between them) mean shedding does not help: the engine logs `engine_oom_exit` and ends the process with
faults.OOM_EXIT_CODE, for the supervisor to restart the group.

Whether a sequence is over is decided in worker.finish alone: the scheduler applies it after each step (EOS,
length), the engine once a token's text is known (stop strings) and when a resumed job arrives.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import torch

from common.errors import EngineUnavailable, ServiceError
from worker.cache_events import CacheEventHub, Subscriber
from worker.detokenizer import TextStream, TokenDecoder
from worker.faults import NO_FAULTS, FaultPlan, exit_for_oom
from worker.finish import finish_reason
from worker.scheduler import ScheduledBatch, Scheduler
from worker.sequence import FinishReason, SamplingParams, Sequence, SequenceStatus, TokenLogprobs

log = structlog.get_logger("worker.engine")

OOM_MAX_CONSECUTIVE = 3  # OOM steps in a row before the process exits for a restart
OOM_RECOVERY_STEPS = 32  # good steps in a row before shed limits double back


@dataclass(slots=True)
class TokenEvent:
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token id, when the request asked


@dataclass(slots=True)
class FinishEvent:
    finish_reason: FinishReason
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    final: TokenEvent | None = None  # tokens of the same step, carried here (worker.service.merge_final)


@dataclass(slots=True)
class ErrorEvent:
    error: ServiceError


Event = TokenEvent | FinishEvent | ErrorEvent
Sink = Callable[[list[Event]], None]


@dataclass(slots=True)
class EngineRequest:
    """A validated request: prompt ids within the context, resolved sampling parameters."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sink: Sink  # called from the engine thread with each step's events for this request
    deadline: float | None = None  # time.monotonic() value
    is_chat_reply: bool = False  # drop the SentencePiece space before the reply's first word
    resume_token_ids: list[int] = field(default_factory=list)  # output already streamed by another worker
    tenant: str = ""  # whose request: the scheduler shares the replica among tenants
    weight: int = 1  # the tenant's share relative to others' (>= 1)


@dataclass(slots=True)
class _Active:
    seq: Sequence
    stream: TextStream
    sink: Sink
    deadline: float | None
    pending: list[Event] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    num_waiting: int
    num_running: int
    num_free_blocks: int
    num_total_blocks: int
    num_pending_tokens: int


class Engine:
    """Owns the scheduler and model runner; all model work happens on its thread."""

    def __init__(self, scheduler: Scheduler, runner, decoder: TokenDecoder, eos_token_ids: frozenset[int],
                 faults: FaultPlan = NO_FAULTS):
        self.scheduler = scheduler
        self.runner = runner
        self.decoder = decoder
        self.eos_token_ids = eos_token_ids
        self.grammars = None  # worker.grammar.Grammars, for requests with structured output (set by worker.app)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._active: dict[str, _Active] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.faults = faults
        self.num_steps = 0  # model steps that succeeded
        self.step_index = 0  # model steps attempted (the fault plan's clock)
        self.num_oom_steps = 0  # total since start
        self._oom_streak = 0  # OOM steps in a row
        self._num_good_steps = 0  # good steps since the limits last changed
        self._load = LoadSnapshot(0, 0, scheduler.block_manager.num_free_blocks,
                                  scheduler.block_manager.num_blocks, 0)
        self.cache_events = CacheEventHub(scheduler.block_manager.block_size)

    # --- called from any thread -------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: EngineRequest) -> None:
        """Queue a request; its events arrive through request.sink, ending with a Finish or Error event."""
        self._inbox.put(("add", request))
        self._wakeup.set()

    def abort(self, request_id: str) -> None:
        """Cancel a request (no-op if it already finished); it ends with a CANCELLED finish event."""
        self._inbox.put(("abort", request_id))
        self._wakeup.set()

    def subscribe_cache(self, subscriber: Subscriber) -> None:
        """Follow the prefix cache: its snapshot, then each step's changes, reach `subscriber` (cache_events)."""
        self._inbox.put(("subscribe", subscriber))
        self._wakeup.set()

    def reset_prefix_cache(self, timeout: float = 60.0) -> None:
        """Forget every cached block, on the engine thread: a reset from another thread would race the steps and the
        draining of cache events. Returns once done."""
        done = threading.Event()
        self._inbox.put(("reset", done))
        self._wakeup.set()
        if not done.wait(timeout):
            raise RuntimeError(f"the engine did not reset its prefix cache in {timeout} s")

    @property
    def load(self) -> LoadSnapshot:
        return self._load

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- engine thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            self._drain_inbox()
            self._expire_deadlines()
            if not self.scheduler.has_unfinished:
                self._publish_load()
                self._wakeup.wait(0.5)
                self._wakeup.clear()
                continue
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the loop must survive; requests in flight are failed
                log.exception("engine_step_failed", num_active=len(self._active))
                self._fail_all(ServiceError("internal error in the engine step"))
        self._fail_all(EngineUnavailable("the engine stopped; retry on another replica"))

    def step(self) -> None:
        """Run one scheduled batch through the model and deliver the resulting events."""
        batch = self.scheduler.schedule()
        if batch is None:
            return
        try:
            self.step_index += 1
            self.faults.check(self.step_index - 1, rank=0)
            sampled = self.runner.run(batch)
        except torch.OutOfMemoryError:
            self._shed_load(batch)
            self._publish_load()
            return
        updated = self.scheduler.update(batch, sampled)
        self.num_steps += 1
        self._oom_streak = 0
        if self.scheduler.is_batch_shrunk:
            self._maybe_restore_limits()
        logprobs = getattr(self.runner, "logprobs", None) or {}
        for seq in updated:
            active = self._active.get(seq.request_id)
            if active is None:
                continue
            token_id = seq.token_ids[-1]
            lp = logprobs.get(seq.request_id)
            active.pending.append(TokenEvent(active.stream.push(token_id), [token_id], [lp] if lp else []))
            self._finish_if_over(seq, active.stream)
            if seq.is_finished:
                self._finish(active)
        self._flush_events()
        self._publish_load()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "abort":
                self._abort(item)
                continue
            if kind == "reset":
                self.scheduler.block_manager.reset_prefix_cache()
                item.set()
                continue
            if kind == "subscribe":
                self._publish_cache()  # (the changes so far go to the others; the snapshot holds them already)
                self.cache_events.add(item, self.scheduler.block_manager.cached_block_keys())
                continue
            try:
                self._add(item)
            except Exception:  # noqa: BLE001 - one bad request must not stop the engine
                log.exception("engine_add_failed", request_id=item.request_id)
                self._active.pop(item.request_id, None)
                item.sink([ErrorEvent(ServiceError("the request could not be scheduled"))])
        self._flush_events()

    def _add(self, request: EngineRequest) -> None:
        if request.request_id in self._active:
            request.sink([ErrorEvent(ServiceError(f"request id {request.request_id!r} already in flight"))])
            return
        prompt = list(request.prompt_token_ids)
        seq = Sequence(request.request_id, prompt, request.params, self.eos_token_ids,
                       token_ids=prompt + list(request.resume_token_ids), tenant=request.tenant,
                       weight=request.weight)
        if request.params.grammar is not None:  # (checked by the service: it compiles, from the cache here)
            seq.constraint = self.grammars.matcher(request.params.grammar, request.resume_token_ids)
        stream = self.decoder.stream(request.params.stop, skip_leading_space=request.is_chat_reply)
        active = _Active(seq, stream, request.sink, request.deadline)
        self._active[request.request_id] = active
        if request.resume_token_ids:
            stream.replay(request.resume_token_ids)
            reason = finish_reason(seq, self.scheduler.config.max_model_len, stop_string_seen=stream.stopped)
            log.info("request_resumed", request_id=request.request_id, num_prompt_tokens=seq.num_prompt_tokens,
                     num_resume_tokens=seq.num_output_tokens, finished=reason.name if reason else None)
            if reason is not None:  # never scheduled: it ends here, as a step would have ended it
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
                self._finish(active)
                return
        self.scheduler.add(seq)

    def _finish_if_over(self, seq: Sequence, stream: TextStream) -> None:
        """After a step, once the new token's text is known: end seq if worker.finish says it is over."""
        if seq.is_finished:  # the scheduler already ended it (EOS, length)
            return
        reason = finish_reason(seq, self.scheduler.config.max_model_len, stop_string_seen=stream.stopped)
        if reason is not None:
            self.scheduler.finish(seq, reason)

    def _abort(self, request_id: str) -> None:
        active = self._active.get(request_id)
        if active is None:
            return
        self.scheduler.abort(request_id)
        active.seq.finish_reason = FinishReason.CANCELLED
        self._finish(active)
        self._flush_events()

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        expired = [rid for rid, a in self._active.items() if a.deadline is not None and a.deadline <= now]
        for request_id in expired:
            self._abort(request_id)

    def _finish(self, active: _Active) -> None:
        seq = active.seq
        tail = active.stream.flush()
        if tail:
            active.pending.append(TokenEvent(tail, []))
        active.pending.append(
            FinishEvent(
                finish_reason=seq.finish_reason or FinishReason.CANCELLED,
                num_prompt_tokens=seq.num_prompt_tokens,
                num_output_tokens=seq.num_output_tokens,
                num_cached_tokens=seq.num_cached_tokens,
                prompt_token_ids=list(seq.prompt_token_ids),
                output_token_ids=seq.output_token_ids,
            )
        )
        del self._active[seq.request_id]
        self._deliver(active)

    def _flush_events(self) -> None:
        for active in self._active.values():
            if active.pending:
                self._deliver(active)

    @staticmethod
    def _deliver(active: _Active) -> None:
        events, active.pending = active.pending, []
        if events:
            try:
                active.sink(events)
            except Exception:  # noqa: BLE001 - a dead consumer must not stop the engine
                log.warning("event_sink_failed", request_id=active.seq.request_id)

    def _shed_load(self, batch: ScheduledBatch) -> None:
        # the model step ran out of memory; nothing it computed was recorded, so the batch is simply redone
        self.num_oom_steps += 1
        self._oom_streak += 1
        self._num_good_steps = 0
        scheduler = self.scheduler
        fields = dict(step=self.step_index - 1, num_seqs=len(batch.entries), num_tokens=batch.num_tokens,
                      num_running=scheduler.num_running, num_waiting=scheduler.num_waiting,
                      oom_streak=self._oom_streak)
        if self._oom_streak >= OOM_MAX_CONSECUTIVE:
            log.error("engine_oom_exit", **fields)
            exit_for_oom()
            return  # only reached when exit_for_oom is replaced (tests)
        scheduler.block_manager.reset_prefix_cache()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        num_preempted = scheduler.shrink_batch()
        log.warning("engine_oom_shed", **fields, num_preempted=num_preempted,
                    max_num_seqs=scheduler.limits.max_num_seqs,
                    max_num_batched_tokens=scheduler.limits.max_num_batched_tokens)

    def _maybe_restore_limits(self) -> None:
        self._num_good_steps += 1
        if self._num_good_steps < OOM_RECOVERY_STEPS:
            return
        self._num_good_steps = 0
        self.scheduler.restore_batch()
        log.info("engine_oom_limits_raised", max_num_seqs=self.scheduler.limits.max_num_seqs,
                 max_num_batched_tokens=self.scheduler.limits.max_num_batched_tokens)

    def _fail_all(self, error: ServiceError) -> None:
        for request_id, active in list(self._active.items()):
            self.scheduler.abort(request_id)
            active.pending.append(ErrorEvent(error))
            self._deliver(active)
        self._active.clear()

    def _publish_cache(self) -> None:
        stored, evicted = self.scheduler.block_manager.drain_cache_events()
        self.cache_events.publish(stored, evicted)

    def _publish_load(self) -> None:
        self._publish_cache()
        bm = self.scheduler.block_manager
        pending = sum(
            a.seq.num_tokens - a.seq.num_computed_tokens + a.seq.params.max_new_tokens - a.seq.num_output_tokens
            for a in self._active.values()
        )
        self._load = LoadSnapshot(
            num_waiting=self.scheduler.num_waiting,
            num_running=self.scheduler.num_running,
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            num_pending_tokens=pending,
        )

