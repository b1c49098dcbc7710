"""Sharded output for full models: ``model-0000i-of-0000N.safetensors`` + the index file.

Shards are cut in plan order (input-file order) so each is filled and finished in turn; every
shard's layout is fixed up front, so tensors stream to their final offsets as they are made.
One shard is written as plain ``model.safetensors`` (the Hugging Face convention).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import torch

from mwakit.io.arena import Arena
from mwakit.io.durable import BackgroundSync
from mwakit.io.header import DTYPE_SIZES
from mwakit.io.oserror import output_error
from mwakit.io.writer import Entry, StreamingWriter

INDEX = "model.safetensors.index.json"


def split_shards(entries: Sequence[Entry], shard_size: int) -> list[list[Entry]]:
    """Cut entries, in order, into shards of at most ``shard_size`` bytes (a bigger tensor
    gets a shard of its own)."""
    shards: list[list[Entry]] = []
    size = 0
    for e in entries:
        n = math.prod(e[2]) * DTYPE_SIZES[e[1]]
        if not shards or (size + n > shard_size and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def shard_names(n: int) -> list[str]:
    """The file names of ``n`` shards (one shard is plain ``model.safetensors``)."""
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_index(folder: Path, names: Sequence[str], shards: Sequence[Sequence[Entry]]) -> None:
    """Write ``model.safetensors.index.json`` for these shards (nothing for a single file).

    Raises:
        OutputError: The file cannot be written.
    """
    if len(names) < 2:
        return
    weight_map = {e[0]: name for name, shard in zip(names, shards, strict=True) for e in shard}
    total = sum(math.prod(e[2]) * DTYPE_SIZES[e[1]] for shard in shards for e in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    try:
        (folder / INDEX).write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
    except OSError as err:
        raise output_error(err, "cannot write the shard index", str(folder)) from err


class ShardedWriter:
    """Writes a full model's tensors into shards plus ``model.safetensors.index.json``."""

    def __init__(
        self,
        folder: Path,
        entries: Sequence[Entry],
        shard_size: int,
        metadata: dict[str, str] | None = None,
        syncer: BackgroundSync | None = None,
    ) -> None:
        shards = split_shards(entries, shard_size)
        self.folder = folder
        self._shards = shards
        self.names = shard_names(len(shards))
        arena = Arena()  # one for every shard: the next shard reuses the last one's buffers
        self._writers = [
            StreamingWriter(folder / name, shard, metadata, syncer, arena=arena)
            for name, shard in zip(self.names, shards, strict=True)
        ]
        self._route = {
            e[0]: w for w, shard in zip(self._writers, shards, strict=True) for e in shard
        }

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for w in self._writers:
            w.__exit__(exc_type, exc, tb)
        if exc_type is None:
            write_index(self.folder, self.names, self._shards)

    def buffer(self, name: str) -> torch.Tensor:
        """Memory for the planned tensor ``name`` that its shard writes without a copy
        (`StreamingWriter.buffer`)."""
        return self._route[name].buffer(name)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor into its shard; a shard's last tensor finishes (closes) the shard,
        so its fsync can start while the next shards are merged."""
        w = self._route[name]
        w.write(name, tensor)
        if w.complete:
            w.close()
