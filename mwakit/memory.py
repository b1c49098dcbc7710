"""Merge in memory: the tensors `mwakit run` would write, without writing them.

Tuning scores many candidate merges; each goes through the very plan and methods of `mwakit
run` (`mwakit.execute.execute` with a `MemorySink`), so a scored candidate is, tensor for
tensor, the adapter that running its recipe writes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mwakit.planner import Plan
from mwakit.recipe import Recipe

if TYPE_CHECKING:
    import torch

    from mwakit.executors.stats import ExecStats
    from mwakit.io.cache import InputCache


@dataclass(frozen=True)
class MergedAdapter:
    """A merge held in memory.

    Attributes:
        tensors: Exactly what `mwakit run` writes into ``adapter_model.safetensors`` (a full
            model: into ``model.safetensors``): the same keys, dtypes and values, on the CPU.
        adapter_config: What `mwakit run` writes as ``adapter_config.json`` (empty for a full
            model).
        kind: ``adapter`` or ``full``.
        base_model: The adapters' ``base_model_name_or_path`` (a full merge's ``base_model``).
        stats: What the execution did (wall time, bytes read).
    """

    tensors: dict[str, torch.Tensor]
    adapter_config: dict[str, Any]
    kind: Literal["adapter", "full"] = "adapter"
    base_model: str | None = None
    stats: ExecStats | None = None


def merge_in_memory(
    plan: Plan | Recipe | str | Path, *, cache: InputCache | None = None
) -> MergedAdapter:
    """Execute a merge into memory: nothing is written to disk.

    Args:
        plan: A plan (from `mwakit.plan`), or a recipe / recipe file, planned and checked
            first exactly as `mwakit run` does.
        cache: Input tensors kept across merges (`mwakit.io.cache.InputCache`): merging the
            same checkpoints again reads nothing from disk. The merged tensors never share
            memory with it.

    Returns:
        The merged tensors and adapter config, equal to what `mwakit run` writes.

    Raises:
        MwakitError: Any recipe, source, plan or tensor problem (as `mwakit run`).
    """
    from mwakit.execute import MemorySink, execute

    if not isinstance(plan, Plan):
        from mwakit.api import plan as make_plan

        plan = make_plan(plan)
    sink = MemorySink()
    stats = execute(plan, None, sink=sink, cache=cache)
    # The plan's adapter config is shared with the plan object: a caller editing the result
    # must not change what a later `run` of the same plan writes.
    config = copy.deepcopy(plan.adapter_config) if plan.kind == "adapter" else {}
    return MergedAdapter(
        tensors=sink.tensors,
        adapter_config=config,
        kind=plan.kind,
        base_model=plan.base_model,
        stats=stats,
    )
