"""sha256 of input files from the bytes a merge already reads: one read per file, not two.

The model card names every input file by its sha256. Hashing by a second pass costs a second
read of gigabytes (and, with the page cache cold, a second trip to the disk); `StreamHasher`
instead watches the reader (`PreadReader(observer=...)`) and feeds each file's running digest
with the tensor bytes as they arrive.

Hashing runs on helper threads (hashlib releases the GIL), so it overlaps the merge instead
of lengthening it: the reader hands over the buffer it read into, and the buffer is not reused
until it is hashed (at most `MAX_PENDING` bytes wait; a reader that gets ahead of the hashing
waits for it). Two threads by default: each file's reads are hashed in order by one thread at
a time, different files at once, since one core's sha256 (~1.3 GB/s on the benchmark box) is
slower than a factor average streams its inputs.

A digest must be sha256 of the whole file, in file order, while a merge reads tensor ranges in
plan order, skipping headers and tensors it does not need. So each file keeps the position up
to which it is hashed: a read that continues it is hashed as is; a read past it first hashes the
gap (the header, a skipped tensor) from the file; a read of bytes already hashed is ignored.
`finish` hashes what was never read. The digest is therefore identical to ``sha256sum`` of the
file whatever the read order — at worst (reads in reverse order) the file is read twice, as
before. A file that changes between its first and last byte hashed is a `SourceError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mwakit.errors import SourceError
from mwakit.io.files import CHANGED_FIX
from mwakit.threads import usable_cpus

_CHUNK = 1 << 20
#: Bytes handed over but not hashed yet, at most (beyond it `StreamHasher.observe` waits).
MAX_PENDING = 256 << 20


@dataclass
class _Running:
    path: Path
    h: Any = field(default_factory=hashlib.sha256)
    pos: int = 0
    stat: tuple[int, int, int] | None = None  # (size, mtime_ns, inode) when first touched
    digest: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    busy: bool = False  # a helper thread is hashing a read of it (reads go in order)


class StreamHasher:
    """Running sha256 of some files, fed by a reader's reads, hashed on a helper thread.

    Args:
        paths: The files to fingerprint. Reads of other files are ignored. A file is matched
            by the path the reader is given or by its real path.
        max_pending: Bytes handed over and not hashed yet beyond which ``observe`` waits.
        threads: Helper threads hashing (each file's reads in order, different files at once);
            default: 2, or 1 where only one CPU is usable. sha256 runs at ~1.3 GB/s on a core
            of the benchmark box, slower than a factor average reads, so one thread alone
            would set the pace of such a merge.
    """

    def __init__(
        self, paths: Iterable[Path], *, max_pending: int = MAX_PENDING, threads: int | None = None
    ) -> None:
        self._files: dict[Path, _Running] = {}
        self._alias: dict[Path, _Running | None] = {}
        self._alias_lock = threading.Lock()
        for p in paths:
            run = _Running(Path(p))
            self._files[Path(p)] = run
            self._alias[Path(os.path.realpath(p))] = run
        self._max_pending = max_pending
        self._queue: deque[tuple[_Running, int, Any, int]] = deque()
        self._pending = 0
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._count = threads if threads is not None else min(2, len(usable_cpus()))
        self._error: BaseException | None = None
        self._stop = False

    @property
    def paths(self) -> list[Path]:
        """The files being fingerprinted."""
        return list(self._files)

    def _lookup(self, path: Path) -> _Running | None:
        run = self._files.get(path)
        if run is not None:
            return run
        with self._alias_lock:
            if path not in self._alias:
                self._alias[path] = self._alias.get(Path(os.path.realpath(path)))
            return self._alias[path]

    def observe(self, path: Path, offset: int, data: Any) -> None:
        """Hand over ``data``, the bytes just read from ``path`` at ``offset``.

        ``data`` is kept (not copied) until it is hashed: a buffer object, or a uint8 tensor
        (anything with ``.numpy()``), which the caller must not overwrite meanwhile (the
        reader's arena reuses a buffer only once nothing references it). Thread-safe.
        """
        run = self._lookup(path)
        if run is None or not self._files:
            return
        n = data.numel() if hasattr(data, "numel") else memoryview(data).nbytes
        if n < _CHUNK and hasattr(data, "numpy"):
            data = data.numpy().tobytes()  # a small read: a copy is cheaper than holding it
        if run.stat is None:
            # The version being read is the one to hash: a later change is then caught.
            with self._alias_lock, contextlib.suppress(OSError):
                st = os.stat(run.path)
                run.stat = run.stat or (st.st_size, st.st_mtime_ns, st.st_ino)
        with self._cond:
            while self._pending and self._pending + n > self._max_pending and not self._stop:
                self._cond.wait()
            if self._stop:
                return
            self._queue.append((run, offset, data, n))
            self._pending += n
            if not self._threads:
                for _ in range(max(1, self._count)):
                    t = threading.Thread(target=self._work, name="mwakit-hash", daemon=True)
                    t.start()
                    self._threads.append(t)
            self._cond.notify_all()

    def _next(self) -> tuple[_Running, int, Any, int] | None:
        """The oldest read of a file no other thread is hashing (under the condition)."""
        for i, item in enumerate(self._queue):
            if not item[0].busy:
                del self._queue[i]
                item[0].busy = True
                return item
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                while (item := self._next()) is None and (self._queue or not self._stop):
                    self._cond.wait()
                if item is None:
                    return
            run, offset, data, n = item
            try:
                if self._error is None:
                    view = memoryview(data.numpy()) if hasattr(data, "numpy") else data
                    self._feed(run, offset, memoryview(view).cast("B"))
            except BaseException as err:  # reported by finish
                self._error = err
            finally:
                del data, item
                with self._cond:
                    run.busy = False
                    self._pending -= n
                    self._cond.notify_all()

    def _feed(self, run: _Running, offset: int, data: memoryview) -> None:
        end = offset + len(data)
        with run.lock:
            if run.digest is not None or end <= run.pos:
                return  # finished, or bytes already hashed (a second read of a tensor)
            if offset > run.pos:
                self._hash_range(run, offset)
            run.h.update(data[run.pos - offset :])
            run.pos = end

    def close(self) -> None:
        """Stop the helper thread and drop what was not hashed (after a failed merge)."""
        with self._cond:
            self._stop = True
            self._queue.clear()
            self._cond.notify_all()
        for t in self._threads:
            t.join()
        self._threads = []

    def _stat(self, run: _Running, fd: int) -> tuple[int, int, int]:
        st = os.fstat(fd)
        now = (st.st_size, st.st_mtime_ns, st.st_ino)
        if run.stat is None:
            run.stat = now
        elif now != run.stat:
            raise SourceError(
                "file changed while being read (size or mtime differ)",
                where=str(run.path),
                fix=CHANGED_FIX,
            )
        return now

    def _hash_range(self, run: _Running, stop: int | None) -> None:
        """Hash the file from ``run.pos`` to ``stop`` (None: to its end), reading it."""
        try:
            fd = os.open(run.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as err:
            raise SourceError(
                f"cannot open file: {err.strerror or err}",
                where=str(run.path),
                fix="check that the file exists and is readable",
            ) from err
        try:
            size = self._stat(run, fd)[0]
            stop = size if stop is None else stop
            buf = bytearray(min(_CHUNK, max(stop - run.pos, 0)) or 1)
            view = memoryview(buf)
            while run.pos < stop:
                n = os.preadv(fd, [view[: min(len(buf), stop - run.pos)]], run.pos)
                if n == 0:
                    raise SourceError(
                        f"file ended at byte {run.pos}, before byte {stop}",
                        where=str(run.path),
                        fix=CHANGED_FIX,
                    )
                run.h.update(view[:n])
                run.pos += n
            self._stat(run, fd)
        except OSError as err:
            raise SourceError(
                f"cannot read file: {err.strerror or err}",
                where=str(run.path),
                fix="check the disk and the file, then run again",
            ) from err
        finally:
            os.close(fd)

    def finish(self) -> dict[Path, str]:
        """Wait for the hashing, hash what no read covered, and return every file's sha256
        (hex), by given path.

        Raises:
            SourceError: A file cannot be read, or changed since its first bytes were hashed.
        """
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()
        self._threads = []
        if self._error is not None:
            raise self._error
        out: dict[Path, str] = {}
        for path, run in self._files.items():
            with run.lock:
                if run.digest is None:
                    self._hash_range(run, None)
                    run.digest = run.h.hexdigest()
                out[path] = run.digest
        return out
