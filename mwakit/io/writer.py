"""Streaming safetensors writer: the header is written first, each tensor at its final offset.

The plan knows every output name, dtype and shape, so the whole layout is fixed up front (the
official writer's order: alignment descending, then name) and tensors can be written in any
order as soon as they are ready — the executor writes in input-file order — without holding
more than the tensor being written.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import torch

from mwakit.errors import OutputError
from mwakit.io.header import DTYPE_NAMES, DTYPE_SIZES

Entry = tuple[str, str, tuple[int, ...]]


def _order(entries: Sequence[Entry]) -> list[Entry]:
    # The official writer's order: alignment descending, then name, so no tensor is misaligned.
    return sorted(entries, key=lambda e: (-DTYPE_SIZES[e[1]], e[0]))


def _header_bytes(
    entries: Sequence[Entry], metadata: dict[str, str] | None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    doc: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, code, shape in _order(entries):
        if name in offsets:
            raise OutputError(f"tensor {name!r} is planned twice", where="output")
        n = math.prod(shape) * DTYPE_SIZES[code]
        offsets[name] = (pos, pos + n)
        doc[name] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, offsets


def planned_size(entries: Sequence[Entry], metadata: dict[str, str] | None = None) -> int:
    """The size in bytes of the file `StreamingWriter` will write."""
    head, offsets = _header_bytes(entries, metadata)
    return len(head) + max((e for _, e in offsets.values()), default=0)


class StreamingWriter:
    """Writes one safetensors file whose layout is fixed at construction.

    Args:
        path: The file to create.
        entries: (name, dtype code, shape) of every tensor the file will hold.
        metadata: ``__metadata__`` strings; ``format: pt`` is always included.
    """

    def __init__(
        self, path: Path, entries: Sequence[Entry], metadata: dict[str, str] | None = None
    ) -> None:
        self.path = path
        self._specs = {name: (code, tuple(shape)) for name, code, shape in entries}
        head, self._offsets = _header_bytes(entries, metadata)
        self._data_start = len(head)
        self._written: set[str] = set()
        total = self._data_start + max((e for _, e in self._offsets.values()), default=0)
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(self._fd, head, 0)
            os.ftruncate(self._fd, total)
        except OSError as err:
            raise OutputError(f"cannot write: {err.strerror}", where=str(path)) from err

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            os.close(self._fd)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor at its planned offset.

        Raises:
            OutputError: The name is not planned, was written already, or dtype/shape differ.
        """
        if name not in self._specs:
            raise OutputError(f"tensor {name!r} is not in the planned layout", where=str(self.path))
        if name in self._written:
            raise OutputError(f"tensor {name!r} written twice", where=str(self.path))
        code, shape = self._specs[name]
        if tensor.dtype != getattr(torch, DTYPE_NAMES[code]) or tuple(tensor.shape) != shape:
            raise OutputError(
                f"tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, planned "
                f"{DTYPE_NAMES[code]} {list(shape)}",
                where=str(self.path),
            )
        t = tensor.detach().to("cpu").contiguous()
        start, end = self._offsets[name]
        pos = self._data_start + start
        # View the bytes as uint8 (bf16 has no numpy dtype) and write them straight out.
        raw: bytes | memoryview = t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b""
        mv = memoryview(raw)
        while mv:
            n = os.pwrite(self._fd, mv, pos)
            mv, pos = mv[n:], pos + n
        if pos != self._data_start + end:
            raise OutputError(f"short write for {name!r}", where=str(self.path))
        self._written.add(name)

    def close(self) -> None:
        """Finish the file.

        Raises:
            OutputError: Some planned tensors were never written.
        """
        os.close(self._fd)
        missing = sorted(set(self._specs) - self._written)
        if missing:
            raise OutputError(
                f"{len(missing)} planned tensor(s) never written, e.g. {missing[0]}",
                where=str(self.path),
            )
