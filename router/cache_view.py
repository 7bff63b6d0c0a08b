"""What one worker's prefix cache holds, as its Worker.CacheEvents stream tells this router (pure: no I/O)."""

from __future__ import annotations

from collections.abc import Sequence


class CacheView:
    """The block keys a worker has cached, exact while its event stream is live. `live` is False before the first
    snapshot and after the stream ended (then the keys are gone: the worker may have restarted empty), so routing
    treats the worker as one whose cache is unknown, never as one whose cache is stale."""

    __slots__ = ("epoch", "block_size", "keys", "live")

    def __init__(self) -> None:
        self.epoch = ""
        self.block_size = 0
        self.keys: set[int] = set()
        self.live = False

    def apply(self, event) -> None:
        """One CacheEvent: a snapshot replaces everything; a batch adds and removes (its lists are disjoint)."""
        if event.snapshot:
            self.epoch, self.block_size = event.epoch, event.block_size
            self.keys = set(event.stored)
            self.live = True
            return
        if not self.live or event.epoch != self.epoch:  # (a batch without its snapshot cannot be placed)
            return
        self.keys.difference_update(event.evicted)
        self.keys.update(event.stored)

    def clear(self) -> None:
        self.keys = set()
        self.live = False

    def matched_blocks(self, keys: Sequence[int]) -> int:
        """How many of a prompt's leading blocks are cached here: the chain stops at the first miss (a block's key
        names every token before it, so a later hit after a miss is another prompt's block)."""
        held = self.keys
        n = 0
        for key in keys:
            if key not in held:
                break
            n += 1
        return n
