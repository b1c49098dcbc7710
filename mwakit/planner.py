"""The plan: frozen data saying how every output tensor is made, built from headers only.

Reads ``adapter_config.json`` and safetensors headers (never tensor bytes), checks that the
checkpoints fit together, resolves per-tensor rules and weights, and orders the work in input
file order. Any mismatch fails here, naming checkpoint, key and fix, before a byte is read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from mwakit.adapters import AdapterConfig, lora_role, output_config, read_adapter_config
from mwakit.errors import PlanError
from mwakit.io.header import FileHeader, TensorInfo, dtype_code, is_float_code, read_header
from mwakit.methods import MergeMethod, get_method
from mwakit.methods.registry import CheckpointView
from mwakit.recipe import Recipe, Rule
from mwakit.sources import Checkpoint

LoraMode = Literal["factors", "concat", "svd"]


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

    @property
    def outputs(self) -> list[OutTensor]:
        """Every output tensor."""
        out: list[OutTensor] = []
        for t in self.tasks:
            out.extend(t.outputs if isinstance(t, LoraTask) else (t.out,))
        return out

    @property
    def base_model(self) -> str | None:
        """The base model the adapters were trained on."""
        v = self.adapter_config.get("base_model_name_or_path")
        return str(v) if v else None

    def to_json(self) -> dict[str, Any]:
        """The plan as a JSON-ready document (what `mwakit plan --json` prints)."""
        in_bytes = sum(r.info.nbytes for t in self.tasks for r in t.inputs)
        return {
            "method": self.method.name,
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
            "tensors": [_task_json(t) for t in self.tasks],
            "summary": {
                "tasks": len(self.tasks),
                "lora_modules": sum(isinstance(t, LoraTask) for t in self.tasks),
                "full_tensors": sum(isinstance(t, FullTask) and not t.copy for t in self.tasks),
                "copied_tensors": sum(isinstance(t, FullTask) and t.copy for t in self.tasks),
                "input_bytes": in_bytes,
                "output_bytes": sum(_nbytes(o) for o in self.outputs),
            },
            "adapter_config": self.adapter_config,
            "warnings": list(self.warnings),
        }


def _nbytes(o: OutTensor) -> int:
    from mwakit.io.header import DTYPE_SIZES

    return math.prod(o.shape) * DTYPE_SIZES[o.dtype]


def _task_json(t: Task) -> dict[str, Any]:
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


def _check_keys(checkpoints: Sequence[Checkpoint], headers: Sequence[FileHeader]) -> None:
    keys0 = set(headers[0].tensors)
    for c, h in zip(checkpoints[1:], headers[1:], strict=True):
        keys = set(h.tensors)
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
                fix="merge checkpoints of the same adapter layout (same target_modules and "
                "modules_to_save)",
            )


def build_plan(recipe: Recipe, checkpoints: Sequence[Checkpoint]) -> Plan:
    """Plan a merge from the recipe and resolved checkpoints, reading headers only.

    Raises:
        PlanError: Checkpoints do not fit together, or the recipe asks for something the
            method or adapters cannot do.
        MetricError: A weight cannot be computed from the metrics.
        SourceError: A header or config is unreadable.
    """
    method = get_method(recipe.method)
    params = recipe.method_params()
    configs = [read_adapter_config(c.path) for c in checkpoints]
    _check_compatible(checkpoints, configs)
    headers = [read_header(c.weights_file) for c in checkpoints]
    _check_keys(checkpoints, headers)

    warnings: list[str] = []
    if configs[0].use_dora:
        warnings.append(
            "DoRA magnitude vectors are averaged linearly; an exact DoRA merge needs the base "
            "weights"
        )
    if recipe.lora_space == "factors" and not method.linear:
        raise PlanError(
            f"method {method.name} acts on ΔW, not on LoRA factors",
            where="lora_space",
            fix="use lora_space: delta",
        )
    mode: LoraMode = (
        "factors"
        if recipe.lora_space == "factors"
        else "concat"
        if recipe.delta_rank == "concat"
        else "svd"
    )
    if mode != "factors" and configs[0].raw.get("target_parameters"):
        raise PlanError(
            "target_parameters (MoE expert) adapters store A and B in an r·E layout that "
            "delta space does not support yet",
            where=checkpoints[0].name,
            fix="use lora_space: factors",
        )

    views = [CheckpointView(c.name, c.metrics, c.weight) for c in checkpoints]
    rule_params = [recipe.method_params(r) for r in recipe.rules]
    default_weights = tuple(method.weigh(params, views))
    rule_weights = [tuple(method.weigh(p, views)) for p in rule_params]
    used_rules: set[int] = set()
    for c, w in zip(checkpoints, default_weights, strict=True):
        if c.metrics.get("step") == 0 and w == 0 and recipe.method == "mwa":
            warnings.append(f"{c.name}: step 0 gets weight 0 (a step-0 LoRA has B = 0)")

    def settings(names: Sequence[str]) -> tuple[tuple[float, ...], BaseModel, str | None]:
        i = _rule_for(recipe.rules, names)
        if i is None:
            return default_weights, params, None
        used_rules.add(i)
        return rule_weights[i], rule_params[i], recipe.rules[i].match

    out_dtype = dtype_code(recipe.out_dtype) if recipe.out_dtype else None
    keys0 = headers[0].tensors
    modules: dict[str, dict[str, str]] = {}
    full_keys: list[str] = []
    for key in keys0:
        role = lora_role(key)
        if role is None:
            full_keys.append(key)
        else:
            modules.setdefault(role[0], {})[role[1]] = key

    tasks: list[tuple[int, Task]] = []
    for key in full_keys:
        infos = [h.tensors[key] for h in headers]
        for c, info in zip(checkpoints[1:], infos[1:], strict=True):
            if info.shape != infos[0].shape:
                raise PlanError(
                    f"shape {list(info.shape)} differs from {list(infos[0].shape)} in "
                    f"{checkpoints[0].name}",
                    where=f"{c.name} {key}",
                    fix="merge checkpoints of the same model",
                )
        copy = not is_float_code(infos[0].dtype)
        weights, p, rule = settings([key])
        refs = tuple(
            TensorRef(i, c.weights_file, info)
            for i, (c, info) in enumerate(zip(checkpoints, infos, strict=True))
        )
        dtype = infos[0].dtype if copy or out_dtype is None else out_dtype
        task = FullTask(OutTensor(key, dtype, infos[0].shape), refs, weights, p, rule, copy)
        tasks.append((infos[0].start, task))

    module_ranks: dict[str, int] = {}
    for module, roles in modules.items():
        if "A" not in roles or "B" not in roles:
            raise PlanError(
                f"LoRA module has only {', '.join(sorted(roles))}",
                where=f"{checkpoints[0].name} {module}",
                fix="the adapter file is incomplete; restore it from training",
            )
        lora = _lora_task(
            module,
            roles,
            checkpoints,
            configs,
            headers,
            mode,
            recipe,
            settings,
            out_dtype,
            warnings,
        )
        module_ranks[module] = lora.rank
        tasks.append((lora.a[0].info.start, lora))

    unused = [r.match for i, r in enumerate(recipe.rules) if i not in used_rules]
    warnings += [f"rule {m!r} matches no tensor" for m in unused]
    target_modules = _union_targets(configs)
    cfg = output_config(
        configs[0],
        module_ranks=None if mode == "factors" else module_ranks,
        target_modules=target_modules,
    )
    ordered = tuple(t for _, t in sorted(tasks, key=lambda st: st[0]))
    return Plan(
        recipe=recipe,
        method=method,
        params=params,
        checkpoints=tuple(checkpoints),
        weights=default_weights,
        tasks=ordered,
        adapter_config=cfg,
        lora_mode=mode,
        warnings=tuple(warnings),
    )


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
    headers: Sequence[FileHeader],
    mode: LoraMode,
    recipe: Recipe,
    settings: Any,
    out_dtype: str | None,
    warnings: list[str],
) -> LoraTask:
    a_key, b_key, bias_key = roles["A"], roles["B"], roles.get("bias")
    ranks, scalings = [], []
    for c, cfg, h in zip(checkpoints, configs, headers, strict=True):
        a, b = h.tensors[a_key], h.tensors[b_key]
        r = a.shape[0]
        if len(b.shape) < 2 or b.shape[1] != r:
            raise PlanError(
                f"lora_A has rank {r} but lora_B has shape {list(b.shape)}",
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

    for c, h in zip(checkpoints[1:], headers[1:], strict=True):
        for key in (a_key, b_key):
            got, want = h.tensors[key].shape, headers[0].tensors[key].shape
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
            warnings.append(
                f"{module}: scalings differ across checkpoints; each B is rescaled by s_i/s_out "
                "before averaging"
            )
    else:
        rank = sum(ranks) if mode == "concat" else int(recipe.delta_rank)
        out_scaling = 1.0
    weights, params, rule = settings([module, a_key, b_key])
    a0, b0 = headers[0].tensors[a_key], headers[0].tensors[b_key]
    out_a = OutTensor(a_key, out_dtype or a0.dtype, (rank, *a0.shape[1:]))
    out_b = OutTensor(b_key, out_dtype or b0.dtype, (b0.shape[0], rank, *b0.shape[2:]))
    bias_refs, out_bias = None, None
    if bias_key is not None:
        bias_refs = tuple(
            TensorRef(i, c.weights_file, h.tensors[bias_key])
            for i, (c, h) in enumerate(zip(checkpoints, headers, strict=True))
        )
        bi = headers[0].tensors[bias_key]
        out_bias = OutTensor(bias_key, out_dtype or bi.dtype, bi.shape)

    def refs(key: str) -> tuple[TensorRef, ...]:
        return tuple(
            TensorRef(i, c.weights_file, h.tensors[key])
            for i, (c, h) in enumerate(zip(checkpoints, headers, strict=True))
        )

    return LoraTask(
        module=module,
        a=refs(a_key),
        b=refs(b_key),
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
    )
