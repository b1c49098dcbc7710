"""The plan: frozen data saying how every output tensor is made, built from headers only.

Reads ``adapter_config.json`` and safetensors headers (never tensor bytes), checks that the
checkpoints fit together, resolves per-tensor rules and weights, and orders the work in input
file order. Any mismatch fails here, naming checkpoint, key and fix, before a byte is read.
Inputs are PEFT adapters (LoRA modules become one task each) or full models (one task per
tensor, sharded inputs and output, an optional ``base_model`` for task-vector methods).

Every check records its problem in a `Problems` collector and planning carries on where the
later checks still make sense, so one call reports every problem; `mwakit validate`, `plan`
and `run` all go through here and reach the same verdict.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from mwakit import __version__, layer_params
from mwakit.adapters import (
    AdapterConfig,
    full_rank,
    lora_role,
    output_config,
    read_adapter_config,
)
from mwakit.bases import adapter_lineage, check_bases, model_lineage
from mwakit.errors import MetricError, PlanError, Problems
from mwakit.io.header import DTYPE_SIZES, TensorInfo, dtype_code, is_float_code, read_header
from mwakit.methods import MergeMethod, get_method
from mwakit.methods.registry import CheckpointView
from mwakit.recipe import Recipe, Rule, count_problem, lora_space_problem, parse_size
from mwakit.sources import Checkpoint
from mwakit.weights import step_zero_warnings

_F32_MAX = 3.4028234663852886e38

#: factors: average A and B; concat / svd: exact ΔW as rank concatenation, optionally
#: re-factorised; dense: a method on dense ΔW_i, then a truncated SVD; full: a method on dense
#: ΔW_i, the result written exactly as full-rank factors (`lowrank.full_factors`).
LoraMode = Literal["factors", "concat", "svd", "dense", "full"]


@dataclass(frozen=True)
class TensorRef:
    """Where one input tensor lives."""

    ckpt: int
    path: Path
    info: TensorInfo


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output file."""

    key: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class FullTask:
    """Merge one full tensor (modules_to_save, bias, DoRA magnitude, embedding) or copy it."""

    out: OutTensor
    inputs: tuple[TensorRef, ...]
    weights: tuple[float, ...]
    params: BaseModel
    rule: str | None
    copy: bool = False
    """Integer tensors and buffers are copied from the first checkpoint, never averaged."""
    base: TensorRef | None = None
    """θ_0 for task-vector methods on full models."""
    aux: tuple[TensorRef, ...] | None = None
    """Per-checkpoint side inputs of the same shape (the Fisher diagonal for `fisher`)."""

    @property
    def name(self) -> str:
        """The tensor key."""
        return self.out.key


@dataclass(frozen=True)
class LoraTask:
    """Merge one LoRA module's factors (A, B and an optional lora_B bias)."""

    module: str
    a: tuple[TensorRef, ...]
    b: tuple[TensorRef, ...]
    bias: tuple[TensorRef, ...] | None
    scalings: tuple[float, ...]
    out_scaling: float
    mode: LoraMode
    rank: int
    weights: tuple[float, ...]
    params: BaseModel
    rule: str | None
    out_a: OutTensor
    out_b: OutTensor
    out_bias: OutTensor | None
    aux_a: tuple[TensorRef, ...] | None = None
    aux_b: tuple[TensorRef, ...] | None = None

    @property
    def dense(self) -> bool:
        """The method runs on each dense ΔW_i (modes ``dense`` and ``full``)."""
        return self.mode in ("dense", "full")

    @property
    def name(self) -> str:
        """The module name."""
        return self.module

    @property
    def outputs(self) -> tuple[OutTensor, ...]:
        """The output tensors, A then B then bias."""
        return (self.out_a, self.out_b) + ((self.out_bias,) if self.out_bias else ())

    @property
    def inputs(self) -> tuple[TensorRef, ...]:
        """Every input tensor of the group."""
        return self.a + self.b + (self.bias or ())


Task = FullTask | LoraTask


