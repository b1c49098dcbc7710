"""Stream a base model through an adapter into sharded safetensors, one tensor at a time.

The layout of every output shard is planned from the base's headers before a byte is read;
then each base tensor is read (pread into recycled buffers, the next one read ahead on a helper
thread), updated if the adapter touches it, written at its final offset and dropped. Resident
memory is the adapter, one base tensor and its float32 update, and the read-ahead budget —
never the base.

Tied embeddings follow PEFT: a base whose output head is tied to the input embedding stores
one tensor; a LoRA on either updates that one tensor (the tie holds), while a replaced head
(``modules_to_save: [lm_head]``) unties them: both tensors are written and ``config.json``
says ``tie_word_embeddings: false``, which is what ``merge_and_unload`` + ``save_pretrained``
give.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mwakit import __version__
from mwakit.bake.adapter import BakeAdapter, value
from mwakit.bake.delta import bake_bias, bake_weight
from mwakit.errors import PlanError, TensorError
from mwakit.io.durable import BackgroundSync
from mwakit.io.header import DTYPE_NAMES, TensorInfo, dtype_code, is_float_code, read_header
from mwakit.io.reader import PreadReader
from mwakit.io.shards import ShardedWriter
from mwakit.threads import merge_thread_policy

#: Output-head and input-embedding names of tied models (PEFT's EMBEDDING_LAYER_NAMES, and
#: the usual names of other architectures).
_HEADS = ("lm_head.weight", "embed_out.weight")
_READAHEAD = 64 << 20
_EMBEDS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


@dataclass(frozen=True)
class _Item:
    """One output tensor: the base tensor it starts from, and the key of its updates."""

    key: str
    shape: tuple[int, ...]
    code: str
    source: tuple[Path, TensorInfo]
    target: str  # the adapter's key for it ("" for an untied head that keeps the embedding)


@dataclass
class BakeLayout:
    """The planned output: every tensor, in base file order, and what changes in config.json.

    Attributes:
        items: Output tensors in the order they are streamed.
        untied: The adapter replaced one side of tied embeddings: write both, untie them.
        alias: Adapter key → the base key it is stored under (a LoRA on a tied head updates
            the embedding's tensor).
    """

    items: list[_Item]
    untied: bool = False
    alias: dict[str, str] = field(default_factory=dict)

    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype code, shape) of every output tensor, for the writers."""
        return [(i.key, i.code, i.shape) for i in self.items]


@dataclass
class BakeStats:
    """What a bake did: tensors written, tensors changed, bytes and seconds."""

    tensors: int = 0
    changed: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0


def _find(keys: Sequence[str], names: Sequence[str]) -> str | None:
    for k in keys:
        if any(k == n or k.endswith("." + n) for n in names):
            return k
    return None


def plan_layout(
    files: Sequence[Path],
    adapter: BakeAdapter,
    *,
    out_dtype: str | None,
    tied: bool,
    base_name: str,
) -> BakeLayout:
    """Plan the baked model's tensors from the base's headers and the adapter.

    Args:
        files: The base model's safetensors files (shards in index order).
        adapter: What the adapter changes.
        out_dtype: The written dtype of floating-point tensors (None: the base's).
        tied: The base's ``config.json`` ties the output head to the input embedding.
        base_name: The base, for messages.

    Raises:
        PlanError: The adapter changes a tensor the base lacks, or whose shape differs (an
            adapter of another model).
    """
    infos: dict[str, tuple[Path, TensorInfo]] = {}
    for f in files:
        for name, info in read_header(f).tensors.items():
            infos[name] = (f, info)
    keys = list(infos)
    head = _find(keys, _HEADS)
    embed = _find(keys, _EMBEDS)
    alias: dict[str, str] = {}  # adapter key → stored base key (a tied head is the embedding)
    untied = False
    added: list[tuple[str, str]] = []  # (new key, the base key it starts from)
    for t in sorted(adapter.targets()):
        if t in infos:
            continue
        is_head = any(t == h or t.endswith("." + h) for h in _HEADS)
        if tied and head is None and embed is not None and is_head:
            if t in adapter.replace and t not in adapter.loaded:
                # modules_to_save of a tied head: it becomes a tensor of its own.
                untied = True
                added.append((t, embed))
            else:
                alias[t] = embed
            continue
        raise PlanError(
            f"the adapter changes {t}, which the base model does not have",
            where=f"{adapter.source} on base {base_name}",
            fix="bake the adapter into the base model it was trained on (its "
            "adapter_config.json names it in base_model_name_or_path)",
        )
    if tied and head is None and embed in adapter.replace and embed not in adapter.loaded:
        # A replaced embedding leaves the head tied to the old one: PEFT unties them, and the
        # head keeps the base embedding.
        untied = True
        added.append(("lm_head.weight", embed))
    items: list[_Item] = []
    for name, (path, info) in infos.items():
        items.append(_Item(name, info.shape, _code(info.dtype, out_dtype), (path, info), name))
    for new, src in added:
        path, info = infos[src]
        target = new if new in adapter.targets() else ""
        items.append(_Item(new, info.shape, _code(info.dtype, out_dtype), (path, info), target))
    layout = BakeLayout(items=items, untied=untied, alias=alias)
    _check_shapes(layout, adapter, alias, base_name)
    return layout


def _code(code: str, out_dtype: str | None) -> str:
    return dtype_code(out_dtype) if out_dtype is not None and is_float_code(code) else code


def _check_shapes(
    layout: BakeLayout, adapter: BakeAdapter, alias: dict[str, str], base_name: str
) -> None:
    shapes = {i.key: i.shape for i in layout.items}
    where = f"{adapter.source} on base {base_name}"
    fix = "bake the adapter into the base model it was trained on"
    for key, deltas in adapter.deltas.items():
        want = shapes[alias.get(key, key)]
        for d in deltas:
            if d.delta_shape() != want:
                raise PlanError(
                    f"LoRA module {d.module} makes a ΔW of shape {list(d.delta_shape())}, the "
                    f"base tensor {alias.get(key, key)} is {list(want)}",
                    where=where,
                    fix=fix,
                )
            if d.kind == "conv" and d.a.shape[1] != want[1]:
                raise PlanError(
                    f"LoRA module {d.module} is on a grouped convolution, which PEFT cannot "
                    "merge either",
                    where=where,
                    fix="serve this adapter unmerged",
                )
            if d.magnitude is not None:
                n = want[1] if d.kind == "embedding" else want[1 if d.fan_in_fan_out else 0]
                if d.magnitude.numel() != n:
                    raise PlanError(
                        f"DoRA magnitude of {d.module} has {d.magnitude.numel()} values, the "
                        f"base tensor needs {n}",
                        where=where,
                        fix=fix,
                    )
    for key, (b, _) in adapter.biases.items():
        if tuple(b.shape) != shapes[key]:
            raise PlanError(
                f"lora_B bias for {key} has shape {list(b.shape)}, the base's is "
                f"{list(shapes[key])}",
                where=where,
                fix=fix,
            )
    for key, t in adapter.replace.items():
        if tuple(t.shape) != shapes[alias.get(key, key)]:
            raise PlanError(
                f"the adapter's {key} has shape {list(t.shape)}, the base's is "
                f"{list(shapes[alias.get(key, key)])} (a resized vocabulary is not baked yet)",
                where=where,
                fix=fix,
            )


def _updated(
    item: _Item, w: torch.Tensor, adapter: BakeAdapter, alias: dict[str, str]
) -> tuple[torch.Tensor, bool]:
    """The tensor to write for ``item`` from its base value ``w``, and whether it changed."""
    key = item.target
    changed = False
    for k in (key, *(k for k in adapter.replace if alias.get(k) == key)):
        if k in adapter.replace:
            w = value(adapter.replace[k]).to(device=w.device, dtype=w.dtype)
            changed = True
    deltas = list(adapter.deltas.get(key, []))
    # A LoRA on a tied head updates the embedding's tensor too (one tensor on both sides).
    deltas += [d for k, ds in adapter.deltas.items() if alias.get(k) == key for d in ds]
    if deltas:
        w = bake_weight(w, deltas)
        changed = True
    if key in adapter.biases:
        b, s = adapter.biases[key]
        w = bake_bias(w, b, s)
        changed = True
    return w, changed


def _baked(
    item: _Item, t: torch.Tensor, adapter: BakeAdapter, alias: dict[str, str]
) -> tuple[torch.Tensor, bool]:
    """The tensor to write for ``item`` (CPU, contiguous, the written dtype), and whether the
    adapter changed it.

    Raises:
        TensorError: The baked tensor holds NaN/Inf.
    """
    want = getattr(torch, DTYPE_NAMES[item.code])
    # Written wider than stored (--dtype float32 of a bf16 base): merge in the wider dtype, so
    # W + ΔW is not first rounded to the base's.
    wider = t.is_floating_point() and want.itemsize > t.element_size()
    new, changed = _updated(item, t.to(want) if wider else t, adapter, alias)
    if changed and new.is_floating_point() and not _finite(new):
        raise TensorError(
            f"the baked {item.key} holds NaN or Inf",
            where=f"{adapter.source} on {item.source[0].parent}",
            fix="the adapter is broken (training diverged) or too large for the base's dtype; "
            "bake with --dtype float32",
        )
    return new.to(device="cpu", dtype=want).contiguous(), changed


def _one(source: tuple[Path, TensorInfo]) -> tuple[Path, list[TensorInfo]]:
    return source[0], [source[1]]


def _finite(t: torch.Tensor) -> bool:
    # A finite sum means every value is finite (NaN and Inf propagate); only an overflowing
    # sum needs the element-wise check (no out-sized bool tensor in the common case).
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def stream_bake(
    layout: BakeLayout,
    adapter: BakeAdapter,
    out_dir: Path,
    *,
    shard_size: int,
    device: torch.device | None = None,
    on_tensor: Callable[[int, int], None] | None = None,
    syncer: BackgroundSync | None = None,
) -> BakeStats:
    """Write the baked model's shards (+ index) into ``out_dir``, streaming the base.

    Args:
        layout: From `plan_layout`.
        adapter: The adapter it was planned with.
        out_dir: The (temporary) output folder.
        shard_size: The largest shard, in bytes.
        device: Where ΔW is computed (default: CPU).
        on_tensor: Progress callback (tensors done, tensors in all).
        syncer: Flushes the shards to disk in the background as they are written.

    Raises:
        TensorError: A merged tensor holds NaN/Inf (a broken adapter).
        SourceError: A base file cannot be read, or changed while being read.
        OutputError: The output cannot be written.
    """
    stats = BakeStats()
    t0 = time.perf_counter()
    alias = layout.alias
    dev = device or torch.device("cpu")
    metadata = {"format": "pt", "mwakit_version": __version__, "mwakit_bake": "1"}
    items = layout.items
    # Read ahead only what is small next to the largest tensors: two embeddings in memory at
    # once would double the bake's peak for no gain (copying them is I/O-bound anyway).
    # Writes run one behind on a helper thread (pwrite releases the GIL), so the copy into the
    # page cache overlaps the next tensor's ΔW; one tensor waits at most.
    pending: Future[None] | None = None
    done: tuple[Path, TensorInfo] | None = None
    with (
        merge_thread_policy(),
        PreadReader(readahead=_READAHEAD) as reader,
        ShardedWriter(out_dir, layout.entries(), shard_size, metadata, syncer) as w,
        ThreadPoolExecutor(1, thread_name_prefix="mwakit-bake-write") as pool,
    ):
        try:
            for n, item in enumerate(items):
                if n + 1 < len(items):
                    reader.prefetch(*_one(items[n + 1].source))
                path, info = item.source
                t = reader.get(info, path)
                stats.bytes_read += info.nbytes
                out, changed = _baked(item, t.to(dev), adapter, alias)
                if pending is not None:
                    pending.result()
                if done is not None:
                    reader.release(*_one(done))
                pending = pool.submit(w.write, item.key, out)
                done = item.source
                stats.bytes_written += out.numel() * out.element_size()
                stats.tensors += 1
                stats.changed += int(changed)
                del t, out
                if on_tensor is not None:
                    on_tensor(n + 1, len(items))
            if pending is not None:
                pending.result()
        finally:
            if pending is not None:
                pending.exception()  # never close the writer under a write in flight
    stats.seconds = time.perf_counter() - t0
    return stats
