"""Tensor reads that fail with an error, never with a signal.

Tensors are read with ``preadv`` straight into memory the reader allocates, instead of being
mapped: a mapped file that shrinks under the reader kills the process with SIGBUS, a short read
is just an error. Every byte goes through one method, `PreadReader.read_into`, and every tensor
read is shown to the reader's observer, so a caller can hash exactly the bytes a merge streams.

Large reads land in a small arena of reusable buffers (`mwakit.io.arena`): fresh memory costs
a page fault per page on first touch, more than the copy from the page cache itself, so buffers
of finished groups are recycled — a buffer is reused only when no tensor views it any more,
never while a caller still holds a tensor of it. ``prefetch`` reads the
next group on a helper thread while the current group computes (``preadv`` releases the GIL),
so the copy costs no wall time; a group too big for the read-ahead budget only gets the kernel
hint (``posix_fadvise WILLNEED``).

An input that changes under the reader (size or mtime differ from when it was first opened, or
a read comes back short) is a `SourceError` naming the file.

With an `mwakit.io.cache.InputCache`, a tensor read once is kept (in memory of its own, not the
arena's) and later readers of the same file hand it out again without reading.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from mwakit.errors import SourceError
from mwakit.io.arena import Arena
from mwakit.io.cache import FileId, Held, InputCache, TensorKey, tensor_key
from mwakit.io.files import InputFiles, OpenFile
from mwakit.io.header import DTYPE_NAMES, TensorInfo

_READAHEAD = 256 << 20  # read one group ahead into memory when it is at most this big

Observer = Callable[[Path, int, torch.Tensor], None]
"""Called with (file, offset, the uint8 buffer read) after every tensor read (`PreadReader`)."""


class PreadReader(InputFiles):
    """Reads tensors of safetensors files into memory it owns, one open descriptor per file.

    Use it as a context manager; ``close`` closes every file. Tensors it returns are the
    caller's: they stay valid after ``release`` and ``close``. One thread owns a reader (its
    read-ahead runs on a helper thread of its own).

    Args:
        readahead: Bytes ``prefetch`` may read ahead on the helper thread (into memory, so the
            next group's copy from the page cache overlaps this group's compute); a larger
            request only gets the kernel hint. 0 turns reading ahead off.
        observer: Sees every tensor read, right after the read, as (file, offset, uint8
            buffer) (e.g. `mwakit.io.hashing.StreamHasher.observe`, which keeps the buffer
            until it is hashed); called from the read-ahead thread too, so it must be
            thread-safe. An error it raises fails the read.
        cache: Keeps what is read for later readers, and hands out what earlier ones kept
            (shared: callers must not write into the tensors). The observer still sees every
            tensor handed out, read or not.
    """

    def __init__(
        self,
        readahead: int = _READAHEAD,
        observer: Observer | None = None,
        cache: InputCache | None = None,
    ) -> None:
        super().__init__()  # its lock guards the arena too, shared with the read-ahead thread
        self._observer = observer
        self._cache = cache
        self._arena = Arena()
        self._readahead = readahead
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: dict[tuple[Path, int, int], Future[torch.Tensor]] = {}
        self._ahead_bytes = 0

    @property
    def cache(self) -> InputCache | None:
        """The input cache this reader keeps tensors in, if any."""
        return self._cache

    def _opened(self, path: Path, st: os.stat_result, f: OpenFile) -> None:
        if self._cache is not None:
            f.ident = FileId.of(path, st)
            f.held = self._cache.entries(f.ident)

    def _read(self, info: TensorInfo, path: Path) -> torch.Tensor:
        dtype = getattr(torch, DTYPE_NAMES[info.dtype])
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        self.check_range(path, info.name, info.end)
        f = self.open(path)
        keep = False
        cache = self._cache
        if cache is not None:
            cache.note_read()
            keep = f.ident is not None and cache.fits(info.nbytes)
        if keep:
            # Memory of its own: a kept arena buffer would be pinned, and up to twice too big.
            raw = torch.empty(info.nbytes, dtype=torch.uint8)
        else:
            with self._lock:
                raw = self._arena.take(info.nbytes)
        # bf16 and fp8 have no numpy dtype: read into the bytes, reinterpret inside torch.
        mv = raw.numpy().data
        try:
            self.read_into(path, info.start, mv)
        finally:
            mv.release()
        if self._observer is not None:
            # The observer may keep `raw` (to hash it later): the arena reuses a buffer only
            # once nothing references it.
            self._observer(path, info.start, raw)
        typed = raw.view(dtype).reshape(info.shape)
        if keep:
            assert cache is not None and f.ident is not None
            cache.put(f.ident, info, raw, typed)
        return typed

    def _cached(self, info: TensorInfo, path: Path) -> torch.Tensor | None:
        """The cache's copy of the tensor (the same tensor every time), or None."""
        held = self.open(path).held
        hit = held.get(tensor_key(info)) if held else None
        if hit is None:
            return None
        assert self._cache is not None
        self._cache.hit()
        if self._observer is not None:
            self._observer(path, info.start, hit[0])
        return hit[1]

    def get(self, info: TensorInfo, path: Path) -> torch.Tensor:
        """A tensor of ``info``'s data in ``path``, in memory of its own.

        Read now, taken from the cache, or taken from what ``prefetch`` read ahead (each
        read-ahead tensor is handed out once; a second get reads again).

        Args:
            info: The tensor's header entry, from ``read_header(path)``.
            path: The file the entry belongs to.

        Returns:
            A CPU tensor of ``info.dtype`` and ``info.shape`` (always aligned for its dtype,
            whatever the file offset). The caller may keep it as long as it likes; with a
            cache it must not write into it.

        Raises:
            SourceError: The file cannot be opened or read, is shorter than its header said,
                or changed while being read.
        """
        fut = self._ahead.pop((path, info.start, info.end), None)
        if fut is not None:
            self._ahead_bytes -= info.nbytes
            return fut.result()
        hit = self._cached(info, path) if self._cache is not None and info.numel else None
        return hit if hit is not None else self._read(info, path)

    def prefetch(self, path: Path, infos: Sequence[TensorInfo]) -> None:
        """Start reading these tensors now, while the caller computes something else.

        Within the read-ahead budget they are read on the helper thread into memory; beyond it
        the kernel is only asked to read them into the page cache (``posix_fadvise
        WILLNEED``). Never fails: errors surface at ``get``.

        Args:
            path: The file holding the tensors.
            infos: Their header entries.
        """
        if self._cache is not None:
            held = self._held(path)
            infos = [i for i in infos if tensor_key(i) not in held]
        if not infos:
            return
        want = sum(i.nbytes for i in infos)
        if self._readahead and self._ahead_bytes + want <= self._readahead:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="mwakit-read")
            for i in infos:
                key = (path, i.start, i.end)
                if key not in self._ahead:
                    self._ahead[key] = self._pool.submit(self._read, i, path)
                    self._ahead_bytes += i.nbytes
            return
        self.advise(path, min(i.start for i in infos), max(i.end for i in infos))

    def _held(self, path: Path) -> dict[TensorKey, Held]:
        try:
            held = self.open(path).held
        except SourceError:
            return {}  # reported by the read itself
        return held or {}

    def release(self, path: Path, infos: Sequence[TensorInfo]) -> None:
        """Say these tensors are done with: their buffers may be reused once no tensor views them.

        The tensors themselves stay valid (a buffer still viewed is never reused), and the
        file's pages stay in the page cache for the next run. Read-ahead of them that was never
        taken is dropped.

        Args:
            path: The file holding the tensors.
            infos: Their header entries.
        """
        if self._ahead:
            for i in infos:
                fut = self._ahead.pop((path, i.start, i.end), None)
                if fut is not None:
                    self._ahead_bytes -= i.nbytes
                    fut.cancel()
        if self._arena.holds:  # nothing to trim (every read came from the cache or malloc)
            with self._lock:
                self._arena.trim()

    def close(self) -> None:
        """Stop reading ahead and close every file; calling it again does nothing.

        Tensors read stay valid.
        """
        for fut in self._ahead.values():
            fut.cancel()
        self._ahead.clear()
        self._ahead_bytes = 0
        if self._pool is not None:
            # Wait for a read in flight: its descriptor must not be closed (and reused) under it.
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        super().close()
        with self._lock:
            self._arena.clear()