@dataclass(frozen=True)
class Plan:
    """Everything needed to execute a merge, with no tensor bytes read yet."""

    recipe: Recipe
    method: MergeMethod
    params: BaseModel
    checkpoints: tuple[Checkpoint, ...]
    weights: tuple[float, ...]
    tasks: tuple[Task, ...]
    adapter_config: dict[str, Any]
    lora_mode: LoraMode
    warnings: tuple[str, ...] = field(default=())
    kind: Literal["adapter", "full"] = "adapter"
    base: Checkpoint | None = None
    """The recipe's base_model (full models)."""
    shard_size: int = 5 * 10**9
    layers: dict[str, Any] | None = None
    """Per-layer parameters: the layer count, its source and the values at every layer (when
    the recipe has per-layer lists), as `mwakit plan` shows them."""
    side_source: Checkpoint | None = None
    """Where config.json and tokenizer files come from (slices; default: base, else first)."""
    config_updates: dict[str, Any] = field(default_factory=dict)
    """Keys of config.json the merge changes (slices: the layer count, per-layer lists)."""
    layer_map: tuple[tuple[int, int, int], ...] = ()
    """Slices: (output layer, checkpoint index, source layer) for every output layer."""

    @property
    def outputs(self) -> list[OutTensor]:
        """Every output tensor."""
        out: list[OutTensor] = []
        for t in self.tasks:
            out.extend(t.outputs if isinstance(t, LoraTask) else (t.out,))
        return out

    @property
    def base_model(self) -> str | None:
        """The base model: the adapters' base, or a full merge's ``base_model``."""
        if self.kind == "full":
            return self.recipe.base_model
        v = self.adapter_config.get("base_model_name_or_path")
        return str(v) if v else None

    def to_json(self) -> dict[str, Any]:
        """The plan as a JSON-ready document (what `mwakit plan --json` prints)."""
        in_bytes = sum(r.info.nbytes for t in self.tasks for r in t.inputs)
        return {
            "method": self.method.name,
            "kind": self.kind,
            "params": self.params.model_dump(mode="json"),
            "lora_space": self.recipe.lora_space,
            "lora_mode": self.lora_mode,
            "base_model": self.base_model,
            "checkpoints": [
                {
                    "path": str(c.path),
                    "name": c.name,
                    "step": c.step,
                    "weight": w,
                    "metrics": c.metrics,
                    "metrics_source": c.metrics_source,
                }
                for c, w in zip(self.checkpoints, self.weights, strict=True)
            ],
            "tensors": [_task_json(t, self.layers is not None) for t in self.tasks],
            "summary": {
                "tasks": len(self.tasks),
                "lora_modules": sum(isinstance(t, LoraTask) for t in self.tasks),
                "full_tensors": sum(isinstance(t, FullTask) and not t.copy for t in self.tasks),
                "copied_tensors": sum(isinstance(t, FullTask) and t.copy for t in self.tasks),
                "input_bytes": in_bytes,
                "output_bytes": sum(_nbytes(o) for o in self.outputs),
            },
            "adapter_config": self.adapter_config,
            **({"layers": self.layers} if self.layers is not None else {}),
            **({"config_updates": self.config_updates} if self.config_updates else {}),
            **(
                {
                    "slices": [
                        {"layer": j, "checkpoint": self.checkpoints[c].name, "source_layer": i}
                        for j, c, i in self.layer_map
                    ]
                }
                if self.layer_map
                else {}
            ),
            "warnings": list(self.warnings),
        }


def _nbytes(o: OutTensor) -> int:
    return math.prod(o.shape) * DTYPE_SIZES[o.dtype]


def _task_json(t: Task, per_layer: bool = False) -> dict[str, Any]:
    out = _task_doc(t)
    if per_layer:
        hit = layer_params.layer_of(t.name)
        out["layer"] = None if hit is None else hit[1]
        out["params"] = t.params.model_dump(mode="json")
    return out


def _task_doc(t: Task) -> dict[str, Any]:
    if isinstance(t, LoraTask):
        return {
            "module": t.module,
            "kind": "lora",
            "mode": t.mode,
            "rank": t.rank,
            "input_ranks": [r.info.shape[0] for r in t.a],
            "scalings": list(t.scalings),
            "out_scaling": t.out_scaling,
            "weights": list(t.weights),
            "rule": t.rule,
            "outputs": [
                {"key": o.key, "dtype": o.dtype, "shape": list(o.shape)} for o in t.outputs
            ],
        }
    return {
        "key": t.out.key,
        "kind": "copy" if t.copy else "full",
        "weights": list(t.weights),
        "rule": t.rule,
        "dtype": t.out.dtype,
        "shape": list(t.out.shape),
    }


def _rule_for(rules: Sequence[Rule], names: Sequence[str]) -> int | None:
    # Anchored glob (fnmatchcase: `*` also matches dots), never a substring test.
    for i, rule in enumerate(rules):
        if any(fnmatchcase(n, rule.match) for n in names):
            return i
    return None


def _check_compatible(checkpoints: Sequence[Checkpoint], configs: Sequence[AdapterConfig]) -> None:
    for c, cfg in zip(checkpoints, configs, strict=True):
        if cfg.peft_type != "LORA":
            raise PlanError(
                f"adapter type {cfg.peft_type or 'unknown'} is not supported (only LORA is "
                "linear in its stored factors)",
                where=c.name,
                fix="merge LoRA adapters; for other types use PEFT's own merge tools",
            )
    first = configs[0]
    for c, cfg in zip(checkpoints[1:], configs[1:], strict=True):
        for key in ("fan_in_fan_out", "use_dora"):
            if bool(cfg.raw.get(key, False)) != bool(first.raw.get(key, False)):
                raise PlanError(
                    f"{key} differs from {checkpoints[0].name} "
                    f"({cfg.raw.get(key)} vs {first.raw.get(key)})",
                    where=c.name,
                    fix="merge adapters trained with the same LoRA variant",
                )


Index = dict[str, TensorRef]
#: (per-checkpoint weights, validated params, the matching rule's glob or None).
Settings = tuple[tuple[float, ...], BaseModel, str | None]


