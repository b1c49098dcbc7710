"""safetensors headers: read the JSON header of a file without touching tensor bytes. No torch.

Layout: ``<u64 LE N><N-byte JSON header><data>``; each entry holds dtype, shape and
``data_offsets`` relative to the data start. The planner needs only this, so `mwakit plan`
reads a few kilobytes per checkpoint whatever the checkpoint's size.

The checks are the ones the official loader makes (offsets fit shape × dtype size, tensors tile
the data section with no hole or overlap, metadata values are strings), so a file that passes
here is one ``safe_open`` accepts, and a bad file fails at plan time, before any merge work.

Inside `remembered_headers` (tune plans every candidate over the same checkpoints) a header is
parsed once and handed out again while ``stat`` says the file is unchanged.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mwakit.errors import SourceError

MAX_HEADER = 100_000_000  # the format's own limit (safetensors MAX_HEADER_SIZE)

DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
DTYPE_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip
_CODES = {name: code for code, name in DTYPE_NAMES.items()}
_FLOATS = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def dtype_code(name: str) -> str:
    """The safetensors code for a torch dtype name.

    Args:
        name: A torch dtype name, with or without the ``torch.`` prefix (``str(torch.bfloat16)``
            works as well as ``"bfloat16"``).

    Returns:
        The code, e.g. ``"BF16"``.

    Raises:
        KeyError: The dtype has no safetensors code (complex dtypes, for instance).
    """
    return _CODES[name.removeprefix("torch.")]


def is_float_code(code: str) -> bool:
    """True for floating-point dtypes (the ones that are averaged, not copied)."""
    return code in _FLOATS


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry, with absolute byte offsets in its file.

    Attributes:
        name: The tensor's key.
        dtype: The safetensors dtype code (``"F32"``, ``"BF16"``, ...).
        shape: The tensor's shape (``()`` for a scalar).
        start: Absolute offset of the first data byte in the file.
        end: Absolute offset one past the last data byte.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.start

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class FileHeader:
    """A parsed safetensors header.

    Attributes:
        path: The file it was read from.
        tensors: Every tensor, in file offset order (the order that streams best).
        metadata: The ``__metadata__`` strings, or None when the file has none.
        data_start: Absolute offset of the data section (8 + header length).
    """

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    data_start: int


def _bad(path: Path, what: str) -> SourceError:
    return SourceError(
        f"not a valid safetensors file: {what}",
        where=str(path),
        fix="the file is truncated or corrupt; restore it from training or re-download it",
    )


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys silently; the format forbids duplicates and
    # a duplicate name would make two planned inputs indistinguishable.
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise _DuplicateKey(f"header names {key!r} twice")
        doc[key] = value
    return doc


def _is_count(x: object) -> bool:
    # JSON true/false parse as bool, a subclass of int; they are not sizes or offsets.
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry(path: Path, name: str, e: object, data_start: int) -> TensorInfo:
    if not isinstance(e, dict):
        raise _bad(path, f"entry {name!r} is not an object")
    dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise _bad(path, f"entry {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _bad(path, f"entry {name!r} has invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise _bad(path, f"entry {name!r} has invalid data_offsets {offsets!r}")
    b, e_ = offsets
    if e_ - b != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise _bad(
            path, f"entry {name!r}: data_offsets [{b}, {e_}] do not fit {dtype} {list(shape)}"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + b, data_start + e_)


HeaderMemo = dict[str, tuple[tuple[int, ...], "FileHeader"]]
"""Path → (the file's stat identity, its parsed header): `remembered_headers`' store."""

_MEMO: ContextVar[HeaderMemo | None] = ContextVar("mwakit_header_memo", default=None)


@contextmanager
def remembered_headers(memo: HeaderMemo) -> Iterator[None]:
    """Within the block, `read_header` parses each file once while it is unchanged.

    A file is unchanged while its device, inode, size, mtime and ctime are: a rewrite, a
    replace or a touch parses it again. Planning a candidate of 20 real adapters spent half
    its time parsing the same headers (35 of 70 ms).

    Args:
        memo: The store, kept by the caller across blocks (a scorer's, for its candidates).
    """
    token = _MEMO.set(memo)
    try:
        yield
    finally:
        _MEMO.reset(token)


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_header(path: Path) -> FileHeader:
    """Read and check a safetensors header; never reads tensor bytes.

    Inside `remembered_headers`, an unchanged file's header is the one parsed before.

    Args:
        path: The ``.safetensors`` file.

    Returns:
        The parsed header, tensors in file offset order.

    Raises:
        SourceError: The file is missing or unreadable, too short, its header is not valid
            JSON, an entry is malformed, or the data section does not match the entries
            (truncated file, holes, overlaps, trailing bytes).
    """
    memo = _MEMO.get()
    if memo is None:
        return _parse(path)
    try:
        ident = _identity(path.stat())
    except OSError:
        return _parse(path)  # which says what is wrong with the path
    hit = memo.get(str(path))
    if hit is not None and hit[0] == ident:
        return hit[1]
    header = _parse(path)
    # Stat taken before the parse: a file changing in between is parsed again next time.
    memo[str(path)] = (ident, header)
    return header


def _parse(path: Path) -> FileHeader:
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"only {len(head)} bytes long")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise _bad(path, f"header length {n} does not fit the file ({size} bytes)")
            raw = f.read(n)
    except OSError as err:
        raise SourceError(
            f"cannot read file: {err.strerror or err}",
            where=str(path),
            fix="check that the path exists and is readable",
        ) from err
    try:
        doc = json.loads(raw, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as err:
        raise _bad(path, str(err)) from err
    except (ValueError, RecursionError) as err:
        # JSONDecodeError and UnicodeDecodeError are ValueErrors; absurd nesting recurses.
        raise _bad(path, f"header is not JSON ({err})") from err
    if not isinstance(doc, dict):
        raise _bad(path, "header is not a JSON object")
    data_start = 8 + n
    meta = doc.pop("__metadata__", None)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise _bad(path, "__metadata__ is not an object of strings")
    entries = sorted(
        (_entry(path, name, e, data_start) for name, e in doc.items()),
        key=lambda t: (t.start, t.end),
    )
    # Tensors must tile the data section exactly, as the official loader requires: a gap or
    # overlap means a corrupt header, and a short file means a truncated download.
    pos = data_start
    for t in entries:
        if t.start != pos:
            at, want = t.start - data_start, pos - data_start
            raise _bad(path, f"entry {t.name!r} starts at data offset {at}, expected {want}")
        pos = t.end
    if pos > size:
        last = entries[-1].name
        what = f"truncated: {last!r} ends past the end of the file ({size} of {pos} bytes)"
        raise _bad(path, what)
    if pos < size:
        raise _bad(path, f"{size - pos} trailing bytes after the last tensor")
    return FileHeader(
        path=path,
        tensors={t.name: t for t in entries},
        metadata=meta,
        data_start=data_start,
    )
