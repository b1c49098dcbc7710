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
from typing import Any, NamedTuple

import torch

from mwakit.io.header import TensorInfo

#: The share of physical memory a cache holds by default.
DEFAULT_FRACTION = 0.25


class FileId(NamedTuple):
    """A file as ``fstat`` saw it when opened: any rewrite, replace or touch changes it.

    A named tuple, not a dataclass: it is hashed and compared on every cached read.
    """

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


TensorKey = tuple[str, str, int, int]
"""(name, dtype code, start, end) of a tensor within its file."""
Held = tuple[torch.Tensor, torch.Tensor]
"""A held tensor: its bytes (uint8, for the reader's observer) and the typed, shaped view."""


def tensor_key(info: TensorInfo) -> TensorKey:
    """The key of ``info`` within its file's entries."""
    return (info.name, info.dtype, info.start, info.end)


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
        self._files: dict[str, tuple[FileId, dict[TensorKey, Held]]] = {}  # by real path
        self._ptrs: set[int] = set()  # data pointers of the held buffers (`owns`)
        #: What later stages derive from the held tensors and keep with them, by name (the
        #: executor keeps each module's QR factors here: `mwakit.lowrank.QrMemo`), counted
        #: against the same budget through `charge`.
        self.derived: dict[str, Any] = {}

    def __len__(self) -> int:
        return sum(len(held) for _, held in self._files.values())

    def entries(self, file: FileId) -> dict[TensorKey, Held]:
        """The tensors held of this version of the file (a reader looks them up once per
        file it opens); entries of an older version of the same path are dropped.

        The dict is the cache's own: readers only read it, `put` fills it.
        """
        with self._lock:
            known = self._files.get(file.real)
            if known is not None and known[0] == file:
                return known[1]
            if known is not None:
                for raw, _ in known[1].values():
                    self.nbytes -= raw.numel()
                    self._ptrs.discard(raw.data_ptr())
            held: dict[TensorKey, Held] = {}
            self._files[file.real] = (file, held)
            return held

    def items(self) -> list[tuple[FileId, TensorKey, torch.Tensor]]:
        """Every held tensor: (file, key, its bytes)."""
        with self._lock:
            return [(f, k, raw) for f, held in self._files.values() for k, (raw, _) in held.items()]

    def hit(self) -> None:
        """Count one tensor handed out from memory."""
        self.hits += 1  # only the reader's own thread hands tensors out

    def note_read(self) -> None:
        """Count one tensor read from its file (a miss)."""
        with self._lock:
            self.misses += 1

    def fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more would stay within the budget."""
        return self.nbytes + nbytes <= self.budget

    def charge(self, nbytes: int) -> bool:
        """Count ``nbytes`` of `derived` memory against the budget (negative: give it back).

        Returns:
            Whether it was counted (False: it would not fit; keep nothing then).
        """
        with self._lock:
            if nbytes > 0 and not self.fits(nbytes):
                return False
            self.nbytes += nbytes
            return True

    def put(self, file: FileId, info: TensorInfo, raw: torch.Tensor, typed: torch.Tensor) -> bool:
        """Keep ``raw`` (uint8, memory of its own that no one writes) as ``info``'s bytes in
        ``file``, and ``typed`` (its typed, shaped view) to hand out.

        Returns:
            Whether it is held (False: over the budget, or its file changed meanwhile).
        """
        with self._lock:
            known = self._files.get(file.real)
            if known is None or known[0] != file:
                return False
            key = tensor_key(info)
            if key in known[1]:
                return True
            if not self.fits(raw.numel()):
                return False
            known[1][key] = (raw, typed)
            self._ptrs.add(raw.data_ptr())
            self.nbytes += raw.numel()
            return True

    def owns(self, t: torch.Tensor) -> bool:
        """Whether ``t`` views bytes this cache holds (a result that must be copied out)."""
        if not self._ptrs:
            return False
        return t.untyped_storage().data_ptr() in self._ptrs

    def clear(self) -> None:
        """Drop everything held."""
        with self._lock:
            self._files.clear()
            self._ptrs.clear()
            self.derived.clear()
            self.nbytes = 0