def _index(i: int, c: Checkpoint, files: Sequence[Path] | None = None) -> Index:
    """Every tensor of a checkpoint (across its shards), from headers only."""
    out: Index = {}
    for f in files or c.files:
        for key, info in read_header(f).tensors.items():
            if key in out:
                raise PlanError(
                    f"tensor {key} appears in two shards ({out[key].path.name}, {f.name})",
                    where=c.name,
                    fix="the model's shards are inconsistent; re-save the model",
                )
            out[key] = TensorRef(i, f, info)
    return out


def _check_keys(checkpoints: Sequence[Checkpoint], indexes: Sequence[Index]) -> None:
    keys0 = set(indexes[0])
    for c, idx in zip(checkpoints[1:], indexes[1:], strict=True):
        keys = set(idx)
        missing, extra = sorted(keys0 - keys), sorted(keys - keys0)
        if missing or extra:
            what = (
                f"lacks {len(missing)} tensor(s) of {checkpoints[0].name}, e.g. {missing[0]}"
                if missing
                else f"has {len(extra)} tensor(s) {checkpoints[0].name} lacks, e.g. {extra[0]}"
            )
            raise PlanError(
                what,
                where=c.name,
                fix="merge checkpoints of the same layout (same model; for adapters the same "
                "target_modules and modules_to_save)",
            )


def check_weights(weights: Sequence[float], names: Sequence[str], dtype: str) -> None:
    """Every weight (or coefficient) is a number the compute dtype can take as a scalar.

    Sums run in float32 (float64 with ``dtype: float64``), and torch refuses a float32 scalar
    beyond 3.4e38; a product that overflows is caught after the merge, by tensor.

    Raises:
        MetricError: A weight is NaN, infinite or beyond the accumulator's range.
    """
    limit, acc = (sys.float_info.max, "float64") if dtype == "float64" else (_F32_MAX, "float32")
    bad = [
        (name, w)
        for name, w in zip(names, weights, strict=True)
        if not math.isfinite(w) or abs(w) > limit
    ]
    if bad:
        raise MetricError(
            f"weight {bad[0][1]:g} cannot be computed with: merges sum in {acc}, which holds "
            f"numbers up to {limit:.4g}",
            where=", ".join(name for name, _ in bad),
            fix="weights are relative: scale them down (or set normalize: true where the "
            "method has it)",
        )


def _resolve_weights(
    recipe: Recipe,
    method: MergeMethod,
    params: BaseModel,
    views: Sequence[CheckpointView],
    t: float = 0.0,
) -> tuple[float, ...]:
    if recipe.weighting is not None:
        from mwakit.methods import mwa

        mwa_params = mwa.Params.model_validate(layer_params.at(recipe.weighting.mwa, t))
        ws = mwa.weigh(mwa_params, views)
        views = [CheckpointView(v.name, v.metrics, w) for v, w in zip(views, ws, strict=True)]
    return tuple(method.weigh(params, views))


