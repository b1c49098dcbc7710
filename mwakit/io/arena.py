"""Reusable byte buffers for the reader and the writer: fresh memory is the expensive kind.

A fresh allocation of tens of MiB is mapped anew by malloc and costs a page fault per page on
first touch: more than copying the same bytes from the page cache, and much more in a virtual
machine, where the host may have to back each page first (measured here: writing 1 GiB into
never-touched pages cost 2.7 CPU-s, into recycled ones 0.9). So the reader's and the writer's
large buffers are recycled: a buffer is handed out again only when no tensor views it any more
(its storage's use count says so), never while a caller, a hash in flight or a write in flight
still holds a tensor of it.
"""

from __future__ import annotations

import torch

ARENA_MIN = 1 << 20
"""Smaller buffers come from malloc, which recycles small blocks itself."""
ARENA_KEEP_FREE = 256 << 20
"""Idle bytes kept for reuse at most (the least recently used buffers go first)."""


def use_count(t: torch.Tensor) -> int | None:
    """How many references hold ``t``'s storage (None where torch cannot say)."""
    fn = getattr(torch._C, "_storage_Use_Count", None)
    if fn is None:
        return None
    return int(fn(t.untyped_storage()._cdata))


class Arena:
    """Reusable byte buffers; one is handed out again only once nothing views it.

    Owned by one thread (``take`` and ``trim`` are not thread-safe); other threads may hold
    and drop views of its buffers freely.

    Args:
        keep_free: Idle bytes kept for reuse at most.

    Attributes:
        enabled: Whether buffers are recycled (torch exposes storage use counts).
        fresh_bytes: Bytes of new buffers allocated so far (a measure of the reuse).
    """

    def __init__(self, keep_free: int = ARENA_KEEP_FREE) -> None:
        self._bufs: list[tuple[torch.Tensor, int]] = []  # (buffer, use count when idle), LRU
        self._keep_free = keep_free
        self.enabled = use_count(torch.empty(0, dtype=torch.uint8)) is not None
        self.fresh_bytes = 0

    def _idle(self, buf: torch.Tensor, base: int) -> bool:
        return use_count(buf) == base

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` that no one else uses (contents undefined)."""
        if not self.enabled or nbytes < ARENA_MIN:
            return torch.empty(nbytes, dtype=torch.uint8)
        best = -1
        for i, (buf, base) in enumerate(self._bufs):
            cap = buf.numel()
            # At most twice the size, so a small read never pins a huge buffer.
            fits = nbytes <= cap <= 2 * nbytes
            if fits and (best < 0 or cap < self._bufs[best][0].numel()) and self._idle(buf, base):
                best = i
        if best >= 0:
            entry = self._bufs.pop(best)
            self._bufs.append(entry)
            return entry[0][:nbytes]
        buf = torch.empty(-(-nbytes // ARENA_MIN) * ARENA_MIN, dtype=torch.uint8)
        self.fresh_bytes += buf.numel()
        idle = use_count(buf)
        assert idle is not None  # the arena is enabled only where use counts can be read
        self._bufs.append((buf, idle))
        return buf[:nbytes]

    @property
    def holds(self) -> bool:
        """Whether any buffer is kept."""
        return bool(self._bufs)

    def trim(self) -> None:
        """Drop the least recently used idle buffers beyond the free budget."""
        free = [b for b, base in self._bufs if self._idle(b, base)]
        total = sum(b.numel() for b in free)
        for b in free:  # oldest first
            if total <= self._keep_free:
                break
            self._bufs = [(x, y) for x, y in self._bufs if x is not b]
            total -= b.numel()

    def clear(self) -> None:
        """Forget every buffer (those still viewed stay valid for their holders)."""
        self._bufs.clear()
