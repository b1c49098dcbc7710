"""Layer stacking ("frankenmerge"): plan an output model whose layers come from slices of
several full checkpoints (``method: passthrough`` with ``slices:``).

Output layer j is source layer i of one checkpoint: slice after slice, the layers
``[start, end)`` of each are renumbered 0, 1, … in order, so the output may have more or fewer
layers than any input (a layer may even appear twice). Every tensor of a source layer is
renamed ``<stack>.<i>.<rest>`` → ``<stack>.<j>.<rest>``; tensors outside the layer stack
(embeddings, the final norm, lm_head — and any other stack, e.g. a vision tower) come from one
checkpoint, ``params.rest_from`` (default: the first slice's), as do config.json (its layer
count and per-layer lists follow the new stack) and the tokenizer files. Headers only: every
shape is checked against the checkpoint the other tensors come from before a byte is read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mwakit import layer_params
from mwakit.errors import PlanError
from mwakit.io.header import is_float_code
from mwakit.recipe import parse_size

if TYPE_CHECKING:
    from mwakit.planner import Index, Plan, Task, TensorRef, _Builder
    from mwakit.sources import Checkpoint

#: Layers of a checkpoint's stack: layer index → {the name after ``<stack>.<i>``: key}.
Layers = dict[int, dict[str, str]]


def _split(index: Index, where: str) -> tuple[str | None, Layers, list[str]]:
    """(stack prefix, its layers, the other keys) of one checkpoint."""
    stack = layer_params.main_stack(index)
    prefix = None if stack is None else stack[0]
    layers: Layers = {}
    rest: list[str] = []
    for key in index:
        hit = layer_params.layer_of(key)
        if hit is None or hit[0] != prefix:
            rest.append(key)
            continue
        tail = key[len(f"{prefix}.{hit[1]}") :]
        layers.setdefault(hit[1], {})[tail] = key
    if prefix is None:
        raise PlanError(
            "no layer stack (`layers.<i>.`, `h.<i>.`, `blocks.<i>.`) in the tensor names",
            where=where,
            fix="slices stack the decoder layers of full models; use checkpoints of one "
            "transformer architecture",
        )
    return prefix, layers, rest


def plan_slices(b: _Builder, indexes: Sequence[Index], base: Checkpoint | None) -> Plan:
    """The plan of a ``slices:`` recipe (see the module docstring).

    Raises:
        PlanError: Adapters, a slice outside its checkpoint's layers, checkpoints with
            different layer stacks, or shapes that do not fit together.
    """
    recipe, checkpoints = b.recipe, b.checkpoints
    slices = recipe.slices or []
    if checkpoints[0].kind != "full":
        raise PlanError(
            "slices restack layers, and an adapter's ΔW belongs to its base model's layer of "
            "the same index: moved or repeated layers would update the wrong weights",
            where="slices",
            fix="merge full models with slices, or choose adapters layer by layer with "
            "per-layer weights (checkpoints: [{path: a, weight: [1, 1, 0, 0]}, …])",
        )
    if base is not None:
        b.warnings.append(
            "base_model is not used by slices (params.rest_from picks the checkpoint of the "
            "tensors outside the layer stack)"
        )
    rest_from = getattr(b.params, "rest_from", None)
    first = slices[0].checkpoint
    rest_i = rest_from if rest_from is not None else first
    for where, ref in [("params.rest_from", rest_i)] + [
        (f"slices.{k}.checkpoint", sl.checkpoint) for k, sl in enumerate(slices)
    ]:
        if not isinstance(ref, int) or not 0 <= ref < len(checkpoints):
            raise PlanError(
                f"checkpoint {ref!r} is not one of the {len(checkpoints)} checkpoints",
                where=where,
                fix="name a checkpoint by its index in checkpoints: (0 = first)",
            )
    assert isinstance(rest_i, int)
    split = [_split(idx, c.name) for idx, c in zip(indexes, checkpoints, strict=True)]
    prefix, rest_layers, rest_keys = split[rest_i]
    for (p, _, _), ck in zip(split, checkpoints, strict=True):
        if p != prefix:
            raise PlanError(
                f"its layers are `{p}.<i>`, those of {checkpoints[rest_i].name} `{prefix}.<i>`",
                where=ck.name,
                fix="stack layers of checkpoints of one architecture",
            )
    # The reference shape of each tensor of a layer (the rest source's first layer, then any
    # layer of any source that has that tensor).
    ref_shapes: dict[str, tuple[int, ...]] = {}
    for (_, layers, _), idx in zip(split, indexes, strict=True):
        for tails in [layers[i] for i in sorted(layers)]:
            for tail, key in tails.items():
                ref_shapes.setdefault(tail, idx[key].info.shape)
    for tail, key in rest_layers[min(rest_layers)].items():
        ref_shapes[tail] = indexes[rest_i][key].info.shape

    layer_map: list[tuple[int, int, int]] = []  # (output layer, checkpoint, source layer)
    for k, sl in enumerate(slices):
        c = sl.checkpoint
        assert isinstance(c, int)
        start, end = sl.layers
        n_c = max(split[c][1]) + 1
        if end > n_c:
            raise PlanError(
                f"layers [{start}, {end}) reach past the {n_c} layers of {checkpoints[c].name}",
                where=f"slices.{k}.layers",
                fix=f"end at {n_c} at most (the range is [start, end), end excluded)",
            )
        layer_map += [(len(layer_map) + j, c, i) for j, i in enumerate(range(start, end))]
    n_out = len(layer_map)
    if recipe.per_layer:
        b.use_layers(n_out, "the slices' layers")

    tasks: list[tuple[tuple[int, int], Task]] = []
    rest_files = checkpoints[rest_i].files
    for key in rest_keys:
        ref = indexes[rest_i][key]
        tasks.append(((0, rest_files.index(ref.path) << 48 | ref.info.start), _task(b, key, ref)))
    for j, c, i in layer_map:
        tails = split[c][1].get(i, {})
        files = checkpoints[c].files
        for tail, key in tails.items():
            ref = indexes[c][key]
            want = ref_shapes[tail]
            if ref.info.shape != want:
                raise PlanError(
                    f"shape {list(ref.info.shape)} differs from {list(want)} in "
                    f"{checkpoints[rest_i].name}",
                    where=f"{checkpoints[c].name} {key}",
                    fix="stack layers of models of one size (same hidden and head sizes)",
                )
            out_key = f"{prefix}.{j}{tail}"
            order = (1 + j, files.index(ref.path) << 48 | ref.info.start)
            tasks.append((order, _task(b, out_key, ref, layer=j)))
    return b.finish(
        tasks,
        adapter_config={},
        lora_mode="factors",
        kind="full",
        base=None,
        shard_size=parse_size(recipe.output.shard_size),
        side_source=checkpoints[rest_i],
        config_updates=_config_updates(checkpoints, rest_i, layer_map),
        layer_map=tuple(layer_map),
    )


def _task(b: _Builder, out_key: str, ref: TensorRef, layer: int | None = None) -> Task:
    """Output tensor ``out_key`` taken from ``ref`` (scaled by passthrough's weight)."""
    from mwakit.planner import FullTask, OutTensor, check_dtype

    check_dtype(ref.info, f"{b.checkpoints[ref.ckpt].name} {ref.info.name}", factor=False)
    weights, params, rule = b.settings([out_key], layer=layer)
    copy = not is_float_code(ref.info.dtype)
    dtype = ref.info.dtype if copy or b.out_dtype is None else b.out_dtype
    return FullTask(
        OutTensor(out_key, dtype, ref.info.shape),
        (ref,),
        (weights[ref.ckpt],),
        params,
        rule,
        copy,
    )


def _config_updates(
    checkpoints: Sequence[Checkpoint], rest_i: int, layer_map: Sequence[tuple[int, int, int]]
) -> dict[str, Any]:
    """config.json keys of the output: the layer count, and every per-layer list (such as
    ``layer_types``) re-indexed by the layers' sources. Nested configs (``text_config``) are
    updated where the layer count lives."""
    configs = [_read_config(c) for c in checkpoints]
    cfg = configs[rest_i]
    if cfg is None:
        return {}
    path: list[str] = []
    target = cfg
    if not any(k in cfg for k in layer_params.LAYER_COUNT_KEYS):
        for sub in ("text_config", "llm_config", "language_config"):
            if isinstance(cfg.get(sub), dict):
                path, target = [sub], cfg[sub]
                break
    count_key = next((k for k in layer_params.LAYER_COUNT_KEYS if k in target), None)
    if count_key is None:
        return {}
    n_src = target[count_key]
    updates: dict[str, Any] = {count_key: len(layer_map)}
    for key, value in target.items():
        if isinstance(value, list) and len(value) == n_src and key != count_key:
            out = []
            for _, c, i in layer_map:
                cfg_c = configs[c]
                src = _at(cfg_c, path) if cfg_c is not None else None
                own = src.get(key) if isinstance(src, dict) else None
                out.append(own[i] if isinstance(own, list) and i < len(own) else value[i])
            updates[key] = out
    if path:
        return {path[0]: {**target, **updates}}
    return updates


def _at(cfg: dict[str, Any], path: Sequence[str]) -> Any:
    for p in path:
        cfg = cfg.get(p, {})
    return cfg


def _read_config(c: Checkpoint) -> dict[str, Any] | None:
    f = c.path / "config.json"
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