class _Builder:
    """Shared state while planning: weights per rule, used rules, warnings, output dtype."""

    def __init__(
        self,
        recipe: Recipe,
        method: MergeMethod,
        checkpoints: Sequence[Checkpoint],
        problems: Problems,
    ):
        self.recipe = recipe
        self.method = method
        self.checkpoints = checkpoints
        self.problems = problems
        self.params = recipe.method_params()
        views = self.views(0.0)
        self.weights = self._weights(self.params, views)
        self.rule_params = [recipe.method_params(r) for r in recipe.rules]
        self.rule_weights = [self._weights(p, views) for p in self.rule_params]
        self.used: set[int] = set()
        self.warnings: list[str] = []
        # Modules whose delta_rank was cut to their full rank, and that rank.
        self.clamped: dict[str, int] = {}
        #: Modules whose B factors are rescaled to one scaling (said once, not per module).
        self.rescaled: list[str] = []
        self.out_dtype = dtype_code(recipe.out_dtype) if recipe.out_dtype else None
        self.n_layers: int | None = None
        """Set (by `use_layers`) when the recipe has per-layer lists."""
        self._depth_cache: dict[tuple[int | None, float], Settings] = {}

    def _weights(
        self, params: BaseModel, views: list[CheckpointView], t: float = 0.0
    ) -> tuple[float, ...]:
        # On a problem, uniform weights stand in so the other checks can still run (the plan
        # is refused anyway).
        n = len(views)
        weights = tuple([1.0 / n] * n)
        with self.problems.collect():
            found = _resolve_weights(self.recipe, self.method, params, views, t)
            check_weights(found, [v.name for v in views], self.recipe.dtype)
            weights = found
        return weights

    def views(self, t: float) -> list[CheckpointView]:
        """What the weighting sees of each checkpoint, per-layer weights taken at depth t."""
        return [
            CheckpointView(
                c.name,
                c.metrics,
                layer_params.interpolate(c.weight, t) if isinstance(c.weight, list) else c.weight,
            )
            for c in self.checkpoints
        ]

    def use_layers(self, n_layers: int, source: str) -> None:
        """Resolve per-layer lists over ``n_layers`` layers from here on."""
        self.n_layers = n_layers
        self.layer_source = source

    def settings(self, names: Sequence[str], layer: int | None = None) -> Settings:
        """(weights, params, matching rule) of a tensor group: the first rule whose glob matches
        one of ``names`` wins; per-layer lists are taken at the group's depth (its ``layer``, or
        the layer index in its names)."""
        i = _rule_for(self.recipe.rules, names)
        if i is not None:
            self.used.add(i)
        if self.n_layers is not None:
            if layer is None:
                hit = next((h for n in names if (h := layer_params.layer_of(n))), None)
                layer = None if hit is None else hit[1]
            return self.at_depth(i, layer_params.depth(layer, self.n_layers))
        if i is None:
            return self.weights, self.params, None
        return self.rule_weights[i], self.rule_params[i], self.recipe.rules[i].match

    def at_depth(self, i: int | None, t: float) -> Settings:
        """The settings of rule ``i`` (None: the top level) at depth t, cached."""
        key = (i, t)
        if key not in self._depth_cache:
            rule = None if i is None else self.recipe.rules[i]
            params = self.recipe.method_params(rule, t=t)
            weights = self._weights(params, self.views(t), t)
            self._depth_cache[key] = (weights, params, None if rule is None else rule.match)
        return self._depth_cache[key]

    def layers_doc(self) -> dict[str, Any] | None:
        """The per-layer values of the top-level settings, for `mwakit plan`."""
        if self.n_layers is None:
            return None
        r = self.recipe
        lists: dict[str, Any] = {
            "params": layer_params.lists_in(r.params),
            "weighting": layer_params.lists_in(r.weighting.mwa) if r.weighting else {},
            "weights": {c.name: c.weight for c in self.checkpoints if isinstance(c.weight, list)},
            "rules": {
                rule.match: layer_params.lists_in(rule.params)
                for rule in r.rules
                if layer_params.lists_in(rule.params)
            },
        }
        rows = []
        for layer in range(self.n_layers):
            t = layer_params.depth(layer, self.n_layers)
            weights, params, _ = self.at_depth(None, t)
            dumped = params.model_dump(mode="json", by_alias=True)
            values = {k: dumped[k] for k in lists["params"] if k in dumped}
            values.update(
                {
                    f"weighting.{k}": layer_params.interpolate(v, t)
                    for k, v in lists["weighting"].items()
                }
            )
            ruled = {}
            for i, rule in enumerate(r.rules):
                if rule.match in lists["rules"]:
                    rp = self.at_depth(i, t)[1].model_dump(mode="json", by_alias=True)
                    ruled[rule.match] = {k: rp[k] for k in lists["rules"][rule.match] if k in rp}
            rows.append(
                {
                    "layer": layer,
                    "t": t,
                    "params": values,
                    "weights": list(weights),
                    "rules": ruled,
                }
            )
        return {
            "count": self.n_layers,
            "source": self.layer_source,
            "lists": lists,
            "outside_stack": "t = 0 (embeddings, final norm, lm_head: as the first layer)",
            "per_layer": rows,
        }

    def full_task(
        self,
        key: str,
        refs: Sequence[TensorRef],
        base: TensorRef | None,
        aux: tuple[TensorRef, ...] | None,
    ) -> FullTask:
        for c, r in zip(self.checkpoints[1:], refs[1:], strict=True):
            if r.info.shape != refs[0].info.shape:
                raise PlanError(
                    f"shape {list(r.info.shape)} differs from {list(refs[0].info.shape)} in "
                    f"{self.checkpoints[0].name}",
                    where=f"{c.name} {key}",
                    fix="merge checkpoints of the same model",
                )
        if base is not None and base.info.shape != refs[0].info.shape:
            raise PlanError(
                f"base_model has shape {list(base.info.shape)}, the checkpoints "
                f"{list(refs[0].info.shape)}",
                where=key,
                fix="use the base model these checkpoints were fine-tuned from",
            )
        for c, r in zip(self.checkpoints, refs, strict=True):
            check_dtype(r.info, f"{c.name} {key}", factor=False)
        copy = not is_float_code(refs[0].info.dtype)
        weights, p, rule = self.settings([key])
        dtype = refs[0].info.dtype if copy or self.out_dtype is None else self.out_dtype
        return FullTask(
            OutTensor(key, dtype, refs[0].info.shape),
            tuple(refs),
            weights,
            p,
            rule,
            copy,
            None if copy else base,
            None if copy else aux,
        )

    def finish(self, tasks: list[tuple[tuple[int, int], Task]], **fields: Any) -> Plan:
        """The plan, tasks in input-file order, with unused rules reported."""
        unused = [
            f"rule {r.match!r} matches no tensor"
            for i, r in enumerate(self.recipe.rules)
            if i not in self.used
        ]
        if self.clamped:
            caps = sorted(set(self.clamped.values()))
            unused.append(
                f"delta_rank {self.recipe.delta_rank} is more than {len(self.clamped)} "
                f"module(s) can hold; they get their full rank min(out, in) instead "
                f"({', '.join(map(str, caps[:5]))}{', …' if len(caps) > 5 else ''})"
            )
        return Plan(
            recipe=self.recipe,
            method=self.method,
            params=self.params,
            checkpoints=tuple(self.checkpoints),
            weights=self.weights,
            tasks=tuple(t for _, t in sorted(tasks, key=lambda kt: kt[0])),
            warnings=tuple(self.warnings + unused),
            layers=self.layers_doc(),
            **fields,
        )


