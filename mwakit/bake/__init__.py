"""Bake a LoRA adapter into its base model, streamed: a full model for serving, without PEFT.

`bake` takes an adapter folder; `run_merged` is ``output.format: merged`` of a recipe (the
merge runs in memory, then the base streams through it: no intermediate adapter is written).
Both write, atomically: the base's tensors with W' = W + ΔW where the adapter changes them
(sharded safetensors + index), ``config.json`` (dtype, ties), the tokenizer and generation
files of the base, ``README.md`` (``base_model_relation: merge``) and the manifest. Memory is
the adapter plus a tensor or two of the base, whatever the base's size.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mwakit.bases import adapter_lineage
from mwakit.errors import PlanError, SourceError, UsageError
from mwakit.io.layout import side_files

if TYPE_CHECKING:
    from mwakit.bake.adapter import BakeAdapter, LazyTensor
    from mwakit.bake.stream import BakeLayout, BakeStats
    from mwakit.executors.stats import ExecStats
    from mwakit.io.reader import PreadReader
    from mwakit.planner import Plan
    from mwakit.sources import Checkpoint

__all__ = ["BakeResult", "bake", "merged_base", "run_merged"]

_DTYPES = ("float32", "bfloat16", "float16", "float64")
_CARD = "README.md"
_MODEL_CONFIGS = ("config.json", "generation_config.json")  # the base's own, never an adapter's


@dataclass(frozen=True)
class BakeResult:
    """What `bake` wrote.

    Attributes:
        path: The output folder.
        tensors: Tensors written.
        changed: Base tensors the adapter changed.
        bytes_written: Tensor bytes written.
        seconds: Wall time of the whole bake.
        warnings: Things worth saying (an adapter that names another base).
    """

    path: Path
    tensors: int
    changed: int
    bytes_written: int
    seconds: float
    warnings: list[str] = field(default_factory=list)


def _check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in _DTYPES:
        raise UsageError(
            f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}",
            where="--dtype",
            fix="pass float32, bfloat16 or float16 (default: the base's own)",
        )


def resolve_base_model(ref: str) -> Checkpoint:
    """A base model folder (local, or ``hf://org/repo[@rev]``) as a resolved checkpoint.

    Raises:
        SourceError: Missing, or holds no ``model.safetensors[.index.json]``.
        HubError: A Hub base cannot be fetched.
    """
    from mwakit.recipe import Recipe
    from mwakit.sources import resolve_base

    # resolve_base reads only `base_model`: a recipe without the rest is enough.
    base = resolve_base(Recipe.model_construct(base_model=ref))
    assert base is not None
    return base


def _base_config(base: Path) -> dict[str, Any]:
    path = base / "config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SourceError(
            f"config.json is unreadable ({err})",
            where=str(path),
            fix="restore the config.json that save_pretrained wrote",
        ) from err
    if not isinstance(cfg, dict):
        raise SourceError("config.json is not a JSON object", where=str(path), fix="restore it")
    return cfg


def _tied(cfg: dict[str, Any]) -> bool:
    # transformers' default is tied when the config says nothing.
    text = cfg.get("text_config")
    if isinstance(text, dict) and "tie_word_embeddings" in text:
        return bool(text["tie_word_embeddings"])
    return bool(cfg.get("tie_word_embeddings", True))


def _writeside_files(
    base: Path, out: Path, out_dtype: str, untied: bool, fallback: Path | None = None
) -> None:
    found = side_files(base)
    if fallback is not None and not any(f.name not in _MODEL_CONFIGS for f in found):
        # A base saved without its tokenizer: take the one the Trainer saved with the adapter.
        found += [f for f in side_files(fallback) if f.name not in _MODEL_CONFIGS]
    for f in found:
        if f.name == "config.json":
            cfg = json.loads(f.read_text(encoding="utf-8"))
            cfg["torch_dtype"] = out_dtype
            if "dtype" in cfg or "transformers_version" in cfg:
                cfg["dtype"] = out_dtype
            if untied:
                cfg["tie_word_embeddings"] = False
            (out / f.name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(f, out / f.name)


def _dominant_dtype(layout: BakeLayout) -> str:
    from mwakit.io.header import DTYPE_NAMES, is_float_code

    sizes: dict[str, int] = {}
    for i in layout.items:
        if is_float_code(i.code):
            sizes[i.code] = sizes.get(i.code, 0) + i.source[1].nbytes
    return DTYPE_NAMES[max(sizes, key=lambda c: sizes[c])] if sizes else "float32"


def read_adapter_tensors(
    folder: Path, reader: PreadReader
) -> tuple[dict[str, LazyTensor], dict[str, Any]]:
    """An adapter folder's tensors, each read from ``reader`` only when used, and its config.

    Raises:
        SourceError: No ``adapter_config.json`` or ``adapter_model.safetensors``, or either is
            unreadable.
    """
    from mwakit.adapters import read_adapter_config
    from mwakit.bake.adapter import LazyTensor
    from mwakit.io.header import read_header

    if not folder.is_dir():
        raise SourceError(
            "adapter folder not found",
            where=str(folder),
            fix="point at a folder PEFT's save_pretrained wrote (adapter_config.json + "
            "adapter_model.safetensors)",
        )
    cfg = read_adapter_config(folder)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        legacy = (folder / "adapter_model.bin").is_file()
        raise SourceError(
            "no adapter_model.safetensors"
            + (" (only a legacy adapter_model.bin)" if legacy else ""),
            where=str(folder),
            fix="save the adapter with save_pretrained(safe_serialization=True)",
        )
    header = read_header(weights)
    return {k: LazyTensor(weights, i, reader) for k, i in header.tensors.items()}, cfg.raw


def _lineage_warning(adapter_cfg: dict[str, Any], base: Checkpoint) -> list[str]:
    named = adapter_lineage("adapter", adapter_cfg.get("base_model_name_or_path"))
    if named.key is None:
        return []
    given = {str(os.path.realpath(base.path)), base.ref.removeprefix("hf://").split("@")[0].lower()}
    if named.key in given:
        return []
    return [
        f"the adapter names base {named.base!r}, baking into {base.ref} (the shapes fit: "
        "check it is the same model)"
    ]


def _plan(
    adapter: BakeAdapter, base: Checkpoint, dtype: str | None
) -> tuple[BakeLayout, dict[str, Any]]:
    from mwakit.bake.stream import plan_layout

    cfg = _base_config(base.path)
    side_files(base.path)  # a side file linked out of the folder fails now, not after the bake
    layout = plan_layout(base.files, adapter, out_dtype=dtype, tied=_tied(cfg), base_name=base.ref)
    return layout, cfg


def _stream(
    layout: BakeLayout,
    adapter: BakeAdapter,
    base: Checkpoint,
    tmp: Path,
    shard_size: int,
    on_tensor: Callable[[int, int], None] | None,
    fallback: Path | None = None,
) -> tuple[BakeStats, str]:
    from mwakit.bake.stream import stream_bake
    from mwakit.io.durable import BackgroundSync

    # Shards are flushed to disk as they are written, so the fsync before the folder's rename
    # finds (almost) nothing left to do.
    with BackgroundSync() as syncer:
        stats = stream_bake(
            layout, adapter, tmp, shard_size=shard_size, on_tensor=on_tensor, syncer=syncer
        )
        syncer.join()
    out_dtype = _dominant_dtype(layout)
    _writeside_files(base.path, tmp, out_dtype, layout.untied, fallback)
    return stats, out_dtype


def _shard_bytes(shard_size: str | int) -> int:
    from mwakit.recipe import parse_size

    if isinstance(shard_size, int):
        return shard_size
    try:
        return parse_size(shard_size)
    except ValueError as err:
        raise UsageError(
            str(err), where="--shard-size", fix="write e.g. 500MB, 5GB or 2GiB"
        ) from err


def bake(
    adapter: str | Path,
    base: str | Path,
    output: str | Path,
    *,
    overwrite: bool = False,
    shard_size: str | int = "5GB",
    dtype: str | None = None,
    on_tensor: Callable[[int, int], None] | None = None,
) -> BakeResult:
    """Merge the LoRA adapter folder ``adapter`` into ``base``, streamed, into ``output``.

    Args:
        adapter: A PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        base: The base model's folder, or ``hf://org/repo[@revision]``.
        output: The output folder (written atomically: it appears only when complete).
        overwrite: Replace an existing output (an empty folder or a previous mwakit output).
        shard_size: The largest output shard ("5GB", "500MB", or bytes).
        dtype: The written dtype of floating-point tensors (default: the base's own).
        on_tensor: Progress callback (tensors done, tensors in all).

    Raises:
        SourceError: The adapter or base folder is missing or unreadable.
        PlanError: The adapter is not a plain LoRA, or does not fit the base (another model).
        OutputError: The output may not or cannot be written (it is or holds an input, it
            exists without ``overwrite``, the disk is full, …).
        TensorError: A baked tensor holds NaN/Inf.
    """
    from mwakit.bake.adapter import parse_adapter
    from mwakit.bake.card import render_bake_card
    from mwakit.card import sha256_file
    from mwakit.io.atomic import atomic_output_dir, check_target
    from mwakit.io.reader import PreadReader

    t0 = time.perf_counter()
    _check_dtype(dtype)
    size = _shard_bytes(shard_size)
    adapter_dir, target = Path(adapter), Path(output)
    inputs: list[Path] = [adapter_dir]
    if not str(base).startswith("hf://"):
        inputs.append(Path(base))
    check_target(target, overwrite, inputs)
    # The adapter's tensors are read module by module as the base streams past them.
    with PreadReader(readahead=0) as adapter_reader:
        tensors, raw = read_adapter_tensors(adapter_dir, adapter_reader)
        parsed = parse_adapter(tensors, raw, source=str(adapter_dir))
        b = resolve_base_model(str(base))
        layout, _ = _plan(parsed, b, dtype)
        warnings = _lineage_warning(raw, b)
        # A Hub base is pinned to the commit it resolved to: the command bakes the same bytes.
        pinned = b.pinned_ref if b.revision is not None else str(base)
        args = ["mwakit", "bake", str(adapter), "--base", pinned, "-o", str(output)]
        cmd = shlex.join(args + (["--dtype", dtype] if dtype else []))
        files = [adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"]
        inputs += [b.path, *b.files, *files]
        with atomic_output_dir(target, overwrite, inputs) as tmp, ThreadPoolExecutor(1) as pool:
            prints = pool.submit(
                lambda: [("adapter", f.name, sha256_file(f), f.stat().st_size) for f in files]
            )
            stats, out_dtype = _stream(layout, parsed, b, tmp, size, on_tensor, adapter_dir)
            card = render_bake_card(
                base=str(base),
                adapter=str(adapter),
                adapter_config=raw,
                out_dtype=out_dtype,
                changed=stats.changed,
                tensors=stats.tensors,
                untied=layout.untied,
                fingerprints=prints.result(),
                command=cmd,
            )
            (tmp / _CARD).write_text(card, encoding="utf-8")
    return BakeResult(
        path=target,
        tensors=stats.tensors,
        changed=stats.changed,
        bytes_written=stats.bytes_written,
        seconds=time.perf_counter() - t0,
        warnings=warnings,
    )


def merged_base(p: Plan) -> Checkpoint:
    """The base a recipe's merged adapter is baked into: ``base_model``, else the adapters'
    ``base_model_name_or_path``.

    Raises:
        PlanError: The plan is a full-model merge, or no base is known.
        SourceError: The base folder is missing or holds no model.
    """
    if p.kind == "full":
        raise PlanError(
            "output.format: merged bakes a merged adapter into its base; this merge of full "
            "models already writes a full model",
            where="output.format",
            fix="remove output.format (or set it to adapter)",
        )
    if p.base is not None:
        return p.base
    if p.recipe.base_model:
        return resolve_base_model(p.recipe.base_model)
    name = p.adapter_config.get("base_model_name_or_path")
    if not isinstance(name, str) or not name:
        raise PlanError(
            "output.format: merged needs the base model, and the adapters name none",
            where="output.format",
            fix="set base_model: <the base model folder or hf://org/repo>",
        )
    # A path (absolute, relative or existing) is a local folder; else a Hub repo id.
    local = os.path.isabs(name) or name.startswith(".") or os.path.isdir(name)
    ref = name if local or name.startswith("hf://") else f"hf://{name}"
    return resolve_base_model(ref)


def run_merged(
    p: Plan,
    target: Path,
    overwrite: bool,
    inputs: Iterable[Path],
    *,
    on_task: Callable[[int, Any], None] | None = None,
    base: Checkpoint | None = None,
) -> ExecStats:
    """``output.format: merged``: merge the plan in memory, then bake it into the base.

    No intermediate adapter is written: the merged adapter's tensors stay in memory (small)
    and the base streams through them into ``target``, with the recipe as run and a card.

    Raises:
        MwakitError: Any plan, source, tensor or output problem (nothing is left written).
    """
    import torch

    from mwakit.bake.adapter import parse_adapter
    from mwakit.bake.card import rebrand_card
    from mwakit.card import (
        RESOLVED_RECIPE,
        fingerprints,
        render_card,
        resolved_recipe,
        write_assets,
    )
    from mwakit.execute import MemorySink, execute
    from mwakit.io.atomic import atomic_output_dir
    from mwakit.recipe import dump_recipe

    t0 = time.perf_counter()
    b = base or merged_base(p)
    size = p.shard_size
    # The merged adapter's shapes are known from the plan: check that it fits the base (and is
    # bakeable) before any merge work, with tensors that hold no data.
    shapes = {o.key: torch.empty(o.shape, device="meta") for o in p.outputs}
    _plan(parse_adapter(shapes, p.adapter_config, source="the merged adapter"), b, None)
    all_inputs: Sequence[Path] = [*inputs, b.path, *b.files]
    with atomic_output_dir(target, overwrite, all_inputs) as tmp, ThreadPoolExecutor(1) as pool:
        assets = pool.submit(write_assets, p, tmp)
        sink = MemorySink()
        stats = execute(p, None, on_task=on_task, sink=sink)
        parsed = parse_adapter(sink.tensors, p.adapter_config, source="the merged adapter")
        del sink
        layout, _ = _plan(parsed, b, p.recipe.out_dtype)
        baked, _ = _stream(layout, parsed, b, tmp, size, None, p.checkpoints[0].path)
        resolved = resolved_recipe(p, folder=target)
        text = dump_recipe(resolved)
        (tmp / RESOLVED_RECIPE).write_text(text, encoding="utf-8")
        card = render_card(
            p,
            text,
            stats.rel_errors,
            plot="weights.png",
            fingerprints=fingerprints(p, assets.result()),
            rerun=resolved.output.path,
            solvers=stats.solvers,
        )
        (tmp / _CARD).write_text(rebrand_card(card, b.ref, p.adapter_config), encoding="utf-8")
    stats.bytes_written = baked.bytes_written
    stats.bytes_read += baked.bytes_read
    stats.seconds = time.perf_counter() - t0
    return stats
