"""Settlement of finished calls: what each reserved and did not use is refunded (what it used beyond its reservation
charged), off the calls' path and in bulk.

Calls that end in the same pass of the event loop are settled by one task, their adjustments summed per key and
tier first: at a burst, N calls of one key cost one Redis command instead of N commands and N tasks."""

from __future__ import annotations

import contextlib

from ratelimit.policy import GuardedLimiter
from ratelimit.tiers import Tier
from router.background import Background


class Settlements:
    def __init__(self, limiter: GuardedLimiter, background: Background) -> None:
        self.limiter = limiter
        self.background = background
        self._queued: dict[tuple[str, str], tuple[Tier, int]] = {}
        self._flushing = False

    def add(self, key_id: str, tier: Tier, unused: int) -> None:
        """Refund `unused` tokens to `key_id`'s bucket at `tier` (negative: charge them, into debt if need be)."""
        slot = (key_id, tier.name)
        queued = self._queued.get(slot)
        self._queued[slot] = (tier, unused + (queued[1] if queued is not None else 0))
        if not self._flushing:
            self._flushing = True
            self.background.spawn(self._flush())  # counted by Background from now on: its metric sees it pending

    async def _flush(self) -> None:
        batch, self._queued = self._queued, {}  # everything settled before this task's first step
        self._flushing = False
        for (key_id, _), (tier, unused) in batch.items():
            with contextlib.suppress(Exception):  # best effort; the limiter logs backend failures itself
                if unused > 0:
                    await self.limiter.refund(key_id, tier, unused)
                elif unused < 0:
                    await self.limiter.debit(key_id, tier, -unused)
