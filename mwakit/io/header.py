"""safetensors headers: read the JSON header of a file without touching tensor bytes. No torch.

Layout: ``<u64 LE N><N-byte JSON header><data>``; each entry holds dtype, shape and
``data_offsets`` relative to the data start. The planner needs only this, so `mwakit plan`
reads a few kilobytes per checkpoint whatever the checkpoint's size.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from mwakit.errors import SourceError

MAX_HEADER = 100_000_000  # the format's own limit

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
_FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def dtype_code(name: str) -> str:
    """The safetensors code for a torch dtype name (``bfloat16`` → ``BF16``)."""
    return _CODES[name.removeprefix("torch.")]


def is_float_code(code: str) -> bool:
    """True for floating-point dtypes (the ones that are averaged, not copied)."""
    return code in _FLOATS


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry, with absolute byte offsets in its file."""

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
    """A parsed safetensors header."""

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


def read_header(path: Path) -> FileHeader:
    """Read and check a safetensors header; never reads tensor bytes.

    Raises:
        SourceError: The file is missing, too short, or its header is inconsistent.
    """
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
        raise SourceError(f"cannot read file: {err.strerror}", where=str(path)) from err
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _bad(path, "header is not JSON") from err
    if not isinstance(doc, dict):
        raise _bad(path, "header is not a JSON object")
    data_start = 8 + n
    meta = doc.pop("__metadata__", None)
    if meta is not None and not isinstance(meta, dict):
        raise _bad(path, "__metadata__ is not an object")
    entries: list[TensorInfo] = []
    for name, e in doc.items():
        try:
            dtype, shape, (b, e_) = e["dtype"], tuple(int(x) for x in e["shape"]), e["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise _bad(path, f"entry {name!r} lacks dtype/shape/data_offsets") from err
        if dtype not in DTYPE_SIZES:
            raise _bad(path, f"entry {name!r} has unknown dtype {dtype!r}")
        if e_ - b != math.prod(shape) * DTYPE_SIZES[dtype] or b < 0:
            raise _bad(path, f"entry {name!r}: offsets [{b}, {e_}] do not fit shape {list(shape)}")
        if data_start + e_ > size:
            raise _bad(path, f"entry {name!r} ends past the end of the file")
        entries.append(TensorInfo(name, dtype, shape, data_start + b, data_start + e_))
    entries.sort(key=lambda t: (t.start, t.end))
    return FileHeader(
        path=path,
        tensors={t.name: t for t in entries},
        metadata={str(k): str(v) for k, v in meta.items()} if meta else None,
        data_start=data_start,
    )