MmapReader = PreadReader
"""The former name, kept for callers written against it (the reader no longer maps files)."""


# -- legacy pickles --------------------------------------------------------------------------

_PICKLE_META = "mwakit_source_sha256"


def _private_cache() -> Path:
    """A folder only this user can read or write, for converted pickles.

    ``MWAKIT_CACHE`` (default ``$XDG_CACHE_HOME/mwakit``, else ``~/.cache/mwakit``) + ``pickle``,
    mode 0700 and owned by this user; when that cannot be had (``MWAKIT_CACHE=off``, a
    read-only home, a folder someone else owns or may write), a fresh private temporary folder
    that lasts for this process.
    """
    root = os.environ.get("MWAKIT_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mwakit"
    )
    if root != "off":
        folder = Path(root) / "pickle"
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = os.lstat(folder)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
                if stat.S_IMODE(st.st_mode) & 0o077:
                    os.chmod(folder, 0o700)
                return folder
        except OSError:
            pass
    global _FALLBACK
    if _FALLBACK is None or not _FALLBACK.is_dir():
        _FALLBACK = Path(tempfile.mkdtemp(prefix="mwakit-pickle-"))  # 0700, unguessable
    return _FALLBACK


_FALLBACK: Path | None = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _verified(out: Path, digest_file: Path, source_sha: str) -> bool:
    """The cached file is the conversion of this very source, intact."""
    from mwakit.io.header import read_header

    try:
        recorded = digest_file.read_text(encoding="ascii").strip()
        if _sha256(out) != recorded:
            return False
        meta = read_header(out).metadata or {}
    except (OSError, ValueError, SourceError):
        return False
    return meta.get(_PICKLE_META) == source_sha


