"""The relay: run a job on a worker and yield its events, failing over to another worker when one goes away."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import structlog

from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from router.background import Background
from router.calls import CallRecord
from router.config import RouterConfig
from router.errors import NoHealthyWorker, WorkerLost, public_error
from router.fanout import Fanout, LagWatch, Single, merged
from router.metrics import RouterMetrics
from router.prompt_blocks import PromptBlocks
from router.worker_pool import WorkerPool

log = structlog.get_logger("router.server")

FAILED_EXCLUDE_S = 1.0  # a worker that failed a job is skipped this long for it (then it may be a restarted one)
FAILOVER_POLL_S = 0.1  # while waiting for a healthy worker to take a job over
# A job's own deadline (Job.deadline_unix_ms) trails the client's by this much. The client's deadline also rides on
# the gRPC call to the worker, and that is what ends the request (DEADLINE_EXCEEDED, the worker's sequence freed
# within a step); the job's deadline is only the backstop should the call's cancellation be lost. Equal deadlines
# would race: the worker ending the job (finish CANCELLED, status OK) just before the client's own timer fired.
JOB_DEADLINE_GRACE_S = 1.0
# Worker call failures that mean "the replica went away" (a dying process resets its streams with INTERNAL or
# CANCELLED as well as UNAVAILABLE), not a verdict on the request: the job fails over, before or after its first
# event. A worker's own bug (INTERNAL/UNKNOWN) is bounded by config.retry_attempts like any other failure.
WORKER_LOST_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                               grpc.StatusCode.CANCELLED})


def deadline_ms(context) -> int:
    """Job.deadline_unix_ms for a call: its client's deadline plus JOB_DEADLINE_GRACE_S; 0 (none) without one."""
    remaining = context.time_remaining()
    return 0 if remaining is None else int((time.time() + remaining + JOB_DEADLINE_GRACE_S) * 1000)


def new_job(request_id: str, model: str, params: pb.SamplingParameters, context, tenant: str,
            weight: int) -> wpb.Job:
    """A worker job for a tenant (the worker shares its admissions among tenants by `weight`). An unseeded job
    that may sample gets a seed here, so a failover can resume it exactly."""
    job = wpb.Job(request_id=request_id, model=model, parameters=params, tenant=tenant, tenant_weight=weight)
    if not params.HasField("seed") and not (params.HasField("temperature") and params.temperature == 0.0):
        job.parameters.seed = random.getrandbits(62)
    job.deadline_unix_ms = deadline_ms(context)
    return job


def renames(job: wpb.Job, completions: int = 1) -> tuple[tuple[str, str], ...]:
    """How the worker's names for a Generate job's fields read in the public request it came from (request id
    `<call>/<k>`, the k-th job: input k // completions): a text input `inputs[i]`, a conversation
    `conversations[i]`."""
    n = int(job.request_id.rsplit("/", 1)[-1]) // completions
    if job.WhichOneof("prompt") == "chat":
        return (("job.chat.", f"conversations[{n}]."), ("job.chat", f"conversations[{n}].messages"),
                ("job.parameters", "parameters"), ("job.", f"conversations[{n}]."))
    return (("job.text", f"inputs[{n}]"), ("job.parameters", "parameters"), ("job.", f"inputs[{n}]."))


def turn_renames(job: wpb.Job) -> tuple[tuple[str, str], ...]:
    """The same for a Chat session's turn `turns[n]` (request id `<session>/<n>`)."""
    n = job.request_id.rsplit("/", 1)[-1]
    return (("job.chat.", f"turns[{n}]."), ("job.chat", f"turns[{n}].messages"),
            ("job.parameters", f"turns[{n}].parameters"), ("job.", f"turns[{n}]."))


@dataclass
class _Failover:
    """One job's way through workers: who failed it (excluded for FAILED_EXCLUDE_S), what was already streamed
    (sent again as resume_token_ids), how long to wait for a healthy worker."""

    job: wpb.Job
    current: wpb.Job
    pending: int  # tokens the job may still generate, for the worker's load
    failed: dict[str, float] = field(default_factory=dict)
    failures: int = 0
    streamed: list[int] = field(default_factory=list)
    wait_until: float | None = None
    prompt: PromptBlocks | None = None  # its blocks, for cache-aware picks (read once, at the first pick)


