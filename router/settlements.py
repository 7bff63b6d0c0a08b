"""Settlement of finished calls: what each reserved and did not use is refunded (what it used beyond its reservation
charged), off the calls' path and in bulk.

Adjustments are summed per key and tier and written every FLUSH_S by one task: under load, the calls of one key
that end within FLUSH_S cost one Redis command instead of one command and one task each. A refund lands at most
FLUSH_S late (a key that just finished calls sees its tokens back that much later), which is small next to the
minute its buckets refill over."""

from __future__ import annotations

import asyncio
import contextlib

from ratelimit.policy import GuardedLimiter
from ratelimit.tiers import Tier
from router.background import Background

FLUSH_S = 0.05


class Settlements:
    def __init__(self, limiter: GuardedLimiter, background: Background, flush_s: float = FLUSH_S) -> None:
        self.limiter = limiter
        self.background = background
        self.flush_s = flush_s
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
        await asyncio.sleep(self.flush_s)  # (the router's drain waits for it: Background.wait)
        batch, self._queued = self._queued, {}
        self._flushing = False
        for (key_id, _), (tier, unused) in batch.items():
            with contextlib.suppress(Exception):  # best effort; the limiter logs backend failures itself
                if unused > 0:
                    await self.limiter.refund(key_id, tier, unused)
                elif unused < 0:
                    await self.limiter.debit(key_id, tier, -unused)
