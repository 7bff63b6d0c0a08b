"""At most one log line per interval for a repeated event, so that whoever can reach a port cannot flood the logs.

    refusals = Throttle(10.0)
    refusals.warn(log, "internal_token_refused", method=..., present=...)

The first occurrence of a key (the event name, or `key=` when one event needs several) is logged at once; later
ones within `interval_s` of the last line are only counted, and the next line after the interval carries that
count as `suppressed` (0 on a first line). A count still pending when the calls stop is reported with the next
occurrence, whenever that comes.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable


class Throttle:
    """Per-key rate limit on log lines. `clock` (seconds, monotonic) is injectable for tests; at most `max_keys`
    keys are remembered (the least recently logged is forgotten first)."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic, max_keys: int = 1024) -> None:
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s!r}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys!r}")
        self.interval_s = interval_s
        self._clock = clock
        self._max_keys = max_keys
        self._keys: OrderedDict[Hashable, list] = OrderedDict()  # key -> [time of its last line, suppressed since]
        self._lock = threading.Lock()

    def allow(self, key: Hashable) -> int | None:
        """None when a line for `key` is due only later (this occurrence is counted); else the number of
        occurrences suppressed since its last line, and the caller logs now."""
        now = self._clock()
        with self._lock:
            state = self._keys.get(key)
            if state is not None and now - state[0] < self.interval_s:
                state[1] += 1
                return None
            suppressed = state[1] if state is not None else 0
            self._keys[key] = [now, 0]
            self._keys.move_to_end(key)
            if len(self._keys) > self._max_keys:
                self._keys.popitem(last=False)
            return suppressed

    def log(self, method: Callable[..., object], event: str, /, *, key: Hashable = None, **fields) -> bool:
        """Call `method(event, suppressed=N, **fields)` (a bound logger's warning, info, ...) if due; returns
        whether it did."""
        suppressed = self.allow(event if key is None else (event, key))
        if suppressed is None:
            return False
        method(event, suppressed=suppressed, **fields)
        return True

    def warn(self, logger, event: str, /, *, key: Hashable = None, **fields) -> bool:
        """`logger.warning(event, suppressed=N, **fields)` if due (see log)."""
        return self.log(logger.warning, event, key=key, **fields)
