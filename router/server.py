"""The router's public llamagrid.v1.Inference: authenticate, rate limit, pick a worker, relay its stream."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import structlog
from grpc_reflection.v1alpha import reflection

from common.connections import server_options
from common.internal_auth import token_metadata
from common.request_ids import client_request_id
from common.rpc_guard import RequestGuard
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from ratelimit.limiter import RateLimiter, connect
from ratelimit.peers import PeerRegistry
from ratelimit.policy import FailurePolicy, GuardedDecision, GuardedLimiter, LimiterUnavailable
from ratelimit.redis_server import RedisServer
from ratelimit.tiers import Tier, TierSource
from router.ahead import Headroom
from router.auth import Authenticator, LastKnownKeys, Presented, check_model
from router.concurrency import REQUESTS, SESSIONS, KeySlots, Slot
from router.config import RouterConfig
from router.discovery import from_spec
from router.errors import (
    InvalidRequest,
    LimiterDown,
    ModelNotFound,
    NoHealthyWorker,
    RateLimited,
    ServiceError,
    from_rpc_error,
    handle_errors,
    handle_stream_errors,
    public_error,
)
from router.fanout import Fanout
from router.health import HEALTH_SERVICE, INFERENCE_SERVICE, RouterHealth
from router.keys import ApiKeyStore, KeyRecord
from router.metrics import RouterMetrics, serve_metrics, stop_metrics
from router.outbox import Outbox
from router.worker_pool import WorkerPool

log = structlog.get_logger("router.server")

DEFAULT_MAX_NEW_TOKENS = 256
CHARS_PER_TOKEN = 3
MESSAGE_OVERHEAD_TOKENS = 4
MAX_INPUTS = 64
CONCURRENCY_RETRY_S = 1.0  # the wait advertised to a key over its concurrency cap (a call of its may end by then)
_NO_NEW_TOKENS = pb.SamplingParameters(max_new_tokens=0)  # CountTokens generates nothing


class TierMissing(ServiceError):
    status = grpc.StatusCode.FAILED_PRECONDITION


class WorkerLost(ServiceError):
    status = grpc.StatusCode.UNAVAILABLE


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


def _max_new(params: pb.SamplingParameters) -> int:
    return params.max_new_tokens if params.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS


def estimate_text(text: str, params: pb.SamplingParameters) -> int:
    """Tokens reserved for one text job: a prompt estimate plus the most it may generate."""
    return len(text) // CHARS_PER_TOKEN + 1 + _max_new(params)


def estimate_chat(messages, params: pb.SamplingParameters) -> int:
    prompt = sum(len(m.content) // CHARS_PER_TOKEN + MESSAGE_OVERHEAD_TOKENS for m in messages)
    return prompt + _max_new(params)


@dataclass
class CallRecord:
    """One request (one Chat turn) as the router saw it: who sent it, what it reserved from whose bucket, what the
    workers reported using, how it went. Settled once (unused tokens refunded, excess charged) and logged once,
    when it ends, as `request_finished` — ids, names and numbers only, never text."""

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
    headers: asyncio.Task | None = None  # the initial metadata (rate-limit headers) being sent, see _charge
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


# The call being served by this task (grpc.aio runs each call in its own task): read when the call ends, by
# RouterServicer.rpc_observer, to log its request_finished with the status the error decorators mapped.
_CURRENT: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar("llamagrid_router_call", default=None)


async def _send_metadata(context, metadata: tuple[tuple[str, str], ...]) -> None:
    with contextlib.suppress(Exception):  # the call may already be over (client gone); nothing to report then
        await context.send_initial_metadata(metadata)


def _deadline_ms(context) -> int:
    """Job.deadline_unix_ms for a call: its client's deadline plus JOB_DEADLINE_GRACE_S; 0 (none) without one."""
    remaining = context.time_remaining()
    return 0 if remaining is None else int((time.time() + remaining + JOB_DEADLINE_GRACE_S) * 1000)


async def _drain(call) -> None:
    """Let a worker call whose job has finished end by itself (its trailers), off the client's path."""
    with contextlib.suppress(Exception):
        await call


async def _outbound(job: wpb.Job, requests: asyncio.Queue | None) -> AsyncIterator[wpb.WorkerRequest]:
    yield wpb.WorkerRequest(job=job)
    if requests is None:
        return
    while (msg := await requests.get()) is not None:
        yield msg