def check_dtype(info: TensorInfo, where: str, *, factor: bool) -> None:
    """Refuse tensors that cannot be averaged as numbers.

    Integer and bool tensors are copied when they are buffers (``factor`` False), but a LoRA
    factor must be floating point: averaging integer A or B would round every product. float8
    weights carry separate scales (``*_scale_inv`` tensors), so their raw values do not average.

    Raises:
        PlanError: A float8 tensor, or an integer LoRA factor.
    """
    if info.dtype.startswith("F8"):
        raise PlanError(
            f"{info.dtype} (float8) tensor: float8 weights are stored with separate scales "
            "and cannot be averaged as numbers",
            where=where,
            fix="dequantise the checkpoints to bfloat16 or float32 first",
        )
    if factor and not is_float_code(info.dtype):
        raise PlanError(
            f"LoRA factor has dtype {info.dtype}: factors must be floating point to be merged",
            where=where,
            fix="the adapter file is corrupt or not a LoRA adapter; restore it from training",
        )


def _aux_indexes(
    params: BaseModel, checkpoints: Sequence[Checkpoint], problems: Problems
) -> list[Index] | None:
    """Side inputs a method reads beside each checkpoint (the Fisher file for `fisher`)."""
    name = getattr(params, "fisher_file", None)
    if not name:
        return None
    out: list[Index] = []
    for i, c in enumerate(checkpoints):
        with problems.collect():
            f = c.path / name
            if not f.is_file():
                raise PlanError(
                    f"no {name} (the diagonal Fisher) beside the checkpoint",
                    where=c.name,
                    fix=f"estimate it with `mwakit fisher {c.path} --base BASE --data "
                    "DATA.jsonl`, or set params.fisher_file",
                )
            out.append(_index(i, c, [f]))
    return out if len(out) == len(checkpoints) else None


def _aux_refs(
    aux: list[Index] | None, key: str, shape: tuple[int, ...]
) -> tuple[TensorRef, ...] | None:
    if aux is None:
        return None
    refs = []
    for idx in aux:
        r = idx.get(key)
        if r is None or r.info.shape != shape:
            raise PlanError(
                f"the Fisher file lacks {key} (or its shape differs)",
                where=str(next(iter(idx.values())).path) if idx else "fisher file",
                fix="re-estimate the Fisher for this checkpoint",
            )
        refs.append(r)
    return tuple(refs)


def _order_key(refs: Sequence[TensorRef], files: Sequence[Path]) -> tuple[int, int]:
    # Input-file order of the first checkpoint: shard by shard, offset by offset.
    r = refs[0]
    return files.index(r.path), r.info.start


def build_plan(
    recipe: Recipe,
    checkpoints: Sequence[Checkpoint],
    base: Checkpoint | None = None,
    *,
    problems: Problems | None = None,
    expected: int | None = None,
) -> Plan:
    """Plan a merge from the recipe and resolved checkpoints, reading headers only.

    Args:
        recipe: The validated recipe.
        checkpoints: The resolved inputs (all adapters, or all full models).
        base: The resolved ``base_model`` for full-model task-vector methods.
        problems: Problems found so far (by `mwakit.validate` while resolving the sources);
            every problem found here is added, and all of them are raised together.
        expected: How many checkpoints the recipe gives, when some did not resolve (their
            problems are in ``problems``); the method's count is checked against it.

    Raises:
        PlanError: Checkpoints do not fit together, or the recipe asks for something the
            method or the inputs cannot do.
        MetricError: A weight cannot be computed from the metrics.
        SourceError: A header or config is unreadable.
        RecipeError: Several problems at once (each with its location and fix).
    """
    col = Problems() if problems is None else problems
    plan = _build(
        recipe, checkpoints, base, col, len(checkpoints) if expected is None else expected
    )
    col.raise_if_any(source=None)
    assert plan is not None  # no problem recorded means the plan was built
    return plan


def _build(
    recipe: Recipe,
    checkpoints: Sequence[Checkpoint],
    base: Checkpoint | None,
    col: Problems,
    expected: int,
) -> Plan | None:
    """`build_plan`'s body: None when a problem stopped it (the problem is in ``col``)."""
    method = get_method(recipe.method)
    # Slices take one checkpoint per output tensor, any number in all.
    if not recipe.slices and (msg := count_problem(method, expected)) is not None:
        col.add(PlanError(msg, where="checkpoints", fix="adjust the checkpoint list or select:"))
    if not checkpoints:
        return None
    kinds = {c.kind for c in checkpoints}
    if len(kinds) > 1:
        col.add(
            PlanError(
                "the checkpoints mix PEFT adapters and full models",
                where="checkpoints",
                fix="merge adapters with adapters and full models with full models",
            )
        )
        return None
    b = _Builder(recipe, method, checkpoints, col)
    indexes: list[Index] = []
    for i, c in enumerate(checkpoints):
        with col.collect():
            indexes.append(_index(i, c))
    if len(indexes) < len(checkpoints):
        return None  # a header is unreadable: nothing can be compared with it
    if recipe.slices:
        # Layer stacking takes each output tensor from one checkpoint: the inputs may be
        # different models (other layer counts), checked slice by slice instead.
        from mwakit.slices import plan_slices

        with col.collect():
            return plan_slices(b, indexes, base)
        return None
    checked = False
    with col.collect():
        _check_keys(checkpoints, indexes)
        checked = True
    if recipe.per_layer:
        b.use_layers(*_layer_count(checkpoints[0], indexes[0]))
    aux = _aux_indexes(b.params, checkpoints, col)
    if next(iter(kinds)) == "full":
        return _plan_full(b, indexes, base, aux, keys_match=checked)
    if not checked:
        return None  # LoRA modules pair keys across checkpoints
    return _plan_adapters(b, indexes, aux)