def pickle_as_safetensors(path: Path) -> Path:
    """Convert a legacy ``.bin`` state dict (loaded with ``weights_only=True``) to safetensors.

    The copy lives in a private cache folder (`_private_cache`, mode 0700), named by the
    sha256 of the source's bytes, so a plan and the run after it convert once. Before use a
    cached file is verified: its own sha256 must match the digest recorded beside it, and its
    metadata must name the source's sha256 — a planted, stale or truncated file is rebuilt,
    never merged. Adapters are small; full models should not be pickles.

    Raises:
        SourceError: The file cannot be read or loaded safely.
    """
    from safetensors.torch import save_file

    try:
        source_sha = _sha256(path)
    except OSError as err:
        raise SourceError(
            f"cannot read file: {err.strerror or err}",
            where=str(path),
            fix="check that the file exists and is readable",
        ) from err
    folder = _private_cache()
    out = folder / f"{source_sha}.safetensors"
    digest_file = folder / f"{source_sha}.sha256"
    if _verified(out, digest_file, source_sha):
        return out
    sd = load_pickle_state_dict(path)
    tmp = folder / f".{source_sha}.{os.getpid()}.partial"
    try:
        save_file(
            {k: v.contiguous() for k, v in sd.items()},
            tmp,
            metadata={"format": "pt", _PICKLE_META: source_sha},
        )
        digest = _sha256(tmp)
        os.replace(tmp, out)
        dtmp = digest_file.with_suffix(f".{os.getpid()}.partial")
        dtmp.write_text(digest, encoding="ascii")
        os.replace(dtmp, digest_file)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise SourceError(
            f"cannot write the converted copy of the pickle: {err.strerror or err}",
            where=str(folder),
            fix="free space there, or set MWAKIT_CACHE to a writable folder",
        ) from err
    return out


def _pickle_reason(err: BaseException) -> str:
    # torch's message spans many lines and suggests weights_only=False or allow-listing, which
    # would run or admit whatever the file holds; keep only the sentences that say why.
    text = str(err)
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text, re.S)
    body = m.group(1) if m else text
    advice = re.compile(
        r"weights only load failed|weights_only|torch\.load|file an issue|safe_globals|allowlist"
        r"|trust",
        re.I,
    )
    for para in re.split(r"\n\s*\n", body):
        sentences = re.split(r"(?<=\.)\s+", " ".join(para.split()))
        kept = " ".join(x for x in sentences if x and not advice.search(x)).rstrip(".")
        if kept:
            return kept
    return type(err).__name__


def load_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a legacy ``.bin`` state dict with ``weights_only=True`` (no arbitrary code).

    Raises:
        SourceError: The file cannot be loaded safely (one line; the reason torch gave).
    """
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types here; the user needs one message
        raise SourceError(
            f"cannot load pickle weights safely, refused: {_pickle_reason(err)}",
            where=str(path),
            fix="re-save the adapter with save_pretrained(safe_serialization=True) from code "
            "you trust, or convert it to safetensors",
        ) from None  # torch's own text advises turning the safety off: do not chain it
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SourceError(
            "pickle file does not hold a state dict of tensors",
            where=str(path),
            fix="point at an adapter_model.bin saved by PEFT, or at a safetensors adapter",
        )
    return sd