class FollowUps:
    """What follows a job on its worker stream: a cancel, then the end (the stream half-closed). Kept as state, not
    queued: every worker call that carries the job (the first, then each one after a failover) gets it all, and a
    dead call's request stream can take nothing away from the next one's."""

    def __init__(self) -> None:
        self.cancelled = False
        self.closed = False
        self._woken: set[asyncio.Event] = set()

    def cancel(self) -> None:
        self.cancelled = True
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        for event in self._woken:
            event.set()

    async def requests(self, job: wpb.Job) -> AsyncIterator[wpb.WorkerRequest]:
        """One worker call's request stream: the job, the cancel once it is asked for, until close()."""
        woken = asyncio.Event()
        self._woken.add(woken)
        try:
            yield wpb.WorkerRequest(job=job)
            sent_cancel = False
            while True:
                woken.clear()  # before the checks: a wake-up after them is not lost
                if self.cancelled and not sent_cancel:
                    sent_cancel = True
                    yield wpb.WorkerRequest(cancel=wpb.Cancel())
                if self.closed:
                    return
                await woken.wait()
        finally:
            self._woken.discard(woken)


class RelayedJob:
    """One job relayed from workers, failing over when one goes away.

    `start()` opens the first worker call at once (no task of its own: gRPC sends the job as the call is created), so
    the job can run while its caller still decides about it (dispatch ahead); its first events wait in the call
    meanwhile. `events()` reads the worker stream on the caller's own task, one message at a time, as fast as the
    caller passes them on: a client that lags holds the worker call back, and the worker (the one coalescing layer)
    merges what it generated meanwhile into fewer messages. `close()` ends what still runs (idempotent).

    A worker call that fails with a lost-worker code (WORKER_LOST_CODES) is left for another worker: before any token
    the job is simply re-sent; after tokens were streamed it is re-sent with those tokens as `resume_token_ids`, so
    the new worker continues exactly where the old one stopped (greedy or seeded sampling: every unseeded job is
    seeded, new_job) and the caller sees one unbroken stream. Up to config.retry_attempts failovers per job; while
    no other worker is healthy the job waits for one (a restarted replica counts) until its deadline or
    config.failover_wait_s. `prefer` names the worker to try first while it is healthy (a Chat session's).
    `follow_ups` (optional): the job's cancel and end, sent on its worker stream. `on_address` learns each worker
    that starts producing events. `record` (optional) learns the first token's time, the failovers and the last
    worker. `renamed`: how the job's field names read in the client's request (renames)."""

    __slots__ = ("relay", "job", "context", "prefer", "follow_ups", "on_address", "record", "renamed", "state",
                 "sent_at", "_call", "_lease", "_target", "_error", "_events")

    def __init__(self, relay: Relay, job: wpb.Job, context, *, prefer: str | None = None,
                 follow_ups: FollowUps | None = None, on_address: Callable[[str], None] | None = None,
                 record: CallRecord | None = None, renamed: tuple[tuple[str, str], ...] = ()) -> None:
        self.relay, self.job, self.context, self.prefer = relay, job, context, prefer
        self.follow_ups, self.on_address, self.record, self.renamed = follow_ups, on_address, record, renamed
        self.state = _Failover(job, job, job.parameters.max_new_tokens or relay.pool.default_max_new_tokens(job.model))
        self.sent_at = time.monotonic()
        self._call = self._lease = self._error = self._events = None
        self._target = ""

    @property
    def target(self) -> str | None:
        """The worker its current call is on (None before any)."""
        return self._target or None

    def start(self) -> RelayedJob:
        """Open the first worker call now. Finding no worker is reported by events(): the caller may yet be refused
        for a reason of its own (its key), which the client must hear first."""
        try:
            self._open(self.relay.pick_now(self.state, self.prefer))
        except NoHealthyWorker as exc:
            self._error = exc
        return self

    def events(self) -> AsyncIterator[wpb.WorkerEvent]:
        if self._events is None:
            self._events = self._run()
        return self._events

    async def close(self) -> None:
        if self._events is not None:
            await self._events.aclose()
        self._end_call(finished=False)

    def _open(self, target: str) -> None:
        if self.record is not None:
            self.record.worker = target
        state = self.state
        self._lease = self.relay.pool.acquire(target, state.pending - len(state.streamed))
        self._target = target
        self._call = self.relay._call(target, state.current, self.context, self.follow_ups)

    def _end_call(self, finished: bool) -> None:
        call, self._call = self._call, None
        if call is None:
            return
        self._lease.release()
        if finished:  # its trailers are on their way: let it end by itself, off the client's path
            self.relay.until_done(call)
        else:
            call.cancel()

    async def _run(self) -> AsyncIterator[wpb.WorkerEvent]:
        if self._error is not None:
            raise self._error
        state, relay = self.state, self.relay
        while True:
            if self._call is None:
                self._open(await relay._target(state, self.context, self.prefer))
            call, target = self._call, self._target
            started = finished = False
            try:
                while True:
                    event = await call.read()
                    if event is grpc.aio.EOF:
                        return
                    if not started:
                        started = True
                        if self.on_address is not None:
                            self.on_address(target)
                    finished = event.HasField("finished")
                    delta = event.finished.last_delta if finished else event.delta
                    if delta.token_ids:
                        relay._streamed(state, delta.token_ids, self.sent_at, self.record)
                    if finished:  # the job's last event: the caller need not wait for the worker's trailers
                        if relay.metrics is not None:
                            relay.metrics.usage(self.job.model, event.finished.usage)
                        yield event
                        return
                    yield event
            except grpc.aio.AioRpcError as exc:
                relay._failed(state, target, exc, self.context, self.record, self.renamed)
            finally:
                self._end_call(finished)