def _layer_count(first: Checkpoint, index: Index) -> tuple[int, str]:
    """Layers of the model the checkpoints belong to: a full model's config.json, an
    adapter's local base model's config.json, else the largest layer index + 1."""
    config: Path | None = first.path / "config.json"
    if first.kind == "adapter":
        base = read_adapter_config(first.path).raw.get("base_model_name_or_path")
        config = Path(base) / "config.json" if isinstance(base, str) and base else None
    return layer_params.layer_count(config, index)


def _plan_full(
    b: _Builder,
    indexes: Sequence[Index],
    base: Checkpoint | None,
    aux: list[Index] | None,
    *,
    keys_match: bool,
) -> Plan | None:
    recipe, method, checkpoints, col = b.recipe, b.method, b.checkpoints, b.problems
    if method.needs_base and base is None:
        col.add(
            PlanError(
                f"method {method.name} works on task vectors θ_i − θ_0 and needs the base model",
                where="base_model",
                fix="set base_model: <folder of the model the checkpoints were fine-tuned from>",
            )
        )
    lineages = []
    for c in [*checkpoints, *([base] if base is not None else [])]:
        with col.collect():
            lineages.append(model_lineage("base_model" if c is base else c.name, c.path))
    with col.collect():
        b.warnings += check_bases(lineages, allow=recipe.allow_mixed_bases, kind="architecture")
    base_index = None
    if base is not None:
        with col.collect():
            base_index = _index(len(checkpoints), base)
    if base_index is not None:
        missing = sorted(set(indexes[0]) - set(base_index))
        if missing:
            col.add(
                PlanError(
                    f"base_model lacks {len(missing)} tensor(s) of the checkpoints, e.g. "
                    f"{missing[0]}",
                    where="base_model",
                    fix="use the base model these checkpoints were fine-tuned from",
                )
            )
            base_index = None
    if not keys_match:
        return None
    files = checkpoints[0].files
    tasks: list[tuple[tuple[int, int], Task]] = []
    for key, ref0 in indexes[0].items():
        with col.collect():
            refs = [idx[key] for idx in indexes]
            uses = method.needs_base or method.uses_base
            bref = base_index[key] if base_index is not None and uses else None
            task = b.full_task(key, refs, bref, _aux_refs(aux, key, ref0.info.shape))
            tasks.append((_order_key(refs, files), task))
    return b.finish(
        tasks,
        adapter_config={},
        lora_mode="factors",
        kind="full",
        base=base,
        shard_size=parse_size(recipe.output.shard_size),
    )


def _lora_mode(recipe: Recipe, method: MergeMethod) -> LoraMode:
    # The same rules (and words) as the recipe's own space checks, which see only what the
    # recipe writes: here the default lora_space counts too, since the inputs are adapters.
    if recipe.lora_space == "factors":
        if "factors" not in method.spaces:
            # Averaging A and B is only the method for weighted averages: a scale or λ on
            # both factors would scale ΔW twice (scale² for passthrough, λ² for task vectors).
            msg, fix = lora_space_problem(method, "factors")
            if method.linear:
                fix = "use lora_space: delta with delta_rank: concat (exact)"
            raise PlanError(msg, where="lora_space", fix=fix)
        return "factors"
    if "delta" not in method.spaces:
        msg, fix = lora_space_problem(method, "delta")
        raise PlanError(msg, where="lora_space", fix=fix)
    if recipe.delta_rank == "full":
        return "full"
    if method.linear:
        return "concat" if recipe.delta_rank == "concat" else "svd"
    if recipe.delta_rank == "concat":
        msg, fix = lora_space_problem(method, "concat")
        raise PlanError(msg, where="delta_rank", fix=fix)
    return "dense"


def _step_zero_warnings(
    recipe: Recipe, params: BaseModel, checkpoints: Sequence[Checkpoint]
) -> list[str]:
    """MWA by step (as the method or as ``weighting:``) meeting a step-0 adapter (B = 0)."""
    from mwakit.methods import mwa

    if recipe.weighting is not None:
        p: BaseModel | None = layer_params.resolve(mwa.Params, recipe.weighting.mwa, 0.0)
    else:
        p = params if isinstance(params, mwa.Params) else None
    if not isinstance(p, mwa.Params) or p.metric != "step":
        return []
    steps = [c.metrics.get("step", math.nan) for c in checkpoints]
    return step_zero_warnings(
        [c.name for c in checkpoints], steps, p.penalty, transform=p.transform
    )


