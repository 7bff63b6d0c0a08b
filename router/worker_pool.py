"""The router's worker pool: channels, health watches, load polling and in-flight leases (its only async state)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from router import balancer
from router.balancer import WorkerState
from router.cache_view import CacheView
from router.discovery import Discovery
from router.prompt_blocks import PromptBlocks, PromptEncoder

log = structlog.get_logger("router.worker_pool")

SERVING = health_pb2.HealthCheckResponse.SERVING
# Reconnect backoff of a health watch (seconds), doubled per failure up to the maximum, with jitter.
BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 2.0
# Keep gRPC's own reconnect backoff short too (its default maximum is 120 s).
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
# A worker that does not publish its cache (prefix caching off, or an older worker) is asked again this often.
NO_CACHE_EVENTS_RETRY_S = 30.0


@dataclass(eq=False)
class _Worker:
    address: str
    channel: grpc.aio.Channel
    stub: wpb_grpc.WorkerStub
    serving: bool = False
    info: wpb.InfoResponse | None = None
    load: wpb.LoadResponse | None = None
    load_at: float = float("-inf")
    in_flight: int = 0
    lease_tokens: int = 0
    tasks: list[asyncio.Task] = field(default_factory=list)
    view: CacheView = field(default_factory=CacheView)
    tokenizer: str = ""  # PromptEncoder.fingerprint of the worker's tokenizer, once read


class Lease:
    """One request outstanding on a worker; `release()` (idempotent) or leave the `with` block to end it."""

    __slots__ = ("address", "pending_tokens", "_worker", "_released")

    def __init__(self, worker: _Worker, pending_tokens: int) -> None:
        self.address = worker.address
        self.pending_tokens = pending_tokens
        self._worker = worker
        self._released = False
        worker.in_flight += 1
        worker.lease_tokens += pending_tokens

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._worker.in_flight -= 1
        self._worker.lease_tokens -= self.pending_tokens

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class WorkerPool:
    """Tracks every discovered worker: health (grpc.health.v1 Watch on ""), Info once healthy, Load polled.

    A worker counts as healthy while its watch reports SERVING, its Info is known and its last Load answer is at most
    `health_timeout_s` old (so a hung worker whose connection stays open drops out too). Unreachable counts as
    unhealthy; the watch reconnects with backoff. Discovery is re-checked every `refresh_s`.
    """

    def __init__(self, discovery: Discovery, *, load_interval_s: float = 0.5, health_timeout_s: float = 5.0,
                 refresh_s: float = 3.0, rng: random.Random | None = None) -> None:
        self._discovery = discovery
        self.load_interval_s = load_interval_s
        self.health_timeout_s = health_timeout_s
        self.refresh_s = refresh_s
        self._rng = rng or random.Random()
        self._jitter = random.Random()
        self._workers: dict[str, _Worker] = {}
        self.metadata: tuple[tuple[str, str], ...] = ()  # sent on every worker call (the internal token)
        # cache-aware routing (set before start): follow every worker's CacheEvents and weigh cached tokens against
        # load, `affinity_tokens` cached tokens against one more request (balancer.pick_cached)
        self.cache_routing = False
        self.affinity_tokens = 128
        # (reason, predicted cached tokens, model) of each routing decision, for metrics
        self.on_decision: Callable[[str, int, str], None] | None = None
        self._encoders: dict[str, PromptEncoder] = {}  # model -> the encoder of its workers' tokenizer
        self._refresh_task: asyncio.Task | None = None

    # ---- lifecycle

    async def start(self) -> None:
        """Discover the first targets (errors logged, retried later) and start watching them."""
        await self.refresh()
        self._refresh_task = asyncio.create_task(self._refresh_loop(), name="worker-pool-refresh")

    async def stop(self) -> None:
        """Stop every task and close every channel."""
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh_task
            self._refresh_task = None
        workers, self._workers = list(self._workers.values()), {}
        await asyncio.gather(*(self._close(w) for w in workers))

    async def refresh(self) -> None:
        """Reconcile with discovery once: open new targets, close vanished ones (kept as-is on discovery errors)."""
        try:
            targets = set(await self._discovery.targets())
        except Exception as exc:  # any discovery failure keeps the current pool
            log.warning("discovery_failed", error=str(exc), kept=len(self._workers))
            return
        for address in sorted(targets - self._workers.keys()):
            self._open(address)
        gone = [self._workers.pop(a) for a in sorted(self._workers.keys() - targets)]
        for w in gone:
            log.info("worker_removed", address=w.address)
        await asyncio.gather(*(self._close(w) for w in gone))

    async def wait_healthy(self, count: int = 1, timeout_s: float = 10.0) -> bool:
        """Wait until at least `count` workers are healthy; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while sum(s.is_healthy for s in self.snapshot()) < count:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    # ---- queries (synchronous, no I/O)

    def addresses(self) -> list[str]:
        return sorted(self._workers)

    def snapshot(self) -> list[WorkerState]:
        """One WorkerState per known worker, sorted by address."""
        now = time.monotonic()
        return [self._state(self._workers[a], now) for a in sorted(self._workers)]

    def pick(self, model: str, exclude: frozenset[str] = frozenset(), prefer: str | None = None,
             prompt: PromptBlocks | None = None) -> tuple[WorkerState, grpc.aio.Channel] | None:
        """Choose a healthy worker for `model`, with its channel; None if none fits. `prefer` (a Chat session's
        worker, which holds its KV cache) wins while it is healthy and not excluded. Otherwise, with `prompt` (its
        blocks: prompt_blocks) and cache routing on, expected cached tokens against load (balancer.pick_cached);
        else power of two choices."""
        states = self.snapshot()
        if prefer is not None and prefer not in exclude:
            for state in states:
                if state.address == prefer and state.is_healthy and state.model == model:
                    self._decided(balancer.STICKY, 0, model)
                    return state, self._workers[prefer].channel
        if prompt is None or not self.cache_routing:
            chosen = balancer.pick(states, model, self._rng, exclude)
            reason, predicted = balancer.LOAD, 0
        else:
            cached = self.cached_tokens(model, prompt)
            chosen, reason = balancer.pick_cached(states, model, self._rng, cached, self.affinity_tokens, exclude)
            predicted = cached.get(chosen.address, 0) if chosen is not None else 0
        if chosen is None:
            return None
        self._decided(reason, predicted, model)
        return chosen, self._workers[chosen.address].channel

    def serves(self, address: str, model: str) -> bool:
        """Whether `address` is a known worker, healthy, serving `model` (a Chat session's worker still usable)."""
        w = self._workers.get(address)
        if w is None:
            return False
        state = self._state(w, time.monotonic())
        return state.is_healthy and state.model == model

    def prompt_blocks(self, model: str, text: str) -> PromptBlocks | None:
        """A text prompt's blocks as the workers of `model` name them, read only as far as some worker holds
        them; None without cache routing or when no worker of the model has a known cache."""
        if not self.cache_routing:
            return None
        encoder = self._encoders.get(model)
        if encoder is None:
            return None
        held = [w.view.keys for w in self._workers.values()
                if w.view.live and w.tokenizer == encoder.fingerprint and w.view.block_size == encoder.block_size]
        if not held:
            return None
        return encoder.blocks(text, lambda key: any(key in keys for keys in held))

    def prompt_blocks_of_ids(self, model: str, token_ids) -> PromptBlocks | None:
        """The same for a prompt given as token ids (a Chat session's transcript)."""
        if not self.cache_routing:
            return None
        encoder = self._encoders.get(model)
        return encoder.blocks_of_ids(token_ids) if encoder is not None else None

    def cached_tokens(self, model: str, prompt: PromptBlocks) -> dict[str, int]:
        """address -> prompt tokens cached there, for the workers of `model` whose cache is known and whose
        tokenizer and block size are the prompt's (a match then means the same tokens)."""
        encoder = self._encoders.get(model)
        out = {}
        for w in self._workers.values():
            view = w.view
            if (view.live and view.block_size == prompt.block_size and encoder is not None
                    and w.tokenizer == encoder.fingerprint):
                out[w.address] = view.matched_blocks(prompt.keys) * prompt.block_size
        return out

    def cached_blocks(self) -> list[tuple[str, int]]:
        """(address, blocks cached) of each worker whose cache is known, sorted by address."""
        return sorted((w.address, len(w.view.keys)) for w in list(self._workers.values()) if w.view.live)

    def _decided(self, reason: str, predicted: int, model: str) -> None:
        if self.on_decision is not None:
            self.on_decision(reason, predicted, model)

    def models(self) -> dict[str, int]:
        """Healthy model names mapped to their number of healthy workers, sorted by name."""
        return balancer.models(self.snapshot())

    def max_context(self, model: str) -> int:
        """The context length (tokens) that workers of `model` reported in their Info; 0 when none is known."""
        return max((w.info.max_context for w in self._workers.values()
                    if w.info is not None and w.info.model == model), default=0)

    def default_max_new_tokens(self, model: str) -> int:
        """The max_new_tokens that workers of `model` (any model when it is unknown here) apply to a job that sets
        none, as their Info reported: what the router reserves for such a job. 0 when no worker is known."""
        infos = [w.info for w in self._workers.values() if w.info is not None]
        of_model = [i.default_max_new_tokens for i in infos if i.model == model]
        return max(of_model or [i.default_max_new_tokens for i in infos], default=0)

    def default_model(self) -> str | None:
        """The model of the healthy pool if it serves exactly one, else the first by name; None when none healthy."""
        names = list(self.models())
        return names[0] if names else None

    def stub(self, address: str) -> wpb_grpc.WorkerStub:
        return self._workers[address].stub

    def channel(self, address: str) -> grpc.aio.Channel:
        return self._workers[address].channel

    def acquire(self, address: str, pending_tokens: int = 0) -> Lease:
        """Count one request (of `pending_tokens` estimated tokens) in flight on `address`; KeyError if unknown."""
        return Lease(self._workers[address], max(pending_tokens, 0))

    # ---- internals

    def _state(self, w: _Worker, now: float) -> WorkerState:
        info, load = w.info, w.load or wpb.LoadResponse()
        healthy = w.serving and info is not None and now - w.load_at <= self.health_timeout_s
        return WorkerState(
            address=w.address,
            model=info.model if info is not None else "",
            is_healthy=healthy,
            num_in_flight=w.in_flight,
            num_pending_tokens=load.num_pending_tokens + w.lease_tokens,
            num_waiting=load.num_waiting,
            num_running=load.num_running,
            num_free_blocks=load.num_free_blocks,
            num_total_blocks=load.num_total_blocks,
            max_num_seqs=info.max_num_seqs if info is not None else 0,
            kv_capacity_tokens=info.kv_capacity_tokens if info is not None else 0,
        )

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()

    def _open(self, address: str) -> None:
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        w = _Worker(address, channel, wpb_grpc.WorkerStub(channel))
        w.tasks = [asyncio.create_task(self._watch(w), name=f"health-{address}"),
                   asyncio.create_task(self._poll_load(w), name=f"load-{address}")]
        if self.cache_routing:
            w.tasks.append(asyncio.create_task(self._follow_cache(w), name=f"cache-{address}"))
        self._workers[address] = w
        log.info("worker_added", address=address)

    async def _close(self, w: _Worker) -> None:
        for task in w.tasks:
            task.cancel()
        await asyncio.gather(*w.tasks, return_exceptions=True)
        w.serving = False
        w.view.clear()
        await w.channel.close()

    def _set_serving(self, w: _Worker, serving: bool, reason: str) -> None:
        if serving != w.serving:
            log.info("worker_healthy" if serving else "worker_unhealthy", address=w.address, reason=reason)
        w.serving = serving
        if not serving:
            w.view.clear()  # (its event stream ends too, but a restarted worker may answer before that is seen)

    async def _fetch(self, w: _Worker) -> None:
        """Info and a first Load, before a worker counts as healthy."""
        info = await w.stub.Info(wpb.InfoRequest(), timeout=self.health_timeout_s, metadata=self.metadata)
        load = await w.stub.Load(wpb.LoadRequest(), timeout=self.health_timeout_s, metadata=self.metadata)
        if w.info is None or w.info.model != info.model:
            log.info("worker_info", address=w.address, model=info.model, max_context=info.max_context,
                     kv_capacity_tokens=info.kv_capacity_tokens, max_num_seqs=info.max_num_seqs,
                     tp_size=info.tp_size)
        w.info, w.load, w.load_at = info, load, time.monotonic()

    async def _watch(self, w: _Worker) -> None:
        health = health_pb2_grpc.HealthStub(w.channel)
        backoff = BACKOFF_INITIAL_S
        while True:
            call = health.Watch(health_pb2.HealthCheckRequest(service=""))
            try:
                async for resp in call:
                    if resp.status == SERVING:
                        if not w.serving:
                            await self._fetch(w)  # may have restarted with another model: re-read Info
                        self._set_serving(w, True, "serving")
                        backoff = BACKOFF_INITIAL_S
                    else:
                        self._set_serving(w, False, health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
                self._set_serving(w, False, "watch_ended")
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    log.error("worker_refused_internal_token", address=w.address,
                              hint="router and worker must share the same internal token")
                self._set_serving(w, False, exc.code().name)
            except Exception:  # keep watching whatever went wrong; the worker stays unhealthy meanwhile
                log.exception("health_watch_error", address=w.address)
                self._set_serving(w, False, "error")
            finally:
                call.cancel()
            await asyncio.sleep(backoff * (0.5 + self._jitter.random()))
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _poll_load(self, w: _Worker) -> None:
        while True:
            await asyncio.sleep(self.load_interval_s)
            if not w.serving:
                continue
            try:
                load = await w.stub.Load(wpb.LoadRequest(), timeout=self.health_timeout_s, metadata=self.metadata)
            except grpc.aio.AioRpcError as exc:
                log.debug("load_failed", address=w.address, code=exc.code().name)
                continue
            w.load, w.load_at = load, time.monotonic()

    async def _follow_cache(self, w: _Worker) -> None:
        """Keep w.view exact: read the worker's tokenizer, then follow its CacheEvents stream. The view is cleared
        the moment the stream ends (a restarted worker starts empty, and its new stream's snapshot says so)."""
        backoff = BACKOFF_INITIAL_S
        while True:
            while not (w.serving and w.info is not None):
                await asyncio.sleep(0.05)
            call = None
            try:
                await self._read_tokenizer(w)
                call = w.stub.CacheEvents(wpb.CacheEventsRequest(), metadata=self.metadata)
                async for event in call:
                    w.view.apply(event)
                    if event.snapshot:  # (once per stream: the view is live from here)
                        log.info("worker_cache_view_live", address=w.address, blocks=len(w.view.keys))
                    backoff = BACKOFF_INITIAL_S
                delay = backoff
            except grpc.aio.AioRpcError as exc:
                unsupported = exc.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION)
                log.info("worker_cache_events_ended", address=w.address, code=exc.code().name)
                delay = NO_CACHE_EVENTS_RETRY_S if unsupported else backoff
            finally:
                w.view.clear()
                if call is not None:
                    call.cancel()
            await asyncio.sleep(delay * (0.5 + self._jitter.random()))
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _read_tokenizer(self, w: _Worker) -> None:
        resp = await w.stub.Tokenizer(wpb.TokenizerRequest(), timeout=self.health_timeout_s, metadata=self.metadata)
        model = w.info.model
        encoder = self._encoders.get(model)
        fingerprint = PromptEncoder.fingerprint_of(resp.tokenizer_json)
        if encoder is None or (encoder.fingerprint != fingerprint and not self._model_has_tokenizer(model,
                                                                                                    encoder, w)):
            encoder = self._encoders[model] = PromptEncoder(resp.tokenizer_json, resp.block_size)
        if encoder.fingerprint != fingerprint:
            log.warning("worker_tokenizer_differs", address=w.address, model=model)
        w.tokenizer = fingerprint

    def _model_has_tokenizer(self, model: str, encoder: PromptEncoder, other: _Worker) -> bool:
        """Whether another live worker of `model` still uses `encoder`'s tokenizer (else a new one replaces it)."""
        return any(w is not other and w.info is not None and w.info.model == model
                   and w.tokenizer == encoder.fingerprint for w in self._workers.values())