class Relay:
    def __init__(self, config: RouterConfig, pool: WorkerPool, metrics: RouterMetrics | None = None,
                 background: Background | None = None) -> None:
        self.config = config
        self.pool = pool
        self.metrics = metrics
        self.background = background if background is not None else Background()
        self._ending: set = set()  # finished worker calls waiting for their trailers (a dropped call is cancelled)
        self.lag_watch = LagWatch()

    def job(self, job: wpb.Job, context, **kw) -> RelayedJob:
        """`job` relayed from a worker, its first call opened now (RelayedJob)."""
        return RelayedJob(self, job, context, **kw).start()

    async def events(self, job: wpb.Job, context, **kw) -> AsyncIterator[wpb.WorkerEvent]:
        """Run one job on a worker and yield its events (RelayedJob, with its options), closing it when done."""
        relayed = self.job(job, context, **kw)
        try:
            async for event in relayed.events():
                yield event
        finally:
            await relayed.close()

    def until_done(self, call) -> None:
        self._ending.add(call)
        call.add_done_callback(self._ending.discard)

    def pick_now(self, state: _Failover, prefer: str | None) -> str:
        """A healthy worker for a job's first call (no waiting: nothing failed yet)."""
        started = time.perf_counter()
        if self.pool.cache_routing and (prefer is None or not self.pool.serves(prefer, state.job.model)):
            state.prompt = self._prompt(state.job)  # (a moved Chat session: where its transcript is cached)
        picked = self.pool.pick(state.job.model, prefer=prefer, prompt=state.prompt)
        if picked is None:
            raise NoHealthyWorker("no healthy worker for the model")
        if self.metrics is not None:
            self.metrics.routing_time(time.perf_counter() - started)
        return picked[0].address

    def _prompt(self, job: wpb.Job) -> PromptBlocks | None:
        """The job's prompt blocks: a text prompt tokenized as its workers will; a Chat turn by the session's
        transcript so far (its cached part: the turn's new messages follow it)."""
        kind = job.WhichOneof("prompt")
        if kind == "text":
            return self.pool.prompt_blocks(job.model, job.text)
        if kind == "token_ids":
            return self.pool.prompt_blocks_of_ids(job.model, job.token_ids.ids)
        if job.history_token_ids:
            return self.pool.prompt_blocks_of_ids(job.model, [*job.history_token_ids, 0])
        return None

    def _call(self, target: str, job: wpb.Job, context, follow_ups: FollowUps | None):
        stub = self.pool.stub(target)
        metadata = (("x-request-id", job.request_id), *self.pool.metadata)
        if follow_ups is None:  # nothing will follow the job: the one-message call starts in one round trip
            return stub.Run(job, timeout=context.time_remaining(), metadata=metadata)
        return stub.Generate(follow_ups.requests(job), timeout=context.time_remaining(), metadata=metadata)

    async def _target(self, state: _Failover, context, prefer: str | None) -> str:
        """A healthy worker for the job, waiting for one after a failure (a restarted replica counts)."""
        while True:
            now = time.monotonic()
            excluded = frozenset(a for a, t in state.failed.items() if now - t < FAILED_EXCLUDE_S)
            if state.prompt is None and self.pool.cache_routing and (
                    prefer is None or prefer in excluded or not self.pool.serves(prefer, state.job.model)):
                state.prompt = self._prompt(state.job)  # (a moved Chat session: where its transcript is cached)
            picked = self.pool.pick(state.job.model, excluded, prefer=prefer, prompt=state.prompt)
            if picked is not None:
                return picked[0].address
            if not state.failures:
                raise NoHealthyWorker("no healthy worker for the model")
            if state.wait_until is None:
                remaining = context.time_remaining()
                state.wait_until = now + min(self.config.failover_wait_s,
                                             remaining if remaining is not None else math.inf)
            if now >= state.wait_until:
                raise NoHealthyWorker(f"no healthy worker could take over the request ({state.failures} failed)")
            await asyncio.sleep(FAILOVER_POLL_S)

    def _streamed(self, state: _Failover, token_ids, sent_at: float, record: CallRecord | None) -> None:
        if not state.streamed:
            first = time.monotonic()
            if self.metrics is not None:
                self.metrics.first_token(state.job.model, first - sent_at)
            if record is not None and record.first_token_at is None:
                record.first_token_at = first
        state.streamed.extend(token_ids)

    def _failed(self, state: _Failover, target: str, exc: grpc.aio.AioRpcError, context,
                record: CallRecord | None, renamed: tuple[tuple[str, str], ...]) -> None:
        """A worker call failed: raise the client's error, or prepare the job for the next worker."""
        code = exc.code()
        if code not in WORKER_LOST_CODES:  # the worker's verdict on the request: pass it on, in public names
            raise public_error(exc, renamed) from exc
        state.failures += 1
        if record is not None:
            record.failovers += 1
        state.failed[target] = time.monotonic()
        job = state.job
        if state.failures > self.config.retry_attempts:
            log.warning("worker_failover_exhausted", request_id=job.request_id, worker=target, code=code.name,
                        failures=state.failures)
            raise WorkerLost(f"the request's worker failed {state.failures} times (the last: {code.name}); "
                             "retry it") from exc
        log.warning("worker_failover", request_id=job.request_id, worker=target, code=code.name,
                    failures=state.failures, resumed_tokens=len(state.streamed))
        if state.streamed:
            state.current = wpb.Job()
            state.current.CopyFrom(job)
            state.current.resume_token_ids.extend(state.streamed)
            if state.current.deadline_unix_ms == 0:
                state.current.deadline_unix_ms = deadline_ms(context)
        state.wait_until = None

    def fanout(self, jobs: list[wpb.Job], context, record: CallRecord, n: int = 1) -> Single | Fanout:
        """Start every job now, each on its own worker pick (with failover); their events as one stream. With `n`
        completions per prompt (jobs i * n .. i * n + n - 1 share a prompt), a prompt's later completions go to its
        first one's worker while it is healthy, which prefills the prompt once for all of them."""
        relayed: list[RelayedJob] = []
        for k, job in enumerate(jobs):
            first = relayed[k - k % n] if k % n else None  # (this prompt's first completion, already started)
            relayed.append(self.job(job, context, record=record, renamed=renames(job, n),
                                    prefer=first.target if first is not None else None))
        return merged(relayed, self.lag_watch)

    @staticmethod
    async def close(jobs: Single | Fanout | None) -> None:
        if jobs is None:
            return
        await jobs.close()
        if jobs.merged:
            log.debug("deltas_coalesced", request_id=jobs.jobs[0].request_id, merged=jobs.merged)
