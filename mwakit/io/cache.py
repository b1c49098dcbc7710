"""Input tensors kept in memory across merges, so a second merge of the same files reads nothing.

Tuning merges the same checkpoints again and again with other weights; each `execute` would
re-read (and copy out of the page cache) every adapter. An `InputCache` given to the reader
(`mwakit.io.reader.PreadReader`) keeps each tensor's bytes the first time they are read and
hands them out again on later reads of the same tensor of the same file.

A file is known by what ``fstat`` says of it when the reader opens it — its real path,
device, inode, size, mtime and ctime — so a file rewritten, replaced or touched since is a
different file: its old entries are dropped and it is read afresh. The cache holds at most
``budget`` bytes; a tensor that does not fit is simply read as without a cache (nothing is
evicted for it: a tune reads the same tensors in the same order every candidate, where an LRU
would evict each tensor just before it is needed again).

Tensors handed out share the cached bytes: callers must never write into them, which every
merge method and executor path guarantees (tests/methods/test_inputs_unchanged.py).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch

from mwakit.io.header import TensorInfo

#: The share of physical memory a cache holds by default.
DEFAULT_FRACTION = 0.25


@dataclass(frozen=True)
class FileId:
    """A file as ``fstat`` saw it when opened: any rewrite, replace or touch changes it."""

    real: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike[str], st: os.stat_result) -> FileId:
        """The identity of the file at ``path`` whose ``fstat`` is ``st``."""
        return cls(
            os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
        )


_Key = tuple[FileId, str, str, int, int]


def default_budget() -> int:
    """`DEFAULT_FRACTION` of this machine's physical memory (1 GiB where it cannot be read)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return 1 << 30
    return int(total * DEFAULT_FRACTION)


class InputCache:
    """Raw bytes of input tensors, by file identity and tensor, within a memory budget.

    Thread-safe: the reader's read-ahead thread fills it too.

    Args:
        budget: Bytes it may hold (default `default_budget`); 0 keeps nothing.

    Attributes:
        hits: Tensors handed out from memory.
        misses: Tensors read from their file by a reader with this cache (not held yet, or
            over the budget).
        nbytes: Bytes held now.
    """

    def __init__(self, budget: int | None = None) -> None:
        if budget is not None and budget < 0:
            raise ValueError(f"cache budget must be >= 0, got {budget}")
        self.budget = default_budget() if budget is None else budget
        self.hits = 0
        self.misses = 0
        self.nbytes = 0
        self._lock = threading.Lock()
        self._entries: dict[_Key, torch.Tensor] = {}
        self._files: dict[str, FileId] = {}  # real path -> the identity its entries are of
        self._ptrs: set[int] = set()  # data pointers of the held buffers (`owns`)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    @staticmethod
    def key(file: FileId, info: TensorInfo) -> _Key:
        """The cache key of tensor ``info`` of ``file``."""
        return (file, info.name, info.dtype, info.start, info.end)

    def _forget_stale(self, file: FileId) -> None:
        # Called with the lock held: entries of an older version of this path go.
        known = self._files.get(file.real)
        if known == file:
            return
        if known is not None:
            for k in [k for k in self._entries if k[0] == known]:
                buf = self._entries.pop(k)
                self.nbytes -= buf.numel()
                self._ptrs.discard(buf.data_ptr())
        self._files[file.real] = file

    def get(self, key: _Key) -> torch.Tensor | None:
        """The held uint8 bytes of ``key``, or None."""
        with self._lock:
            self._forget_stale(key[0])
            buf = self._entries.get(key)
            if buf is not None:
                self.hits += 1
            return buf

    def note_read(self) -> None:
        """Count one tensor read from its file (a miss)."""
        with self._lock:
            self.misses += 1

    def fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more would stay within the budget."""
        return self.nbytes + nbytes <= self.budget

    def put(self, key: _Key, buf: torch.Tensor) -> bool:
        """Keep ``buf`` (uint8, memory of its own that no one writes) as ``key``'s bytes.

        Returns:
            Whether it is held (False: over the budget, or its file changed meanwhile).
        """
        with self._lock:
            self._forget_stale(key[0])
            if key in self._entries:
                return True
            if not self.fits(buf.numel()) or self._files.get(key[0].real) != key[0]:
                return False
            self._entries[key] = buf
            self._ptrs.add(buf.data_ptr())
            self.nbytes += buf.numel()
            return True

    def owns(self, t: torch.Tensor) -> bool:
        """Whether ``t`` views bytes this cache holds (a result that must be copied out)."""
        if not self._ptrs:
            return False
        return t.untyped_storage().data_ptr() in self._ptrs

    def clear(self) -> None:
        """Drop everything held."""
        with self._lock:
            self._entries.clear()
            self._files.clear()
            self._ptrs.clear()
            self.nbytes = 0