def _plan_adapters(b: _Builder, indexes: Sequence[Index], aux: list[Index] | None) -> Plan | None:
    recipe, method, checkpoints, col = b.recipe, b.method, b.checkpoints, b.problems
    configs: list[AdapterConfig] = []
    for c in checkpoints:
        with col.collect():
            configs.append(read_adapter_config(c.path))
    if len(configs) < len(checkpoints):
        return None  # ranks and scalings come from the configs
    with col.collect():
        _check_compatible(checkpoints, configs)
    with col.collect():
        lineages = [
            adapter_lineage(c.name, cfg.base_model)
            for c, cfg in zip(checkpoints, configs, strict=True)
        ]
        b.warnings += check_bases(lineages, allow=recipe.allow_mixed_bases, kind="base model")
    if configs[0].use_dora:
        b.warnings.append(
            "DoRA magnitude vectors are averaged linearly; an exact DoRA merge needs the base "
            "weights"
        )
    # A mode the method cannot use is recorded; planning goes on in the nearest mode it can,
    # to find the other problems.
    mode: LoraMode = "dense" if not method.linear else "factors"
    with col.collect():
        mode = _lora_mode(recipe, method)
    if mode != "factors" and configs[0].raw.get("target_parameters"):
        col.add(
            PlanError(
                "target_parameters (MoE expert) adapters store A and B in an r·E layout that "
                "delta space does not support yet",
                where=checkpoints[0].name,
                fix="use lora_space: factors",
            )
        )
    b.warnings += _step_zero_warnings(recipe, b.params, checkpoints)

    modules: dict[str, dict[str, str]] = {}
    full_keys: list[str] = []
    for key in indexes[0]:
        role = lora_role(key)
        if role is None:
            full_keys.append(key)
        else:
            modules.setdefault(role[0], {})[role[1]] = key

    files = checkpoints[0].files
    tasks: list[tuple[tuple[int, int], Task]] = []
    for key in full_keys:
        with col.collect():
            refs = [idx[key] for idx in indexes]
            task = b.full_task(key, refs, None, _aux_refs(aux, key, refs[0].info.shape))
            tasks.append((_order_key(refs, files), task))

    module_ranks: dict[str, int] = {}
    for module, roles in modules.items():
        with col.collect():
            if "A" not in roles or "B" not in roles:
                raise PlanError(
                    f"LoRA module has only {', '.join(sorted(roles))}",
                    where=f"{checkpoints[0].name} {module}",
                    fix="the adapter file is incomplete; restore it from training",
                )
            lora = _lora_task(module, roles, checkpoints, configs, indexes, mode, b, aux)
            module_ranks[module] = lora.rank
            tasks.append((_order_key(lora.a, files), lora))

    if b.rescaled:
        mixed = len({cfg.use_rslora for cfg in configs}) > 1
        n = len(b.rescaled)
        b.warnings.append(
            f"scalings differ across checkpoints in {n} LoRA module{'s' if n > 1 else ''} "
            f"(e.g. {b.rescaled[0]})"
            + ("; rsLoRA (α/√r) and plain LoRA (α/r) adapters are mixed" if mixed else "")
            + "; each B is rescaled by s_i/s_out before averaging"
        )
    if len(module_ranks) < len(modules):
        return None  # a module was refused: there is no config to write
    cfg: dict[str, Any] = {}
    with col.collect():
        cfg = output_config(
            configs[0],
            module_ranks=None if mode == "factors" else module_ranks,
            target_modules=_union_targets(configs),
        )
    return b.finish(tasks, adapter_config=cfg, lora_mode=mode)


def _union_targets(configs: Sequence[AdapterConfig]) -> Any:
    first = configs[0].raw.get("target_modules")
    if all(c.raw.get("target_modules") == first for c in configs):
        return first
    if all(isinstance(c.raw.get("target_modules"), list) for c in configs):
        return sorted({m for c in configs for m in c.raw["target_modules"]})
    raise PlanError(
        "target_modules differ and are not all lists (PEFT cannot mix a regex with a list)",
        where=str(configs[0].path),
        fix="merge adapters with the same target_modules",
    )


