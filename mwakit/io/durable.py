"""fsync off the merge's critical path: output files are flushed to disk while the merge runs.

`atomic_output_dir` fsyncs every file before its final rename, so a crash leaves the complete
output or none. Done only there, the whole output's writeback (gigabytes for a full model) waits
at the end of the merge. A `BackgroundSync` instead asks the kernel to write each output file
back on a helper thread as it grows (``fdatasync`` every few tens of MiB written) and fsyncs it
as soon as it is complete, so by the rename there is (almost) nothing left to flush; the final
fsync pass then costs little. Durability before the rename is unchanged: ``join`` waits for every
flush, and an error of any of them fails the output.

Writers that bypass the page cache (``O_DIRECT``, `mwakit.io.writer`) also hand their writes to
the helper thread (`BackgroundSync.submit`): a direct write waits for the device, not the CPU, so
it runs there while the merge computes, in order with the file's final fsync.

A writer hands its descriptor to the syncer for good: the syncer closes it after its last flush,
so a descriptor is never closed (and its number reused) under a pending flush.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from mwakit.io.oserror import output_error

#: Ask for writeback after this many bytes written to a file since the last request.
KICK_BYTES = 64 << 20


class BackgroundSync:
    """Flushes output files on one helper thread; ``join`` waits and reports the first error.

    Use it as a context manager around the writing: on exit every descriptor handed to it is
    closed (after its flushes when the block succeeded).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mwakit-sync")
        self._futures: list[Future[None]] = []
        self._pending: set[int] = set()  # descriptors with a writeback request queued
        self._lock = threading.Lock()
        self._error: tuple[OSError, Path] | None = None
        self._closed = False

    def __enter__(self) -> BackgroundSync:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            if not self._closed:
                self.join()
        else:
            self._pool.shutdown(wait=True)  # close jobs still run; flush errors no longer matter

    def _run(self, fn: Callable[[int], None], fd: int, path: Path) -> None:
        try:
            fn(fd)
        except OSError as err:
            with self._lock:
                if self._error is None:
                    self._error = (err, path)

    def submit(self, fn: Callable[[int], None], fd: int, path: Path) -> Future[None]:
        """Run ``fn(fd)`` on the helper thread, after every job handed over before it.

        A writer's writes, its flushes and its close run in the order they were handed over;
        an `OSError` of ``fn`` is reported by ``join`` (the future itself never fails).
        """
        fut = self._pool.submit(self._run, fn, fd, path)
        self._futures.append(fut)
        return fut

    def kick(self, fd: int, path: Path) -> None:
        """Ask for ``fd``'s dirty pages to be written back soon (coalesced; never blocks)."""
        with self._lock:
            if fd in self._pending or self._closed:
                return
            self._pending.add(fd)

        def job(fd: int) -> None:
            with self._lock:
                self._pending.discard(fd)
            os.fdatasync(fd)

        self._futures.append(self._pool.submit(self._run, job, fd, path))

    def close(self, fd: int, path: Path, *, sync: bool = True) -> None:
        """Take ``fd`` over: fsync it (unless ``sync`` is False: a discarded file), then close.

        The descriptor must not be used by the caller afterwards.
        """

        def job(fd: int) -> None:
            try:
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)

        self._futures.append(self._pool.submit(self._run, job, fd, path))

    def join(self) -> None:
        """Wait for every flush and close handed over so far.

        Raises:
            OutputError: A flush failed (disk full, I/O error), naming the file.
        """
        futures, self._futures = self._futures, []
        for f in futures:
            f.result()
        self._closed = True
        self._pool.shutdown(wait=True)
        if self._error is not None:
            err, path = self._error
            raise output_error(err, "cannot write", str(path)) from err


def reserve(fd: int, size: int) -> None:
    """Size the file ``fd`` to ``size`` bytes and reserve its blocks where the file system
    can: the data section reads as zeros until written, and a full disk shows up now, not
    halfway through a long merge."""
    os.ftruncate(fd, size)
    if size and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as err:
            # Some file systems cannot reserve (EOPNOTSUPP, EINVAL): the sparse file still
            # works, a full disk then shows up at the write. A full disk here is reported.
            if err.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS):
                raise


ALIGN = 4096
"""Direct I/O granularity: memory address, file offset and length are multiples of this (the
largest logical block size in common use; a multiple of every smaller one)."""


def open_output(path: Path, direct: bool | None) -> tuple[int, bool]:
    """Create ``path`` for writing, bypassing the page cache where asked for and possible."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    o_direct = getattr(os, "O_DIRECT", 0)
    if direct is not False and o_direct:
        try:
            return os.open(path, flags | o_direct, 0o644), True
        except OSError as err:
            if err.errno != errno.EINVAL:  # EINVAL: this file system has no direct I/O
                raise
    return os.open(path, flags, 0o644), False


def pwrite_all(fd: int, data: memoryview, pos: int) -> None:
    """Write all of ``data`` at file offset ``pos`` of ``fd``.

    pwrite may write less than asked (Linux caps one call near 2 GiB). A file system that
    refuses a direct write after all (EINVAL on an ``O_DIRECT`` descriptor) gets it buffered:
    direct I/O is turned off on ``fd`` and the write retried.
    """
    mv, at = data, pos
    while mv:
        try:
            k = os.pwrite(fd, mv, at)
        except OSError as err:
            if err.errno != errno.EINVAL or not drop_direct(fd):
                raise
            continue
        if k <= 0:
            raise OSError(0, "no progress")
        mv, at = mv[k:], at + k


def drop_direct(fd: int) -> bool:
    """Turn direct I/O off on ``fd``; False when it was not on (the error is another one)."""
    import fcntl

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    o_direct = getattr(os, "O_DIRECT", 0)
    if not flags & o_direct:
        return False
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~o_direct)
    return True


IN_FLIGHT = 256 << 20
"""Bytes handed to a syncer's thread and not written yet, at most (then the writer waits)."""


class InFlight:
    """The writes a writer handed to a syncer's thread and that may not be done yet, bounded
    in bytes: the memory they hold is released only once they are written.

    Args:
        limit: Bytes in flight beyond which `add` waits for the oldest writes.
    """

    def __init__(self, limit: int = IN_FLIGHT) -> None:
        self._writes: deque[tuple[Future[None], int]] = deque()
        self._bytes = 0
        self._limit = limit

    def add(self, fut: Future[None], nbytes: int) -> None:
        """Count one more write of ``nbytes``; wait while more than the limit is in flight."""
        self._writes.append((fut, nbytes))
        self._bytes += nbytes
        while self._bytes > self._limit:
            done, k = self._writes.popleft()
            done.result()  # errors are the syncer's to report, at join
            self._bytes -= k

    def clear(self) -> None:
        """Forget the writes (the file is being discarded)."""
        self._writes.clear()
        self._bytes = 0
