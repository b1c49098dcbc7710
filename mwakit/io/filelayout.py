"""The byte layout of a safetensors file mwakit writes: tensor order, header and offsets.

Fixed from the planned entries alone, before any tensor is made, so every writer (the torch
one, `mwakit.io.writer`, and the NumPy one of `mwakit.executors.factors`) puts the same bytes
at the same offsets, and they equal `safetensors.torch.save_file`'s.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence

from mwakit.errors import OutputError
from mwakit.io.header import DTYPE_SIZES

__all__ = ["Entry", "header_bytes", "planned_size"]

Entry = tuple[str, str, tuple[int, ...]]
"""One planned tensor: (name, safetensors dtype code, shape)."""


# The official writer sorts by its Dtype enum, descending, then by name. The enum lists dtypes
# by size, so this is alignment descending; following its exact rank within a size (U64 before
# I64 before F64) makes our files byte-identical to `safetensors.torch.save_file`'s.
_OFFICIAL_ORDER = (
    "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16",
    "I32", "U32", "F32", "F64", "I64", "U64",
)  # fmt: skip
_RANK = {code: i for i, code in enumerate(_OFFICIAL_ORDER)}


def _order(entries: Sequence[Entry]) -> list[Entry]:
    # With the header padded to 8 bytes, alignment-descending order starts every tensor
    # aligned for its dtype, so readers get zero-copy views.
    return sorted(entries, key=lambda e: (-_RANK[e[1]], e[0]))


def _check_entries(entries: Sequence[Entry], metadata: dict[str, str] | None) -> None:
    # A bad entry is a bug in the caller's plan, but it must still fail as one clear
    # OutputError before the file is created, not as a KeyError halfway through.
    seen: set[str] = set()
    for name, code, shape in entries:
        if name in seen:
            raise OutputError(f"tensor {name!r} is planned twice", where="output")
        seen.add(name)
        if name == "__metadata__":
            raise OutputError("a tensor cannot be named '__metadata__'", where="output")
        if code not in DTYPE_SIZES:
            raise OutputError(f"tensor {name!r} has unknown dtype code {code!r}", where="output")
        if any(not isinstance(d, int) or d < 0 for d in shape):
            raise OutputError(f"tensor {name!r} has invalid shape {list(shape)}", where="output")
    if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        # safetensors loaders reject non-string metadata values outright.
        raise OutputError("metadata keys and values must be strings", where="output")


def header_bytes(
    entries: Sequence[Entry], metadata: dict[str, str] | None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The file's first bytes (length prefix, JSON header, padding) and each tensor's data
    offsets, relative to the end of the header.

    Raises:
        OutputError: An entry is invalid (duplicate name, unknown dtype, negative dimension),
            or the metadata is not all strings.
    """
    _check_entries(entries, metadata)
    doc: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, code, shape in _order(entries):
        n = math.prod(shape) * DTYPE_SIZES[code]
        offsets[name] = (pos, pos + n)
        doc[name] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, offsets


def planned_size(entries: Sequence[Entry], metadata: dict[str, str] | None = None) -> int:
    """The size in bytes of the file `StreamingWriter` will write for these entries.

    Args:
        entries: (name, dtype code, shape) of every tensor.
        metadata: The metadata that will be passed to the writer (it changes the header size).

    Returns:
        Header plus data size, exactly the final file size.

    Raises:
        OutputError: An entry is invalid (duplicate name, unknown dtype, negative dimension).
    """
    head, offsets = header_bytes(entries, metadata)
    return len(head) + max((e for _, e in offsets.values()), default=0)
