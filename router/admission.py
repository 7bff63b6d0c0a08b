"""Admission: who a call is and what it may spend. API keys (router.auth) and rate limits (ratelimit) behind one
interface: verify, resolve the model, charge, hold a concurrency slot, settle. The only owner of the one-round-trip
path that pipelines a known key's lookup with its charge."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import structlog

from common.errors import InvalidRequest
from ratelimit.policy import GuardedDecision, GuardedLimiter, LimiterUnavailable
from ratelimit.tiers import Tier, TierSource
from router.ahead import Headroom
from router.auth import Authenticator, Presented, check_model
from router.background import Background
from router.calls import CallRecord
from router.concurrency import REQUESTS, KeySlots, Slot
from router.config import RouterConfig
from router.errors import LimiterDown, ModelNotFound, NoHealthyWorker, RateLimited, TierMissing
from router.keys import KeyRecord
from router.metrics import RouterMetrics
from router.settlements import Settlements
from router.worker_pool import WorkerPool

log = structlog.get_logger("router.server")

CONCURRENCY_RETRY_S = 1.0  # the wait advertised to a key over its concurrency cap (a call of its may end by then)


@dataclass(frozen=True, slots=True)
class Admitted:
    """A verified key, the model resolved for it ("" when the call names none), and the charge already decided
    in the same Redis round trip as the key's lookup (None: the caller charges with Admission.charge)."""

    key: KeyRecord
    model: str
    decided: tuple[Tier, GuardedDecision] | None