class RouterServicer(pb_grpc.InferenceServicer):
    """llamagrid.v1.Inference in front of a pool of workers. Holds no per-session state outside a live stream."""

    def __init__(self, config: RouterConfig, pool: WorkerPool, auth: Authenticator, limiter: GuardedLimiter,
                 tiers: TierSource) -> None:
        self.config = config
        self.pool = pool
        self.auth = auth
        self.limiter = limiter
        self.tiers = tiers
        self.metrics: RouterMetrics | None = None  # set by build_router when metrics are served
        self._settling: set[asyncio.Task] = set()
        self._headroom = Headroom()  # rate-limit room per key, as last seen here (dispatch ahead: router.ahead)
        self.slots = KeySlots()  # per-key calls and Chat sessions open here; build_router shares caps among routers

    # ---- calls

    def _begin(self, method: str, context) -> CallRecord:
        """The record of a call that starts now (also the call's current record, for rpc_observer)."""
        record = CallRecord(method, client_request_id(context.invocation_metadata()))
        _CURRENT.set(record)
        return record

    def rpc_observer(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """Called by common.errors' decorators when a call ends: metrics, and the call's request_finished log
        event unless it was logged already (a Chat logs each turn as it ends)."""
        if self.metrics is not None:
            self.metrics.rpc_observer(method, code, seconds)
        record = _CURRENT.get()
        if record is not None and not record.logged:
            record.logged = True  # written just after: the call's status goes out first, rendering is off its path
            asyncio.get_running_loop().call_soon(self._log_finished, record, code)

    def _log_finished(self, record: CallRecord, code: grpc.StatusCode) -> None:
        record.logged = True
        log.info("request_finished", **record.fields(code))

    # ---- admission

    async def _admit(self, presented: Presented, requested_model: str | None, cost: int, record: CallRecord,
                     one_round_trip: bool = True) -> tuple[KeyRecord, str, tuple[Tier, GuardedDecision] | None]:
        """Verify the presented key against the key store and resolve the model (`requested_model` None: no model),
        for a call that will cost `cost` tokens: (key, model, the decision of a charge made in the same round trip,
        or None — then the caller charges). Every call and every Chat turn comes through here, so a revoked key, or
        one moved to another tier, is seen at its next call or turn."""
        fast = await self._admit_fast(presented, requested_model, cost, record) if one_round_trip else None
        if fast is not None:
            return fast
        key = self.auth.finish(presented, await self.auth.lookup(presented))
        record.authenticated(key)
        return key, self._resolve_model(key, requested_model) if requested_model is not None else "", None

    def _hold(self, key: KeyRecord, kind: str, cost: int = 0,
              decided: tuple[Tier, GuardedDecision] | None = None) -> Slot:
        """A concurrency slot of `key` (router.concurrency), or RateLimited when it holds its tier's share already;
        a charge `decided` for the call (one round trip) is refunded then."""
        tier = self._tier(key)
        cap = tier.max_concurrent_requests if kind == REQUESTS else tier.max_chat_sessions
        slot = self.slots.try_hold(key.key_id, kind, cap)
        if slot is not None:
            return slot
        if decided is not None and decided[1].allowed and not decided[1].degraded:
            self._background(self.limiter.refund_quota(key.key_id, decided[0], cost))
        self._decided("concurrency_limited")
        what = "calls in flight" if kind == REQUESTS else "open Chat sessions"
        limit = self.slots.limit(cap)
        log.info("concurrency_limited", key_id=key.key_id, kind=kind, limit=limit)
        raise RateLimited(f"too many {what} for this API key (at most {limit} here)", CONCURRENCY_RETRY_S,
                          ((f"key:{key.key_id}:concurrent_{kind}", f"at most {limit} {what} at once"),))

    def _check_size(self, num_chars: int, field: str) -> None:
        if num_chars > self.config.max_request_chars:
            raise InvalidRequest(f"{field}: {num_chars} characters in all; at most {self.config.max_request_chars} "
                                 "per call")

    def _resolve_model(self, record: KeyRecord, requested: str) -> str:
        models = self.pool.models()  # (one snapshot of the pool: the first name is the pool's default model)
        model = requested or self.config.default_model or next(iter(models), None)
        if model is None:
            raise NoHealthyWorker("no healthy worker")
        if model not in models:
            if not models:
                raise NoHealthyWorker("no healthy worker")
            raise ModelNotFound(f"model {model!r} is not served")
        check_model(record, model)
        return model

    def _tier(self, key: KeyRecord) -> Tier:
        tier = self.tiers.get(key.tier)
        if tier is None:
            log.error("tier_missing", key_id=key.key_id, tier=key.tier)
            raise TierMissing("the API key's tier is not configured")
        return tier

    async def _charge(self, key: KeyRecord, tokens: int, context, record: CallRecord, send_metadata: bool = True,
                      decided: tuple[Tier, GuardedDecision] | None = None, field: str = "inputs") -> None:
        """Charge one request and `tokens` to `key` (or apply a decision already `decided` for it); on success
        `record` holds the reservation (to settle), else RateLimited / LimiterDown — or InvalidRequest naming
        `field` (what the tokens are for) when they exceed what the tier can ever grant at once."""
        if decided is None:
            tier = self._tier(key)
            try:
                d = await self._uncancelled(self.limiter.acquire_quota(key.key_id, tier, tokens), key.key_id, tier,
                                            tokens)
            except LimiterUnavailable as exc:
                self._decided("unavailable")
                raise LimiterDown("rate-limit backend unavailable") from exc
        else:
            tier, d = decided
        self._decided("limited" if not d.allowed else "allowed_local" if d.degraded else "allowed")
        self._headroom.saw(key.key_id, d)
        if not d.tokens.allowed and not math.isfinite(d.tokens.retry_after_s):  # no wait would make it fit
            raise InvalidRequest(f"{field}: needs up to {tokens} tokens (prompt estimate plus max_new_tokens); the "
                                 f"API key's tier grants at most {d.tokens.limit} at once")
        if not d.allowed:
            violations = []
            if not d.requests.allowed:
                violations.append((f"key:{key.key_id}:requests", "requests per minute exhausted"))
            if not d.tokens.allowed:
                violations.append((f"key:{key.key_id}:tokens", "tokens per minute exhausted"))
            log.info("rate_limited", request_id=record.request_id, key_id=key.key_id, tokens=tokens,
                     retry_after_s=d.retry_after_s if math.isfinite(d.retry_after_s) else -1)
            raise RateLimited("rate limit exceeded", d.retry_after_s, tuple(violations))
        record.tier, record.reserved = tier, tokens
        if send_metadata:
            # Sent while the worker call starts; `record.headers` must be done before the call's first message
            # (_headers_out): two operations in flight at once may reach the wire in either order.
            record.headers = self._background(_send_metadata(context, (
                ("x-ratelimit-limit-requests", str(d.requests.limit)),
                ("x-ratelimit-remaining-requests", str(d.requests.remaining)),
                ("x-ratelimit-remaining-tokens", str(d.tokens.remaining)),
                ("x-ratelimit-reset-requests", f"{math.ceil(d.requests.reset_after_s * 1000)}ms"),
                ("x-ratelimit-reset-tokens", f"{math.ceil(d.tokens.reset_after_s * 1000)}ms"),
            )))

    async def _admit_fast(self, presented: Presented, requested_model: str | None, cost: int,
                          record: CallRecord) -> tuple[KeyRecord, str, tuple[Tier, GuardedDecision] | None] | None:
        """Authenticate and charge in ONE Redis round trip, for a key this router verified before: its lookup and
        the charge at the tier it had are pipelined, then the key is checked. A guess that proves wrong (key now
        invalid, another tier, a model it may not use) has its charge refunded. None: take the one-by-one path
        (unknown key, Redis skipped or failing — that path applies the failure policy)."""
        guess = self.auth.speculation(presented)
        tier = self.tiers.get(guess[2]) if guess is not None else None
        if tier is None:
            return None
        command, key_id, tier_name = guess
        got = await self._uncancelled(self.limiter.acquire_quota_with(command, key_id, tier, cost), key_id, tier,
                                      cost)
        if got is None:
            return None
        reply, d = got
        try:
            key = self.auth.verify_reply(presented, reply)
            record.authenticated(key)
            model = self._resolve_model(key, requested_model) if requested_model is not None else ""
        except BaseException:
            if d.allowed:
                self._background(self.limiter.refund_quota(key_id, tier, cost))
            raise
        if key.tier != tier_name:  # the key moved to another tier since: undo, charge it at the new one
            if d.allowed:
                self._background(self.limiter.refund_quota(key_id, tier, cost))
            return key, model, None
        return key, model, (tier, d)

    async def _uncancelled(self, charge, key_id: str, tier: Tier, tokens: int):
        """Await a limiter charge (acquire_quota or acquire_quota_with). If the call is cancelled meanwhile (the
        client went away), Redis may still apply the charge: it is left to finish and, if it admitted, refunded
        whole, so a client gone during its admission is not billed for it."""
        task = asyncio.ensure_future(charge)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda t: self._refund_abandoned(t, key_id, tier, tokens))
            raise

    def _refund_abandoned(self, task: asyncio.Future, key_id: str, tier: Tier, tokens: int) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        got = task.result()
        d = got[1] if isinstance(got, tuple) else got  # acquire_quota_with: (reply, decision) or None
        if isinstance(d, GuardedDecision) and d.allowed and not d.degraded:
            self._background(self.limiter.refund_quota(key_id, tier, tokens))

    @staticmethod
    async def _headers_out(record: CallRecord) -> None:
        """Wait until the call's initial metadata has gone out (a no-op once it has)."""
        if record.headers is not None and not record.headers.done():
            await record.headers

    def _decided(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.ratelimit_decision(outcome)

    def _background(self, coro) -> asyncio.Task:
        """Run `coro` as a task the router keeps (and waits for when it stops)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return task

    def _settle(self, record: CallRecord) -> None:
        """Refund what `record` reserved and did not use — or charge what it used beyond its reservation (the
        prompt estimate can fall short), into debt if need be — in the background: the client's response does not
        wait for Redis. Idempotent; nothing for a call that was never charged. `settle_pending()` waits for every
        settlement still running (used when the router stops)."""
        if record.slot is not None:
            record.slot.release()
        if record.settled or record.tier is None:
            return
        record.settled = True
        unused = record.reserved - record.used
        log.debug("request_settled", request_id=record.request_id, key_id=record.key_id, reserved=record.reserved,
                  used=record.used, refunded=unused)
        if unused:
            self._background(self._adjust(record.key_id, record.tier, unused))

    async def settle_pending(self) -> None:
        if self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)

    async def _adjust(self, key_id: str, tier: Tier, unused: int) -> None:
        with contextlib.suppress(Exception):  # best effort; the limiter logs backend failures itself
            if unused > 0:
                await self.limiter.refund(key_id, tier, unused)
            else:
                await self.limiter.debit(key_id, tier, -unused)

    # ---- worker calls

    def _job(self, request_id: str, model: str, params: pb.SamplingParameters, context, key: KeyRecord) -> wpb.Job:
        """A worker job for `key`'s tenant (the worker shares its admissions among tenants by the tier's weight).
        An unseeded job that may sample gets a seed here, so a failover can resume it exactly."""
        tier = self.tiers.get(key.tier)
        job = wpb.Job(request_id=request_id, model=model, parameters=params, tenant=key.tenant,
                      tenant_weight=tier.weight if tier is not None else 1)
        if not params.HasField("seed") and not (params.HasField("temperature") and params.temperature == 0.0):
            job.parameters.seed = random.getrandbits(62)
        job.deadline_unix_ms = _deadline_ms(context)
        return job

    async def _events(self, job: wpb.Job, context, *, prefer: str | None = None,
                      requests: asyncio.Queue | None = None, on_address: Callable[[str], None] | None = None,
                      record: CallRecord | None = None,
                      renames: tuple[tuple[str, str], ...] = ()) -> AsyncIterator[wpb.WorkerEvent]:
        """Run one job on a worker and yield its events, failing over when the worker goes away.

        A worker call that fails with a lost-worker code (WORKER_LOST_CODES) is left for another worker: before
        any token the job is simply re-sent; after tokens were streamed it is re-sent with
        those tokens as `resume_token_ids`, so the new worker continues exactly where the old one stopped (greedy
        or seeded sampling: the router seeds every unseeded job) and the caller sees one unbroken stream. Up to
        config.retry_attempts failovers per job; while no other worker is healthy the job waits for one (a
        restarted replica counts) until its deadline or config.failover_wait_s. `prefer` names the worker to try
        first while it is healthy (a Chat session's). `requests` (optional) feeds later messages (Cancel) to the
        worker stream; None there half-closes it. `on_address` learns each worker that starts producing events.
        `record` (optional) learns the first token's time, the failovers and the last worker."""
        failed: dict[str, float] = {}  # address -> when it failed this job (excluded for FAILED_EXCLUDE_S)
        failures = 0
        metrics, job_started = self.metrics, time.monotonic()  # time to first token (router.metrics)
        streamed: list[int] = []
        wait_until: float | None = None
        pending = job.parameters.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        current = job
        while True:
            now = time.monotonic()
            excluded = frozenset(a for a, t in failed.items() if now - t < FAILED_EXCLUDE_S)
            picked = self.pool.pick(job.model, excluded, prefer=prefer)
            if picked is None:
                if not failures:
                    raise NoHealthyWorker("no healthy worker for the model")
                if wait_until is None:
                    remaining = context.time_remaining()
                    wait_until = now + min(self.config.failover_wait_s,
                                           remaining if remaining is not None else math.inf)
                if now >= wait_until:
                    raise NoHealthyWorker(f"no healthy worker could take over the request ({failures} failed)")
                await asyncio.sleep(FAILOVER_POLL_S)
                continue
            target = picked[0].address
            if record is not None:
                record.worker = target
            stub, lease = self.pool.stub(target), self.pool.acquire(target, pending - len(streamed))
            metadata = (("x-request-id", job.request_id), *self.pool.metadata)
            if requests is None:  # nothing will follow the job: the one-message call starts in one round trip
                call = stub.Run(current, timeout=context.time_remaining(), metadata=metadata)
            else:
                call = stub.Generate(_outbound(current, requests), timeout=context.time_remaining(),
                                     metadata=metadata)
            started = finished = False
            try:
                async for event in call:
                    if not started:
                        started = True
                        if on_address is not None:
                            on_address(target)
                    delta = event.delta if event.HasField("delta") else None
                    if delta is None and event.HasField("finished"):
                        finished = True
                        if event.finished.HasField("last_delta"):
                            delta = event.finished.last_delta
                    if delta is not None:
                        if not streamed:
                            first = time.monotonic()
                            if metrics is not None:
                                metrics.first_token(job.model, first - job_started)
                            if record is not None and record.first_token_at is None:
                                record.first_token_at = first
                        streamed.extend(delta.token_ids)
                    if finished and metrics is not None:
                        metrics.usage(job.model, event.finished.usage)
                    yield event
                    if finished:  # the job's last event: the caller need not wait for the worker's trailers
                        return
                return
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code not in WORKER_LOST_CODES:  # the worker's verdict on the request: pass it on, in public names
                    raise public_error(exc, renames) from exc
                failures += 1
                if record is not None:
                    record.failovers += 1
                failed[target] = time.monotonic()
                if failures > self.config.retry_attempts:
                    log.warning("worker_failover_exhausted", request_id=job.request_id, worker=target,
                                code=code.name, failures=failures)
                    raise WorkerLost(f"the request's worker failed {failures} times (the last: {code.name}); "
                                     "retry it") from exc
                log.warning("worker_failover", request_id=job.request_id, worker=target, code=code.name,
                            failures=failures, resumed_tokens=len(streamed))
                if streamed:
                    current = wpb.Job()
                    current.CopyFrom(job)
                    current.resume_token_ids.extend(streamed)
                    if current.deadline_unix_ms == 0:
                        current.deadline_unix_ms = _deadline_ms(context)
                wait_until = None
            finally:
                lease.release()
                if finished:
                    self._background(_drain(call))
                else:
                    call.cancel()

    def _fanout(self, jobs: list[wpb.Job], context, record: CallRecord) -> Fanout:
        """Start every job now, each on its own worker pick (with failover: _events)."""
        return Fanout(jobs, lambda job: self._events(job, context, record=record, renames=_renames(job)))

    async def _close(self, fanout: Fanout | None) -> None:
        if fanout is None:
            return
        await fanout.close()
        if fanout.outbox.merged:
            log.debug("deltas_coalesced", request_id=fanout.jobs[0].request_id, merged=fanout.outbox.merged)

    def _jobs(self, request: pb.GenerateRequest, model: str, context, record: CallRecord,
              key: KeyRecord) -> list[wpb.Job]:
        jobs = []
        for i, text in enumerate(request.inputs):
            job = self._job(f"{record.request_id}/{i}", model, request.parameters, context, key)
            job.text = text
            jobs.append(job)
        return jobs

    def _dispatch_ahead(self, presented: Presented, request: pb.GenerateRequest, cost: int, context,
                        record: CallRecord) -> tuple[str, Fanout] | None:
        """Start the request's jobs before its admission is decided, when it is all but certain to be admitted
        (router.ahead): (model, the started fanout), or None."""
        if not self.config.dispatch_ahead:
            return None
        key = self.auth.known(presented)
        if key is None:
            return None
        try:
            model = self._resolve_model(key, request.model)
        except ServiceError:
            return None
        if not self._room_ahead(key, cost):
            return None
        return model, self._fanout(self._jobs(request, model, context, record, key), context, record)

    async def _admit_generate(self, request: pb.GenerateRequest, context, record: CallRecord) -> Fanout:
        """Authenticate and charge a Generate/GenerateStream request; its jobs, started (possibly while the
        admission was in flight: _dispatch_ahead)."""
        presented = self.auth.begin(context)
        record.inputs = len(request.inputs)
        num_chars = sum(len(t) for t in request.inputs)
        well_formed = 0 < len(request.inputs) <= MAX_INPUTS and num_chars <= self.config.max_request_chars
        cost = sum(estimate_text(t, request.parameters) for t in request.inputs) if well_formed else 0
        ahead = self._dispatch_ahead(presented, request, cost, context, record) if well_formed else None
        try:
            if ahead is not None:  # let the worker calls go out first (the pumps create them, then gRPC's send
                await asyncio.sleep(0)  # task runs): the admission round trip below overlaps them
                await asyncio.sleep(0)
            key, model, decided = await self._admit(presented, request.model, cost, record, well_formed)
            record.model = model
            if not request.inputs:
                raise InvalidRequest("inputs: at least one input is required")
            if len(request.inputs) > MAX_INPUTS:
                raise InvalidRequest(f"inputs: at most {MAX_INPUTS} inputs per request")
            self._check_size(num_chars, "inputs")
            record.slot = self._hold(key, REQUESTS, cost, decided)
            await self._charge(key, cost, context, record, decided=decided, field="inputs")
        except BaseException:
            if ahead is not None:
                await self._drop_ahead(ahead[1])
            raise
        log.debug("request_admitted", request_id=record.request_id, key_id=key.key_id, inputs=len(request.inputs),
                  reserved=cost, one_round_trip=decided is not None, dispatched_ahead=ahead is not None)
        if ahead is not None and ahead[0] != model:  # the pool changed meanwhile: never serve what was not asked
            await self._drop_ahead(ahead[1])
            ahead = None
        if ahead is not None:
            self._ahead("kept")
        fanout = ahead[1] if ahead is not None else self._fanout(self._jobs(request, model, context, record, key),
                                                                 context, record)
        try:
            await self._headers_out(record)  # meanwhile the jobs run; their events wait in the fanout's outbox
        except BaseException:
            await self._close(fanout)
            raise
        return fanout

    def _room_ahead(self, key: KeyRecord, cost: int) -> bool:
        """Whether `key`, verified by this router, may have a job of `cost` started before its admission is decided
        (router.ahead): its last decision seen here left room for it (then that room is spent)."""
        return (self.config.dispatch_ahead and self.tiers.get(key.tier) is not None
                and self._headroom.take(key.key_id, cost))

    async def _drop_ahead(self, fanout: Fanout) -> None:
        """Cancel jobs sent ahead whose admission said no (or whose call ended first)."""
        self._ahead("cancelled")
        await self._close(fanout)

    def _ahead(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.dispatch_ahead(outcome)

    # ---- public API

    @handle_errors
    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        record = self._begin("Generate", context)
        fanout = None
        try:
            fanout = await self._admit_generate(request, context, record)
            outputs = [pb.Completion() for _ in fanout.jobs]
            texts: list[list[str]] = [[] for _ in fanout.jobs]
            async for index, event in fanout.events():
                if event.HasField("delta"):
                    texts[index].append(event.delta.text)
                    outputs[index].token_ids.extend(event.delta.token_ids)
                else:
                    fin = event.finished
                    texts[index].append(fin.last_delta.text)
                    outputs[index].token_ids.extend(fin.last_delta.token_ids)
                    outputs[index].finish_reason = fin.finish_reason
                    outputs[index].usage.CopyFrom(fin.usage)
                    record.add_usage(fin.usage)
            for out, parts in zip(outputs, texts, strict=True):
                out.text = "".join(parts)
            return pb.GenerateResponse(outputs=outputs)
        finally:
            await self._close(fanout)
            self._settle(record)

    @handle_stream_errors
    async def GenerateStream(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateChunk]:
        record = self._begin("GenerateStream", context)
        fanout = None
        try:
            fanout = await self._admit_generate(request, context, record)
            async for index, event in fanout.events():
                if event.HasField("delta"):
                    yield pb.GenerateChunk(index=index, text=event.delta.text, token_ids=event.delta.token_ids)
                else:
                    fin = event.finished
                    record.add_usage(fin.usage)
                    yield pb.GenerateChunk(index=index, text=fin.last_delta.text, token_ids=fin.last_delta.token_ids,
                                           finish_reason=fin.finish_reason, usage=fin.usage)
        finally:
            await self._close(fanout)
            self._settle(record)

    @handle_stream_errors
    async def Chat(self, request_iterator, context) -> AsyncIterator[pb.ChatEvent]:
        record = self._begin("Chat", context)  # the session until its first turn, then each turn's own
        presented = self.auth.begin(context)
        key, _, _ = await self._admit(presented, None, 0, record, one_round_trip=False)
        session_slot = self._hold(key, SESSIONS)
        base = record.request_id
        inbox = Outbox()  # client requests (unmerged) and the current turn's worker events (index 0, coalesced)
        session = _ChatSession(request_id=base)

        async def read() -> None:
            try:
                async for req in request_iterator:
                    inbox.put(req)
            except Exception as exc:  # e.g. a message that does not parse (common.rpc_guard): the loop raises it
                inbox.put(exc)
            finally:
                inbox.put(_CLOSED)

        async def pump(job: wpb.Job, outbound: asyncio.Queue, turn_record: CallRecord) -> None:
            try:
                async for event in self._events(job, context, prefer=session.address, requests=outbound,
                                                on_address=session.pin, record=turn_record, renames=_renames(job)):
                    inbox.put_event(0, event)
            except Exception as exc:
                inbox.put(exc)

        loop = asyncio.get_running_loop()
        reader = asyncio.create_task(read())
        turn: asyncio.Task | None = None
        outbound: asyncio.Queue | None = None
        closed = False
        sent_metadata = False
        # A session is bounded in age and in idle time (it holds a slot of its key and a worker's cached history):
        # past either it ends with UNAVAILABLE between turns, and a client reopens it with the conversation so far.
        aged = loop.call_later(self.config.chat_max_age_s, inbox.put, _AGED)
        idle = loop.call_later(self.config.chat_idle_timeout_s, inbox.put, _IDLE)
        expiring = False
        try:
            while not (closed and turn is None):
                index, item = await inbox.get()
                if item is _CLOSED:
                    closed = True
                elif item is _AGED or item is _IDLE:
                    expiring = expiring or item is _AGED
                    # an _IDLE counts only from the session's current idle timer (one that fired just as a turn
                    # came in may still be queued when the next idle period starts)
                    if turn is None and (item is _AGED or (not idle.cancelled() and idle.when() <= loop.time())):
                        raise _session_over(item is _AGED, self.config)
                elif isinstance(item, Exception):
                    raise item
                elif index is None and item.HasField("cancel"):
                    if outbound is not None:
                        outbound.put_nowait(wpb.WorkerRequest(cancel=wpb.Cancel()))
                elif index is None:
                    if turn is not None:
                        raise InvalidRequest("turn: a reply is still streaming; send cancel first")
                    idle.cancel()
                    request_id = f"{base}/{session.num_turns}"
                    if session.num_turns > 0:
                        record = CallRecord("Chat", request_id)
                        record.authenticated(key)
                        _CURRENT.set(record)
                    record.request_id, record.turn, record.model = request_id, session.num_turns, session.model
                    record.inputs, record.started = 1, time.monotonic()
                    field_ = f"turns[{session.num_turns}]"
                    self._check_size(sum(len(m.content) for m in item.turn.messages), f"{field_}.messages")
                    cost = estimate_chat(item.turn.messages, item.turn.parameters)
                    if session.num_turns == 0:
                        session.model = record.model = self._resolve_model(key, item.turn.model)
                    job = self._job(request_id, session.model, item.turn.parameters, context, key)
                    job.chat.messages.extend(item.turn.messages)
                    job.history_token_ids.extend(session.history)
                    outbound = asyncio.Queue()
                    # the session's key was verified when it opened: a turn may go ahead when its room allows
                    ahead = self._room_ahead(key, cost)
                    if ahead:  # the turn runs while its admission is in flight; its events wait in the inbox
                        turn = asyncio.create_task(pump(job, outbound, record))
                    try:
                        # the key is verified again (with the charge, one round trip): a key revoked or moved to
                        # another tier since the session opened is seen at its next turn
                        key, _, decided = await self._admit(presented, session.model, cost, record)
                        record.slot = self._hold(key, REQUESTS, cost, decided)
                        await self._charge(key, cost, context, record, send_metadata=not sent_metadata,
                                           decided=decided, field=field_)
                    except BaseException:
                        if ahead:  # sent ahead, then denied (or the client left): the finally below stops it
                            self._ahead("cancelled")
                        raise
                    sent_metadata = True
                    session.num_turns += 1
                    log.debug("chat_turn_admitted", request_id=job.request_id, key_id=key.key_id,
                              reserved=cost, history=len(session.history), field=field_, dispatched_ahead=ahead)
                    if ahead:
                        self._ahead("kept")
                    else:
                        turn = asyncio.create_task(pump(job, outbound, record))
                    await self._headers_out(record)  # the headers go out before any event of the session
                elif item.HasField("delta"):
                    yield pb.ChatEvent(delta=pb.ChatDelta(text=item.delta.text, token_ids=item.delta.token_ids))
                else:
                    fin = item.finished
                    if fin.last_delta.token_ids or fin.last_delta.text:
                        yield pb.ChatEvent(delta=pb.ChatDelta(text=fin.last_delta.text,
                                                              token_ids=fin.last_delta.token_ids))
                    session.history = list(fin.history_token_ids)
                    await turn
                    outbound.put_nowait(None)  # half-close the finished turn's worker stream (ends its reader)
                    turn, outbound = None, None
                    record.add_usage(fin.usage)
                    self._settle(record)
                    self._log_finished(record, grpc.StatusCode.OK)
                    yield pb.ChatEvent(end=pb.TurnEnd(finish_reason=fin.finish_reason, usage=fin.usage))
                    if expiring:
                        raise _session_over(True, self.config)
                    idle = loop.call_later(self.config.chat_idle_timeout_s, inbox.put, _IDLE)
        finally:
            aged.cancel()
            idle.cancel()
            session_slot.release()
            reader.cancel()
            if outbound is not None:
                # half-close the current turn's worker stream. When its worker call is already over (the worker
                # refused the turn, or the job finished and the client left before its end was relayed), cancelling
                # the call or the turn does nothing, and gRPC's task feeding the call's requests (_outbound) would
                # wait on this queue forever, to be destroyed pending by the garbage collector ("Task was destroyed
                # but it is pending!", "aclose(): asynchronous generator is already running")
                outbound.put_nowait(None)
            if turn is not None:
                turn.cancel()
            # both are awaited: a task left pending or with an unread exception would be reported by asyncio
            await asyncio.gather(reader, *([turn] if turn is not None else []), return_exceptions=True)
            self._settle(record)

    @handle_errors
    async def CountTokens(self, request: pb.CountTokensRequest, context) -> pb.CountTokensResponse:
        record = self._begin("CountTokens", context)
        presented = self.auth.begin(context)
        # metered like any call: one request, and the text's token estimate (settled to the exact count)
        which = request.WhichOneof("input")
        if which == "chat":
            field_, num_chars = "chat.messages", sum(len(m.content) for m in request.chat.messages)
            cost = estimate_chat(request.chat.messages, _NO_NEW_TOKENS)
        else:
            field_, num_chars = "text", len(request.text)
            cost = estimate_text(request.text, _NO_NEW_TOKENS)
        well_formed = which is not None and num_chars <= self.config.max_request_chars
        key, model, decided = await self._admit(presented, request.model, cost, record, well_formed)
        record.model, record.inputs = model, 1
        if which is None:
            raise InvalidRequest("input: set text or chat")
        self._check_size(num_chars, field_)
        record.slot = self._hold(key, REQUESTS, cost, decided)
        try:
            await self._charge(key, cost, context, record, decided=decided, field=field_)
            await self._headers_out(record)
            return await self._count_tokens(request, model, context, record)
        finally:
            self._settle(record)

    async def _count_tokens(self, request: pb.CountTokensRequest, model: str, context,
                            record: CallRecord) -> pb.CountTokensResponse:
        picked = self.pool.pick(model)
        if picked is None:
            raise NoHealthyWorker("no healthy worker for the model")
        record.worker = picked[0].address
        forwarded = pb.CountTokensRequest()
        forwarded.CopyFrom(request)
        forwarded.model = model
        try:
            response = await self.pool.stub(picked[0].address).CountTokens(
                forwarded, timeout=context.time_remaining(), metadata=self.pool.metadata)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc
        record.prompt_tokens = response.count
        return response

    @handle_errors
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        record = self._begin("ListModels", context)
        presented = self.auth.begin(context)
        key, _, decided = await self._admit(presented, None, 0, record)  # metered: one request
        await self._charge(key, 0, context, record, decided=decided)
        await self._headers_out(record)
        return pb.ListModelsResponse(models=[pb.ModelInfo(name=name, max_context=self.pool.max_context(name))
                                             for name in self.pool.models()])


_CLOSED = object()  # the client half-closed its side of a Chat stream
_AGED = object()  # a Chat session reached config.chat_max_age_s
_IDLE = object()  # a Chat session waited config.chat_idle_timeout_s for its next turn


class SessionOver(ServiceError):
    """A Chat session reached its maximum age or idle time; the client reopens it (UNAVAILABLE is retried)."""

    status = grpc.StatusCode.UNAVAILABLE


def _session_over(aged: bool, config: RouterConfig) -> SessionOver:
    if aged:
        return SessionOver(f"the chat session reached its maximum age of {config.chat_max_age_s:g} s; open a new "
                           "session with the conversation so far")
    return SessionOver(f"the chat session was idle for {config.chat_idle_timeout_s:g} s; open a new session with "
                       "the conversation so far")


def _renames(job: wpb.Job) -> tuple[tuple[str, str], ...]:
    """How the worker's names for a job's fields read in the public request it came from: a Generate input
    `inputs[i]` (request id `<call>/<i>`), a Chat turn `turns[n]` (request id `<session>/<n>`)."""
    n = job.request_id.rsplit("/", 1)[-1]
    if job.WhichOneof("prompt") == "chat":
        return (("job.chat.", f"turns[{n}]."), ("job.chat", f"turns[{n}].messages"),
                ("job.parameters", f"turns[{n}].parameters"), ("job.", f"turns[{n}]."))
    return (("job.text", f"inputs[{n}]"), ("job.parameters", "parameters"), ("job.", f"inputs[{n}]."))


@dataclass
class _ChatSession:
    request_id: str = ""
    model: str = ""
    address: str | None = None
    num_turns: int = 0
    history: list[int] = field(default_factory=list)

    def pin(self, address: str) -> None:
        if self.address is not None and address != self.address:
            log.info("chat_session_moved", request_id=self.request_id, turn=self.num_turns, worker=address)
        self.address = address


async def build_router(config: RouterConfig, pool: WorkerPool | None = None,
                       ) -> tuple[grpc.aio.Server, int, Callable[..., Awaitable[None]]]:
    """Build and start the router (and an embedded redis-server when config.redis_url is None).

    `pool` (default: one from config.workers) is started here and stopped by cleanup; pass one to watch its health.
    Returns the started server, its bound port and an async `cleanup(grace_s=config.drain_grace_s)` that drains
    (health NOT_SERVING, no new calls, in-flight ones get up to grace_s to finish) and stops everything it started."""
    embedded = None
    redis_url = config.redis_url
    if redis_url is None:
        embedded = RedisServer().start()
        redis_url = embedded.url
    ceiling_s = max(config.redis_timeout_s, config.redis_max_timeout_s)
    client = connect(redis_url, timeout_s=ceiling_s, connect_timeout_s=config.redis_timeout_s)
    store = ApiKeyStore(client, pepper=config.key_pepper)
    peers = PeerRegistry(client, heartbeat_s=config.router_heartbeat_s, timeout_s=ceiling_s)
    await peers.start()
    limiter = GuardedLimiter(RateLimiter(client, timeout_s=config.redis_timeout_s, max_timeout_s=ceiling_s),
                             policy=config.failure_policy, cooldown_s=config.fallback_cooldown_s,
                             num_routers=peers.count, fallback_share=config.fallback_share)
    tiers = TierSource(config.tiers_path, config.tier_check_interval_s)
    if pool is None:
        pool = WorkerPool(from_spec(config.workers, config.discovery_interval_s))
    pool.metadata = token_metadata(config.internal_token)
    await pool.start()
    last_known = (LastKnownKeys(config.auth_stale_s)
                  if config.failure_policy is FailurePolicy.FAIL_OPEN and config.auth_stale_s > 0 else None)
    auth = Authenticator(store, config.max_auth_failures, last_known=last_known)
    servicer = RouterServicer(config, pool, auth, limiter, tiers)
    servicer.slots = KeySlots(num_routers=peers.count)
    metrics_http = None
    if config.metrics_port is not None:
        servicer.metrics = RouterMetrics(pool, auth, limiter)
        metrics_http = serve_metrics(servicer.metrics.registry, config.host, config.metrics_port)
        log.info("metrics_serving", port=metrics_http.server_port)
    connections = server_options(
        keepalive_time_s=config.keepalive_time_s, keepalive_timeout_s=config.keepalive_timeout_s,
        min_client_ping_interval_s=config.min_client_ping_interval_s,
        max_connection_idle_s=config.max_connection_idle_s, max_connection_age_s=config.max_connection_age_s,
        max_connection_age_grace_s=config.max_connection_age_grace_s,
        max_concurrent_streams=config.max_concurrent_streams)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *connections], interceptors=[RequestGuard()])
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    health = RouterHealth(pool)
    health.add_to_server(server)
    reflection.enable_server_reflection((INFERENCE_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert is not None:
        credentials = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    await server.start()
    await health.start()
    log.info("router_started", port=port, workers=config.workers, embedded_redis=embedded is not None,
             routers=peers.count(),
             tls=config.tls_cert is not None, internal_token=config.internal_token is not None)

    async def cleanup(grace_s: float | None = None) -> None:
        grace = config.drain_grace_s if grace_s is None else grace_s
        await health.drain()
        log.info("router_draining", grace_s=grace)
        await server.stop(grace)
        await servicer.settle_pending()
        await limiter.close()
        await peers.stop()
        await health.stop()
        await pool.stop()
        await client.aclose()
        if embedded is not None:
            embedded.close()
        if metrics_http is not None:
            stop_metrics(metrics_http)
        log.info("router_stopped")

    return server, port, cleanup
