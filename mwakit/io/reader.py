"""Lazy tensor reads: zero-copy views of mmapped safetensors files.

A view's pages fault in from the page cache only when the merge touches them. ``prefetch``
asks the kernel to read a group ahead (MADV_WILLNEED) while the current group computes, and
``release`` drops a finished group's pages from this process (MADV_DONTNEED) so resident memory
stays at a few groups. The mapping is private copy-on-write: nothing is ever written back.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import torch

from mwakit.errors import SourceError
from mwakit.io.header import DTYPE_NAMES, DTYPE_SIZES, TensorInfo

_PAGE = mmap.PAGESIZE
# Page faults map neighbouring pages too ("fault-around", 64 KiB by default), including pages
# of groups released earlier; releasing with a margin unmaps those as well. Unmapping is safe
# beyond the group: the page cache keeps the pages, a later touch just maps them again.
_RELEASE_MARGIN = 1 << 20


class MmapReader:
    """Hands out zero-copy tensor views of safetensors files, one mapping per file.

    Use it as a context manager; ``close`` unmaps every file. Not thread-safe: one executor
    thread owns a reader.
    """

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}

    def __enter__(self) -> MmapReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _map(self, path: Path) -> mmap.mmap:
        mm = self._maps.get(path)
        if mm is None:
            try:
                with path.open("rb") as f:
                    # ACCESS_COPY gives a writable (private) buffer, which torch.frombuffer
                    # wants; pages are never written, so they stay shared with the page cache.
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as err:
                raise SourceError(f"cannot map file: {err}", where=str(path)) from err
            self._maps[path] = mm
        return mm

    def get(self, info: TensorInfo, path: Path) -> torch.Tensor:
        """A tensor of ``info``'s data in ``path``.

        The tensor is a zero-copy view of the mapping (its pages fault in on first touch),
        except for empty tensors (a fresh empty tensor, as ``frombuffer`` refuses count 0) and
        misaligned data, which is copied.

        Args:
            info: The tensor's header entry, from ``read_header(path)``.
            path: The file the entry belongs to.

        Returns:
            A CPU tensor of ``info.dtype`` and ``info.shape``. Treat it as read-only: writes
            land in private pages that ``release`` may drop.

        Raises:
            SourceError: The file cannot be mapped, or is shorter than its header said (it
                changed after the header was read).
        """
        dtype = getattr(torch, DTYPE_NAMES[info.dtype])
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        mm = self._map(path)
        if info.end > len(mm):
            raise SourceError(
                f"tensor {info.name!r} ends at byte {info.end}, past the end of the file "
                f"({len(mm)} bytes)",
                where=str(path),
                fix="the file changed while mwakit was reading it; run again",
            )
        # frombuffer accepts any byte offset and would hand back a tensor whose data pointer is
        # misaligned for its dtype, which vectorised kernels do not expect. The mapping starts
        # page-aligned, so the file offset decides; files from the official writer are always
        # aligned, so the copy is for hand-made files only.
        if info.start % DTYPE_SIZES[info.dtype]:
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=info.nbytes, offset=info.start)
            return raw.clone().view(dtype).reshape(info.shape)
        t = torch.frombuffer(mm, dtype=dtype, count=info.numel, offset=info.start)
        return t.reshape(info.shape)

    def _advise(
        self, path: Path, infos: Sequence[TensorInfo], advice: int, margin: int = 0
    ) -> None:
        if not infos:
            return
        mm = self._map(path)
        start = max(0, min(i.start for i in infos) - margin) // _PAGE * _PAGE
        end = min(len(mm), -(-(max(i.end for i in infos) + margin) // _PAGE) * _PAGE)
        if end > start:
            mm.madvise(advice, start, end - start)

    def prefetch(self, path: Path, infos: Sequence[TensorInfo]) -> None:
        """Ask the kernel to start reading these tensors now (asynchronous read-ahead).

        A no-op where the platform lacks ``MADV_WILLNEED``.

        Args:
            path: The file holding the tensors.
            infos: Their header entries; the page-aligned range covering all of them is read.
        """
        if hasattr(mmap, "MADV_WILLNEED"):
            self._advise(path, infos, mmap.MADV_WILLNEED)

    def release(self, path: Path, infos: Sequence[TensorInfo]) -> None:
        """Drop these tensors' pages from this process; they stay in the page cache.

        Resident memory falls right away instead of when the kernel gets round to it. Views
        of the range stay valid: a later touch maps the pages again from the page cache. A
        no-op where the platform lacks ``MADV_DONTNEED``.

        Args:
            path: The file holding the tensors.
            infos: Their header entries; the covering range plus a margin is released.
        """
        if hasattr(mmap, "MADV_DONTNEED"):
            self._advise(path, infos, mmap.MADV_DONTNEED, _RELEASE_MARGIN)

    def close(self) -> None:
        """Let go of every mapping; each is unmapped once no view of it is left.

        Calling ``mmap.close()`` here would be a use-after-free: ``torch.frombuffer`` releases
        its buffer export at once (so ``close`` would succeed) but keeps a reference to the
        mmap object, and a view still alive would then read unmapped memory and crash the
        process. Dropping our references instead leaves the unmapping to the last view.
        """
        self._maps.clear()


def pickle_as_safetensors(path: Path) -> Path:
    """Convert a legacy ``.bin`` state dict (loaded with ``weights_only=True``) to safetensors.

    The copy lives in the system temp folder, keyed by the file's path, size and mtime, so a
    plan and the run after it convert once. Adapters are small; full models should not be
    pickles.

    Raises:
        SourceError: The file cannot be loaded safely.
    """
    import hashlib
    import tempfile

    from safetensors.torch import save_file

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    out = Path(tempfile.gettempdir()) / "mwakit-pickle" / key[:16] / "adapter_model.safetensors"
    if not out.is_file():
        sd = load_pickle_state_dict(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".partial")
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata={"format": "pt"})
        tmp.rename(out)
    return out


def load_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a legacy ``.bin`` state dict with ``weights_only=True`` (no arbitrary code).

    Raises:
        SourceError: The file cannot be loaded safely.
    """
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types here; the user needs one message
        raise SourceError(
            f"cannot load pickle weights safely: {err}",
            where=str(path),
            fix="convert the file to safetensors",
        ) from err
    if not isinstance(sd, dict):
        raise SourceError("pickle file does not hold a state dict", where=str(path))
    return sd
