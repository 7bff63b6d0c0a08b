"""Waiting sequences queued per tenant: whose sequence is admitted next, and each tenant's share of the running set.

Two tiers, as in llm-d's flow control: within a tenant, first come first served (a preempted sequence goes back to
the front of its tenant's queue); between tenants, weighted fair queueing by virtual time (stride scheduling). Each
admission advances its tenant's virtual time by 1/weight, and the tenant with the least virtual time goes next, so
under a sustained backlog tenants are admitted in proportion to their weights. A tenant that had nothing waiting joins
at the least virtual time of those waiting (never below the last one served): idle time banks no credit, and a
newcomer is served within one round however long the others' backlogs are.

No torch here; called only from the engine thread, like the scheduler.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterator, Mapping

from worker.sequence import Sequence


class FairQueue:
    """The scheduler's waiting sequences, one FIFO per tenant (Sequence.tenant), tenants served by virtual time."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[Sequence]] = {}  # only tenants with something waiting
        self._vtime: dict[str, float] = {}  # waiting tenants, and idle ones still ahead of the clock
        self._clock = 0.0  # least virtual time among waiting tenants at the last admission
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Sequence]:
        """Tenant by tenant in the order they are served next, each tenant's queue in order."""
        for tenant in sorted(self._queues, key=self._order):
            yield from self._queues[tenant]

    def __getitem__(self, index: int) -> Sequence:
        """The index-th sequence in iteration order (tests and debugging: O(n))."""
        return list(self)[index]

    @property
    def tenants(self) -> Collection[str]:
        """Tenants with at least one waiting sequence."""
        return self._queues.keys()

    def heads(self) -> Iterator[Sequence]:
        """The first waiting sequence of each tenant."""
        return (q[0] for q in self._queues.values())

    def append(self, seq: Sequence) -> None:
        """A new sequence: to the back of its tenant's queue."""
        self._queue(seq.tenant).append(seq)
        self._len += 1

    def appendleft(self, seq: Sequence) -> None:
        """A preempted sequence: to the front of its tenant's queue, ahead of its tenant's later arrivals."""
        self._queue(seq.tenant).appendleft(seq)
        self._len += 1

    def remove(self, seq: Sequence) -> None:
        """Drop a waiting sequence (abort, stop); its tenant keeps its virtual time."""
        queue = self._queues[seq.tenant]
        queue.remove(seq)
        self._len -= 1
        if not queue:
            del self._queues[seq.tenant]

    def peek(self, first: Collection[str] = ()) -> Sequence:
        """The sequence admitted next: the head of the tenant with the least virtual time (ties: the older head),
        tenants in `first` before all others. Only when something is waiting."""
        tenant = min(self._queues, key=lambda t: (t not in first, *self._order(t)))
        return self._queues[tenant][0]

    def pop(self, seq: Sequence) -> None:
        """Admit seq, the head of its tenant's queue (as peek() returned it): its tenant's virtual time advances."""
        queue = self._queues[seq.tenant]
        assert queue[0] is seq, f"{seq.request_id} is not at the head of its tenant's queue"
        self._clock = max(self._clock, min(self._vtime[t] for t in self._queues))
        self._vtime[seq.tenant] += 1.0 / seq.weight
        queue.popleft()
        self._len -= 1
        if not queue:
            del self._queues[seq.tenant]
        if len(self._vtime) > 2 * len(self._queues) + 64:
            # an idle tenant at or behind the clock would rejoin at the clock anyway: forget it
            self._vtime = {t: v for t, v in self._vtime.items() if t in self._queues or v > self._clock}

    def check_invariants(self) -> None:
        """Assert the queues and counters agree (tests)."""
        assert self._len == sum(len(q) for q in self._queues.values())
        for tenant, queue in self._queues.items():
            assert queue and all(seq.tenant == tenant for seq in queue)
            assert self._vtime[tenant] >= self._clock

    def _queue(self, tenant: str) -> deque[Sequence]:
        queue = self._queues.get(tenant)
        if queue is None:
            queue = self._queues[tenant] = deque()
            self._vtime[tenant] = max(self._vtime.get(tenant, self._clock), self._clock)
        return queue

    def _order(self, tenant: str) -> tuple[float, int]:
        return self._vtime[tenant], self._queues[tenant][0].arrival


def fair_shares(weights: Mapping[str, int], num_slots: int, holding: Mapping[str, int]) -> dict[str, int]:
    """Each tenant's share of num_slots running sequences, in proportion to its weight, in whole slots summing to
    num_slots.

    Largest remainder: every tenant gets the floor of its exact share; the slots left over go to the largest
    remainders, ties to the tenants `holding` more slots now (so that equal claims never trade a slot back and
    forth), then by name.
    """
    total = sum(weights.values())
    shares = {t: num_slots * w // total for t, w in weights.items()}
    left = num_slots - sum(shares.values())
    by_remainder = sorted(weights, key=lambda t: (-(num_slots * weights[t] % total), -holding.get(t, 0), t))
    for tenant in by_remainder[:left]:
        shares[tenant] += 1
    return shares