class Admission:
    def __init__(self, config: RouterConfig, auth: Authenticator, limiter: GuardedLimiter, tiers: TierSource,
                 pool: WorkerPool, metrics: RouterMetrics, slots: KeySlots, background: Background) -> None:
        self.config = config
        self.auth = auth
        self.limiter = limiter
        self.tiers = tiers
        self.pool = pool
        self.metrics = metrics
        self.slots = slots
        self.background = background
        self.settlements = Settlements(limiter, background)
        self.headroom = Headroom()  # rate-limit room per key, as last seen here (dispatch ahead: router.ahead)

    def begin(self, context) -> Presented:
        """The call's credentials (no lookup yet), or RateLimited when their failure slot failed too often."""
        return self.auth.begin(context)

    def known(self, presented: Presented) -> KeyRecord | None:
        return self.auth.known(presented)

    # ---- verify

    async def admit(self, presented: Presented, requested_model: str | None, cost: int, record: CallRecord,
                    one_round_trip: bool = True) -> Admitted:
        """Verify the presented key against the key store and resolve the model (`requested_model` None: no model)
        for a call that will cost `cost` tokens. Every call and every Chat turn comes through here, so a revoked
        key, or one moved to another tier, is seen at its next call or turn."""
        fast = await self._admit_fast(presented, requested_model, cost, record) if one_round_trip else None
        if fast is not None:
            return fast
        key = self.auth.finish(presented, await self.auth.lookup(presented))
        record.authenticated(key)
        return Admitted(key, self.resolve_model(key, requested_model) if requested_model is not None else "", None)

    async def _admit_fast(self, presented: Presented, requested_model: str | None, cost: int,
                          record: CallRecord) -> Admitted | None:
        """Authenticate and charge in ONE Redis round trip, for a key this router verified before: its lookup and
        the charge at the tier it had are pipelined, then the key is checked. A guess that proves wrong (key now
        invalid, another tier, a model it may not use) has its charge refunded. None: take the one-by-one path
        (unknown key, Redis skipped or failing — that path applies the failure policy)."""
        guess = self.auth.speculation(presented)
        tier = self.tiers.get(guess[2]) if guess is not None else None
        if tier is None:
            return None
        command, key_id, tier_name = guess
        got = await self.limiter.acquire_quota_with(command, key_id, tier, cost,
                                                    self._refund_if_charged(key_id, tier, cost))
        if got is None:
            return None
        reply, d = got
        try:
            key = self.auth.verify_reply(presented, reply)
            record.authenticated(key)
            model = self.resolve_model(key, requested_model) if requested_model is not None else ""
        except BaseException:
            if d.allowed:
                self.background.spawn(self.limiter.refund_quota(key_id, tier, cost))
            raise
        if key.tier != tier_name:  # the key moved to another tier since: undo, charge it at the new one
            if d.allowed:
                self.background.spawn(self.limiter.refund_quota(key_id, tier, cost))
            return Admitted(key, model, None)
        return Admitted(key, model, (tier, d))

    def _refund_if_charged(self, key_id: str, tier: Tier, tokens: int):
        """What to do when a call is cancelled (its client went away) while Redis decides its charge: Redis may
        still apply it; once it answers, a charge it applied is refunded whole, so a client gone during its
        admission is not billed for it. Handed to the limiter, which keeps the answer for it (no task per call)."""

        def abandoned(charged: bool) -> None:
            if charged:
                self.background.spawn(self.limiter.refund_quota(key_id, tier, tokens))

        return abandoned

    def resolve_model(self, key: KeyRecord, requested: str) -> str:
        models = self.pool.models()  # (one snapshot of the pool: the first name is the pool's default model)
        model = requested or self.config.default_model or next(iter(models), None)
        if model is None or not models:
            raise NoHealthyWorker("no healthy worker")
        if model not in models:
            raise ModelNotFound(f"model {model!r} is not served")
        check_model(key, model)
        return model

    def tier(self, key: KeyRecord) -> Tier:
        tier = self.tiers.get(key.tier)
        if tier is None:
            log.error("tier_missing", key_id=key.key_id, tier=key.tier)
            raise TierMissing("the API key's tier is not configured")
        return tier

    def check_size(self, num_chars: int, field: str) -> None:
        if num_chars > self.config.max_request_chars:
            raise InvalidRequest(field, f"{num_chars} characters in all; at most {self.config.max_request_chars} "
                                        "per call")

    def default_max_new(self, model: str) -> int:
        """What a job that sets no max_new_tokens may generate on `model` (the workers' default)."""
        return self.pool.default_max_new_tokens(model or self.config.default_model or "")

    # ---- spend

    def hold(self, key: KeyRecord, kind: str, cost: int = 0, decided: tuple[Tier, GuardedDecision] | None = None,
             ) -> Slot:
        """A concurrency slot of `key` (router.concurrency), or RateLimited when it holds its tier's share already;
        a charge `decided` for the call (one round trip) is refunded then."""
        tier = self.tier(key)
        cap = tier.max_concurrent_requests if kind == REQUESTS else tier.max_chat_sessions
        slot = self.slots.try_hold(key.key_id, kind, cap)
        if slot is not None:
            return slot
        if decided is not None and decided[1].allowed and not decided[1].degraded:
            self.background.spawn(self.limiter.refund_quota(key.key_id, decided[0], cost))
        self.metrics.ratelimit_decision("concurrency_limited")
        what = "calls in flight" if kind == REQUESTS else "open Chat sessions"
        limit = self.slots.limit(cap)
        log.info("concurrency_limited", key_id=key.key_id, kind=kind, limit=limit)
        raise RateLimited(f"too many {what} for this API key (at most {limit} here)", CONCURRENCY_RETRY_S,
                          ((f"key:{key.key_id}:concurrent_{kind}", f"at most {limit} {what} at once"),))

    async def charge(self, key: KeyRecord, tokens: int, context, record: CallRecord, *, send_metadata: bool = True,
                     decided: tuple[Tier, GuardedDecision] | None = None, field: str = "inputs") -> None:
        """Charge one request and `tokens` to `key` (or apply a decision already `decided` for it); on success
        `record` holds the reservation (to settle), else RateLimited / LimiterDown — or InvalidRequest naming
        `field` (what the tokens are for) when they exceed what the tier can ever grant at once."""
        tier, d = decided if decided is not None else await self._acquire(key, tokens)
        self.metrics.ratelimit_decision("limited" if not d.allowed else "allowed_local" if d.degraded else "allowed")
        self.headroom.saw(key.key_id, d)
        if not d.tokens.allowed and not math.isfinite(d.tokens.retry_after_s):  # no wait would make it fit
            raise InvalidRequest(field, f"needs up to {tokens} tokens (prompt estimate plus max_new_tokens); the API "
                                        f"key's tier grants at most {d.tokens.limit} at once")
        if not d.allowed:
            raise self._rate_limited(key, tokens, d, record)
        record.tier, record.reserved = tier, tokens
        if send_metadata:  # sent by headers_out, once the call's jobs are on their way
            record.headers = _rate_limit_headers(d)

    async def _acquire(self, key: KeyRecord, tokens: int) -> tuple[Tier, GuardedDecision]:
        tier = self.tier(key)
        try:
            return tier, await self.limiter.acquire_quota(key.key_id, tier, tokens,
                                                          self._refund_if_charged(key.key_id, tier, tokens))
        except LimiterUnavailable as exc:
            self.metrics.ratelimit_decision("unavailable")
            raise LimiterDown("rate-limit backend unavailable") from exc

    @staticmethod
    def _rate_limited(key: KeyRecord, tokens: int, d: GuardedDecision, record: CallRecord) -> RateLimited:
        violations = []
        if not d.requests.allowed:
            violations.append((f"key:{key.key_id}:requests", "requests per minute exhausted"))
        if not d.tokens.allowed:
            violations.append((f"key:{key.key_id}:tokens", "tokens per minute exhausted"))
        log.info("rate_limited", request_id=record.request_id, key_id=key.key_id, tokens=tokens,
                 retry_after_s=d.retry_after_s if math.isfinite(d.retry_after_s) else -1)
        return RateLimited("rate limit exceeded", d.retry_after_s, tuple(violations))

    @staticmethod
    async def headers_out(record: CallRecord, context) -> None:
        """Send the call's initial metadata (the rate-limit headers charge decided), before its first message; a
        no-op once sent. Awaited here rather than sent from a task of its own: two operations in flight at once
        may reach the wire in either order, and the first message must not overtake the headers."""
        headers, record.headers = record.headers, None
        if headers is not None:
            with contextlib.suppress(Exception):  # the call may already be over (client gone): nothing to report
                await context.send_initial_metadata(headers)

    def room_ahead(self, key: KeyRecord, cost: int) -> bool:
        """Whether `key`, verified by this router, may have a job of `cost` started before its admission is decided
        (router.ahead): its last decision seen here left room for it (then that room is spent)."""
        return (self.config.dispatch_ahead and self.tiers.get(key.tier) is not None
                and self.headroom.take(key.key_id, cost))

    # ---- settle

    def settle(self, record: CallRecord) -> None:
        """Refund what `record` reserved and did not use — or charge what it used beyond its reservation (the
        prompt estimate can fall short), into debt if need be — in the background: the client's response does not
        wait for Redis. Idempotent; nothing for a call that was never charged."""
        if record.slot is not None:
            record.slot.release()
        if record.settled or record.tier is None:
            return
        record.settled = True
        unused = record.reserved - record.used
        log.debug("request_settled", request_id=record.request_id, key_id=record.key_id, reserved=record.reserved,
                  used=record.used, refunded=unused)
        if unused:
            self.settlements.add(record.key_id, record.tier, unused)


def _rate_limit_headers(d: GuardedDecision) -> tuple[tuple[str, str], ...]:
    return (("x-ratelimit-limit-requests", str(d.requests.limit)),
            ("x-ratelimit-remaining-requests", str(d.requests.remaining)),
            ("x-ratelimit-remaining-tokens", str(d.tokens.remaining)),
            ("x-ratelimit-reset-requests", f"{math.ceil(d.requests.reset_after_s * 1000)}ms"),
            ("x-ratelimit-reset-tokens", f"{math.ceil(d.tokens.reset_after_s * 1000)}ms"))
