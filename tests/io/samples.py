"""Sample tensors shared by the io tests: every safetensors dtype, every bit pattern."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

ALL_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.float8_e4m3fn, torch.float8_e5m2,
    torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint64, torch.uint32, torch.uint16, torch.uint8, torch.bool,
]  # fmt: skip


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bytes reinterpreted as ``dtype``: every bit pattern (NaN payloads too)."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw %= 2
    return raw.view(dtype).reshape(shape)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, for bit-exact comparisons (NaN != NaN otherwise)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def one_of_each(shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """One random tensor of ``shape`` per dtype, named ``w.<dtype>``."""
    return {
        f"w.{str(d).split('.')[1]}": random_tensor(d, shape, i) for i, d in enumerate(ALL_DTYPES)
    }


@contextmanager
def counting_reads() -> Iterator[list[tuple[Path, int]]]:
    """Every (file, offset) read from disk while the block runs (`InputFiles.read_into`, the
    one place bytes are read: `PreadReader`'s and the NumPy executor's)."""
    from mwakit.io.files import InputFiles

    reads: list[tuple[Path, int]] = []
    orig = InputFiles.read_into

    def counting(self: InputFiles, p: Path, offset: int, out: memoryview) -> None:
        reads.append((p, offset))
        orig(self, p, offset, out)

    InputFiles.read_into = counting  # type: ignore[method-assign]
    try:
        yield reads
    finally:
        InputFiles.read_into = orig  # type: ignore[method-assign]
