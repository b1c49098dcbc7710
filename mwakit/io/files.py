"""Reading byte ranges of input files, checked: the torch-free core of every tensor reader.

Bytes are read with ``preadv`` into memory the caller owns, never mapped: a mapped file that
shrinks under a reader kills the process with SIGBUS, a short read is just an error. Each file
is opened once, and its size and mtime are remembered: a read that comes back short, or a file
whose size or mtime changed since it was opened, is a `SourceError` naming the file.

`mwakit.io.reader.PreadReader` (torch tensors, arena, read-ahead, cache) builds on it, and so
does the NumPy executor of factor averages (`mwakit.executors.factors`), which must not import
torch.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mwakit.errors import SourceError

if TYPE_CHECKING:
    from types import TracebackType

    from typing_extensions import Self

    from mwakit.io.cache import FileId, Held, TensorKey

__all__ = ["CHANGED_FIX", "InputFiles", "OpenFile"]

CHANGED_FIX = "the file changed while mwakit was reading it; wait until it is complete, run again"


@dataclass
class OpenFile:
    """One open input file, as it was when opened."""

    fd: int
    size: int
    mtime_ns: int
    ino: int
    ident: FileId | None = None  # only with a cache
    held: dict[TensorKey, Held] | None = None  # the cache's entries of this file version


class InputFiles:
    """Input files opened once each, and checked byte-range reads of them.

    Thread-safe: a read-ahead thread may open and read as the owner does. ``close`` closes
    every file.
    """

    def __init__(self) -> None:
        self._files: dict[Path, OpenFile] = {}
        self._lock = threading.Lock()  # the open files (and a subclass's own state)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _opened(self, path: Path, st: os.stat_result, f: OpenFile) -> None:
        """Called once per file, under the lock, right after it is opened (a hook)."""

    def open(self, path: Path) -> OpenFile:
        """The open file ``path`` (opened now on first use).

        Raises:
            SourceError: It cannot be opened, or is not a regular file.
        """
        f = self._files.get(path)  # a dict read is atomic: no lock on the path taken per tensor
        if f is not None:
            return f
        with self._lock:
            f = self._files.get(path)
            if f is not None:
                return f
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as err:
                raise SourceError(
                    f"cannot open file: {err.strerror or err}",
                    where=str(path),
                    fix="check that the file exists and is readable",
                ) from err
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise SourceError("not a regular file", where=str(path), fix="point at the file")
            f = OpenFile(fd, st.st_size, st.st_mtime_ns, st.st_ino)
            self._opened(path, st, f)
            self._files[path] = f
            return f

    def changed(self, path: Path, what: str) -> SourceError:
        """The error for a file that changed while being read (``what`` says how)."""
        return SourceError(what, where=str(path), fix=CHANGED_FIX)

    def check_range(self, path: Path, name: str, end: int) -> None:
        """Fail unless the file still reaches byte ``end`` (where tensor ``name`` ends).

        Raises:
            SourceError: The file is shorter than its header said.
        """
        f = self.open(path)
        if end > f.size:
            raise self.changed(
                path,
                f"tensor {name!r} ends at byte {end}, past the end of the file ({f.size} bytes)",
            )

    def read_into(self, path: Path, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the bytes of ``path`` at ``offset``: the one place bytes are read.

        Raises:
            SourceError: The read fails, comes back short (the file shrank), or the file's size
                or mtime changed since it was first opened.
        """
        f = self.open(path)
        want = len(out)
        pos, done = offset, 0
        try:
            while done < want:
                n = os.preadv(f.fd, [out[done:]], pos)
                if n == 0:
                    raise self.changed(
                        path,
                        f"file ended at byte {pos}, {want - done} bytes short of the tensor at "
                        f"{offset} (it shrank while being read)",
                    )
                done += n
                pos += n
            st = os.fstat(f.fd)
        except OSError as err:
            raise SourceError(
                f"cannot read file: {err.strerror or err}",
                where=str(path),
                fix="check the disk and the file, then run again",
            ) from err
        if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
            raise self.changed(path, "file changed while being read (size or mtime differ)")

    def advise(self, path: Path, start: int, end: int) -> None:
        """Ask the kernel to read ``[start, end)`` of ``path`` into the page cache now.

        A hint only: never fails (the read itself reports a missing or unreadable file).
        """
        if not hasattr(os, "posix_fadvise") or end <= start:
            return
        with contextlib.suppress(OSError, SourceError):
            os.posix_fadvise(self.open(path).fd, start, end - start, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        """Close every file; calling it again does nothing."""
        with self._lock:
            files, self._files = self._files, {}
            for f in files.values():
                os.close(f.fd)