def _lora_task(
    module: str,
    roles: dict[str, str],
    checkpoints: Sequence[Checkpoint],
    configs: Sequence[AdapterConfig],
    indexes: Sequence[Index],
    mode: LoraMode,
    b: _Builder,
    aux: list[Index] | None,
) -> LoraTask:
    a_key, b_key, bias_key = roles["A"], roles["B"], roles.get("bias")
    ranks, scalings = [], []
    for c, cfg, idx in zip(checkpoints, configs, indexes, strict=True):
        for key in (a_key, b_key, bias_key):
            if key is not None:
                check_dtype(idx[key].info, f"{c.name} {key}", factor=True)
        a, bb = idx[a_key].info, idx[b_key].info
        # PEFT's layouts: linear/embedding A (r, in) with B (out, r), conv A (r, in, kh, kw)
        # with B (out, r, 1, 1). Anything else has no ΔW = B·A to merge.
        layout = (
            len(a.shape) >= 2
            and len(bb.shape) == len(a.shape)
            and all(d == 1 for d in bb.shape[2:])
            and 0 not in (*a.shape, *bb.shape)
        )
        if not layout:
            raise PlanError(
                f"lora_A has shape {list(a.shape)} and lora_B {list(bb.shape)}: not a LoRA "
                "layout (A (r, in) with B (out, r), or a conv's (r, in, kh, kw) with "
                "(out, r, 1, 1); no empty dimension)",
                where=f"{c.name} {module}",
                fix="the adapter file is inconsistent; restore it from training",
            )
        r = a.shape[0]
        if bb.shape[1] != r:
            raise PlanError(
                f"lora_A has rank {r} but lora_B has shape {list(bb.shape)}",
                where=f"{c.name} {module}",
                fix="the adapter file is inconsistent; restore it from training",
            )
        if cfg.rank(module) != r:
            raise PlanError(
                f"adapter_config.json says rank {cfg.rank(module)} but the tensors have rank {r}",
                where=f"{c.name} {module}",
                fix="restore the adapter_config.json saved with these weights",
            )
        ranks.append(r)
        scalings.append(cfg.scaling(module, r))

    def fixed_dims(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        # Everything but the rank: A is (r, in, ...), B is (out, r, ...).
        return shape[1:] if key == a_key else (shape[0], *shape[2:])

    for c, idx in zip(checkpoints[1:], indexes[1:], strict=True):
        for key in (a_key, b_key):
            got, want = idx[key].info.shape, indexes[0][key].info.shape
            if fixed_dims(key, got) != fixed_dims(key, want):
                raise PlanError(
                    f"shape {list(got)} does not fit {list(want)} of {checkpoints[0].name}",
                    where=f"{c.name} {key}",
                    fix="merge adapters of the same base model",
                )
    if mode == "factors":
        if len(set(ranks)) > 1:
            raise PlanError(
                f"ranks differ ({' vs '.join(map(str, sorted(set(ranks))))}) "
                "and factor averaging needs equal ranks",
                where=module,
                fix="use lora_space: delta",
            )
        rank, out_scaling = ranks[0], scalings[0]
        if any(not math.isclose(s, out_scaling, rel_tol=1e-12) for s in scalings):
            b.rescaled.append(module)
    elif mode == "full":
        rank = full_rank(indexes[0][a_key].info.shape, indexes[0][b_key].info.shape)
        out_scaling = 1.0
    else:
        cap = full_rank(indexes[0][a_key].info.shape, indexes[0][b_key].info.shape)
        asked = b.recipe.delta_rank
        # (A non-int delta_rank here is a mode already refused: plan on to find the rest.)
        rank = sum(ranks) if mode == "concat" else asked if isinstance(asked, int) else cap
        if mode != "concat" and rank > cap:
            # More than min(out, in) columns can only be zeros: give the module its full rank
            # (its SVD is then exact), and say so once for all modules.
            b.clamped[module] = rank = cap
        out_scaling = 1.0
    weights, params, rule = b.settings([module, a_key, b_key])
    names = [c.name for c in checkpoints]
    check_weights([w * s for w, s in zip(weights, scalings, strict=True)], names, b.recipe.dtype)
    check_weights(
        [w * s / out_scaling for w, s in zip(weights, scalings, strict=True)],
        names,
        b.recipe.dtype,
    )
    a0, b0 = indexes[0][a_key].info, indexes[0][b_key].info
    out_a = OutTensor(a_key, b.out_dtype or a0.dtype, (rank, *a0.shape[1:]))
    out_b = OutTensor(b_key, b.out_dtype or b0.dtype, (b0.shape[0], rank, *b0.shape[2:]))
    bias_refs, out_bias = None, None
    if bias_key is not None:
        bias_refs = tuple(idx[bias_key] for idx in indexes)
        bi = indexes[0][bias_key].info
        out_bias = OutTensor(bias_key, b.out_dtype or bi.dtype, bi.shape)
    a_refs = tuple(idx[a_key] for idx in indexes)
    b_refs = tuple(idx[b_key] for idx in indexes)
    use_aux = mode == "factors" and aux is not None
    return LoraTask(
        module=module,
        a=a_refs,
        b=b_refs,
        bias=bias_refs,
        scalings=tuple(scalings),
        out_scaling=out_scaling,
        mode=mode,
        rank=rank,
        weights=weights,
        params=params,
        rule=rule,
        out_a=out_a,
        out_b=out_b,
        out_bias=out_bias,
        aux_a=_aux_refs(aux, a_key, a0.shape) if use_aux else None,
        aux_b=_aux_refs(aux, b_key, b0.shape) if use_aux else None,
    )


def output_entries(plan: Plan) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype code, shape) of every tensor the plan writes."""
    return [(o.key, o.dtype, o.shape) for o in plan.outputs]


def out_metadata(plan: Plan) -> dict[str, str]:
    """The ``__metadata__`` of every file the plan writes."""
    return {"format": "pt", "mwakit_version": __version__, "mwakit_method": plan.method.name}
