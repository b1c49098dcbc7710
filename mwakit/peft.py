"""An exact in-memory merge on a loaded `peft.PeftModel`: `merge_adapters`.

PEFT's ``add_weighted_adapter`` builds the merged adapter's config from the first adapter's, so
rsLoRA inputs come out scaled by √r instead of 1, and ``rank_pattern``/``alpha_pattern`` and
negative weights are handled unevenly across its combination types (PEFT #3004, #3761, #3737).
`merge_adapters` instead runs the very planner and methods ``mwakit run`` uses: each adapter's
own scaling s_i = α_i/r_i (α_i/√r_i with rsLoRA, per module through the patterns) is folded into
the merged factors, which are written with scaling 1 (α = r per module), so the merged ΔW is
exactly Σ_i w_i s_i B_i A_i in ``delta_rank: concat`` (or its best rank-k approximation, or the
method's ΔW for task-vector methods).

The adapters' tensors are taken from the model (``get_peft_model_state_dict``), laid out as PEFT
saves them in a private temporary folder, planned and merged there, and the result is loaded
back as a new adapter of the same model (``load_adapter``): the same bytes a ``mwakit run`` of
the same recipe writes, loaded the way PEFT loads any saved adapter. Only adapter-sized data is
written; the base model is never copied.
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mwakit.errors import PlanError, UsageError

if TYPE_CHECKING:
    from mwakit.executors.stats import ExecStats
    from mwakit.planner import Plan

__all__ = ["AdapterMerge", "merge_adapters"]

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class AdapterMerge:
    """What `merge_adapters` added to the model.

    Attributes:
        name: The new adapter's name (``model.set_adapter(name)`` activates it).
        adapters: The adapters merged, in order.
        plan: The plan it was merged with: per-checkpoint ``weights``, ``warnings``, and the
            ``adapter_config`` the new adapter was loaded with.
        stats: The execution's statistics; ``stats.rel_errors`` holds the relative Frobenius
            error of each re-factorised module (``delta_rank`` a number).
    """

    name: str
    adapters: tuple[str, ...]
    plan: Plan
    stats: ExecStats

    @property
    def weights(self) -> dict[str, float]:
        """The weight each input adapter got (after the method's normalisation), by name."""
        return dict(zip(self.adapters, self.plan.weights, strict=True))


def _check_model(model: Any, adapters: Sequence[str], name: str) -> None:
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise UsageError(
            f"merge_adapters needs a peft.PeftModel, got {type(model).__name__}",
            where="model",
            fix="load the adapters with PeftModel.from_pretrained(base, path, adapter_name=...) "
            "and model.load_adapter(path, adapter_name=...)",
        )
    if isinstance(adapters, str) or not adapters:
        raise UsageError(
            "adapters must be a non-empty list of adapter names",
            where="adapters",
            fix='pass e.g. adapters=["a", "b"]',
        )
    known = list(model.peft_config)
    missing = [a for a in adapters if a not in known]
    if missing:
        raise UsageError(
            f"no adapter named {missing[0]!r} in the model (it has {', '.join(known)})",
            where="adapters",
            fix="load it first with model.load_adapter(path, adapter_name=...)",
        )
    if len(set(adapters)) != len(adapters):
        raise UsageError(
            "an adapter is listed twice",
            where="adapters",
            fix="list each adapter once; give it more weight instead",
        )
    if name in known:
        raise UsageError(
            f"the model already has an adapter named {name!r}",
            where="name",
            fix="pick a new name, or model.delete_adapter(name) first",
        )
    for a in adapters:
        peft_type = str(getattr(model.peft_config[a], "peft_type", "")).rsplit(".", 1)[-1]
        if peft_type.upper() != "LORA":
            raise PlanError(
                f"adapter type {peft_type or 'unknown'} is not supported (only LORA is linear in "
                "its stored factors)",
                where=a,
                fix="merge LoRA adapters; for other types use PEFT's own merge tools",
            )


def _save_adapter(model: Any, adapter: str, folder: Path) -> None:
    """Lay one loaded adapter out as PEFT's ``save_pretrained`` would (weights + config)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    state = get_peft_model_state_dict(model, adapter_name=adapter)
    # Detached CPU copies: the live parameters may sit on a GPU, and safetensors refuses
    # tensors that share storage (a tied modules_to_save weight).
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    model.peft_config[adapter].save_pretrained(str(folder))


def _metrics_for(
    metrics: Sequence[Mapping[str, float]] | Mapping[str, Mapping[str, float]] | None,
    adapters: Sequence[str],
) -> list[dict[str, float] | None]:
    if metrics is None:
        return [None] * len(adapters)
    if isinstance(metrics, Mapping):
        unknown = [k for k in metrics if k not in adapters]
        if unknown:
            raise UsageError(
                f"metrics given for {unknown[0]!r}, which is not among the adapters merged",
                where="metrics",
                fix="key metrics by the names in adapters=",
            )
        return [dict(metrics[a]) if a in metrics else None for a in adapters]
    if len(metrics) != len(adapters):
        raise UsageError(
            f"{len(metrics)} metrics entries for {len(adapters)} adapters",
            where="metrics",
            fix="give one mapping of metrics per adapter, in the order of adapters=",
        )
    return [dict(m) for m in metrics]


def merge_adapters(
    model: Any,
    adapters: Sequence[str],
    weights: Sequence[float] | None = None,
    *,
    method: str = "linear",
    lora_space: str = "delta",
    delta_rank: str | int = "concat",
    name: str = "merged",
    metrics: Sequence[Mapping[str, float]] | Mapping[str, Mapping[str, float]] | None = None,
    rules: Sequence[Mapping[str, Any]] | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    **params: Any,
) -> AdapterMerge:
    """Merge adapters of a loaded `PeftModel` into a new adapter of the same model.

    The merge is the one ``mwakit run`` does for a recipe with these adapters as
    ``checkpoints:`` and the same method, params, weights and LoRA space, so the new adapter's
    tensors equal the ``adapter_model.safetensors`` that run writes. With the defaults
    (``method="linear"``, ``lora_space="delta"``, ``delta_rank="concat"``) the merged update is
    exact: ΔW = Σ_i w_i ΔW_i with each adapter's own scaling (rsLoRA, ``rank_pattern``,
    ``alpha_pattern``), at rank Σ r_i.

    Weights mean what they mean in a recipe: ``linear`` normalises them to sum 1 unless
    ``normalize=False`` (then they are raw coefficients, as in PEFT's ``add_weighted_adapter``,
    and may be negative: ``[1, -1]`` is ΔW_a − ΔW_b); ``task_arithmetic`` scales them by λ;
    ``mwa`` computes them from ``metrics``.

    Args:
        model: A `peft.PeftModel` holding every adapter in ``adapters``.
        adapters: The names of the LoRA adapters to merge, in order.
        weights: One weight per adapter (None: the method's default, uniform for linear).
        method: Any registered merge method (`mwakit methods` lists them).
        lora_space: ``delta`` (merge ΔW exactly) or ``factors`` (average A and B).
        delta_rank: With ``delta``: ``concat`` (exact, rank Σr), ``full`` (the merged ΔW as
            full-rank factors) or a rank to re-factorise to (required by TIES, DARE, …).
        name: The new adapter's name; it must not exist yet.
        metrics: Metrics per adapter for ``mwa`` (a list in the order of ``adapters``, or a
            mapping by adapter name), e.g. ``[{"eval_loss": 1.2}, {"eval_loss": 1.1}]``.
        rules: Per-tensor overrides, as the recipe's ``rules:`` (``{"match", "params"}``).
        dtype: The merge's precision (``float32``, ``float64``, ``bfloat16``, ``float16``).
        device: Where the merge computes (``cpu``, ``cuda``, ``auto``).
        **params: The method's params (``normalize=False``, ``density=0.5``, ``penalty=2``…).

    Returns:
        The new adapter's name, the plan and the statistics. The model's active adapter is not
        changed: call ``model.set_adapter(name)`` to use the merge.

    Raises:
        UsageError: Not a PeftModel, an unknown or repeated adapter, a taken name, or metrics
            that do not fit the adapters.
        MwakitError: What ``mwakit run`` would refuse for the same recipe (a method that cannot
            work in the space, ranks that differ in factor space, weights that sum to 0 …),
            with the recipe key that is wrong.
    """
    from mwakit.api import plan as make_plan
    from mwakit.recipe import parse_recipe

    adapters = list(adapters)
    _check_model(model, adapters, name)
    if weights is not None and len(weights) != len(adapters):
        raise UsageError(
            f"{len(weights)} weights for {len(adapters)} adapters",
            where="weights",
            fix="give one weight per adapter, in the order of adapters=",
        )
    per_adapter = _metrics_for(metrics, adapters)
    with tempfile.TemporaryDirectory(prefix="mwakit-merge-") as tmp:
        root = Path(tmp)
        checkpoints: list[dict[str, Any]] = []
        for i, adapter in enumerate(adapters):
            # The folder's name is what messages call the checkpoint: the adapter's name.
            folder = root / str(i) / (_SAFE.sub("_", adapter) or f"adapter-{i}")
            _save_adapter(model, adapter, folder)
            spec: dict[str, Any] = {"path": str(folder)}
            if weights is not None:
                spec["weight"] = float(weights[i])
            if per_adapter[i] is not None:
                spec["metrics"] = per_adapter[i]
            checkpoints.append(spec)
        data: dict[str, Any] = {
            "method": method,
            "params": dict(params),
            "checkpoints": checkpoints,
            "lora_space": lora_space,
            "dtype": dtype,
            "device": device,
            # The adapters already sit on one loaded model: configs that name its base
            # differently (a Hub id and a local copy) warn instead of refusing.
            "allow_mixed_bases": True,
            "output": {"path": str(root / "merged")},
        }
        if lora_space == "delta":
            data["delta_rank"] = delta_rank
        if rules:
            data["rules"] = [dict(r) for r in rules]
        recipe = parse_recipe(data, source="merge_adapters")
        p = make_plan(recipe)
        for w in p.warnings:
            warnings.warn(f"merge_adapters: {w}", UserWarning, stacklevel=2)
        out = root / "merged"
        out.mkdir()
        from mwakit.execute import execute  # torch is imported only when a merge runs

        stats = execute(p, out)
        (out / "adapter_config.json").write_text(
            json.dumps(p.adapter_config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        model.load_adapter(str(out), adapter_name=name)
    return AdapterMerge(name=name, adapters=tuple(adapters), plan=p, stats=stats)
