"""The Python API: load a recipe, plan it, run it. The CLI is a thin layer over these."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mwakit.card import RESOLVED_RECIPE, render_card, resolved_recipe
from mwakit.io.atomic import atomic_output_dir, check_target
from mwakit.planner import Plan, Task, build_plan
from mwakit.recipe import Recipe, dump_recipe, load_recipe
from mwakit.sources import resolve

if TYPE_CHECKING:
    from mwakit.execute import ExecStats

ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class RunResult:
    """What `run` produced."""

    path: Path
    plan: Plan
    stats: ExecStats


def _as_recipe(recipe: Recipe | str | Path) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def plan(recipe: Recipe | str | Path) -> Plan:
    """Resolve the checkpoints and plan the merge, reading headers only.

    Args:
        recipe: A validated `Recipe`, or the path of a recipe YAML file.

    Raises:
        MwakitError: Any recipe, source, metric or plan problem.
    """
    r = _as_recipe(recipe)
    return build_plan(r, resolve(r))


def run(
    recipe: Recipe | str | Path,
    *,
    output: str | Path | None = None,
    overwrite: bool | None = None,
    on_task: Callable[[int, Task], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
) -> RunResult:
    """Plan and execute a merge into an output folder, atomically.

    The folder holds ``adapter_model.safetensors``, ``adapter_config.json``, ``README.md`` (the
    model card) and ``mwakit.yaml`` (the resolved recipe). It appears only when complete: a
    failure or Ctrl-C leaves no output folder behind.

    Args:
        recipe: A validated `Recipe`, or the path of a recipe YAML file.
        output: Overrides ``output.path``.
        overwrite: Overrides ``output.overwrite``.
        on_task: Progress callback, called after each tensor group is written.
        on_plan: Called once with the plan, before any tensor byte is read.

    Raises:
        MwakitError: Any recipe, source, metric, plan, tensor or output problem.
    """
    r = _as_recipe(recipe)
    if output is not None or overwrite is not None:
        out = r.output.model_copy(
            update={
                **({"path": str(output)} if output is not None else {}),
                **({"overwrite": overwrite} if overwrite is not None else {}),
            }
        )
        r = r.model_copy(update={"output": out})
    target = Path(r.output.path)
    check_target(target, r.output.overwrite)
    p = build_plan(r, resolve(r))
    if on_plan is not None:
        on_plan(p)
    from mwakit.execute import execute  # torch is imported only when a merge really runs

    with atomic_output_dir(target, r.output.overwrite) as tmp:
        stats = execute(p, tmp / ADAPTER_WEIGHTS, on_task=on_task)
        (tmp / "adapter_config.json").write_text(
            json.dumps(p.adapter_config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        text = dump_recipe(resolved_recipe(p))
        (tmp / RESOLVED_RECIPE).write_text(text, encoding="utf-8")
        (tmp / "README.md").write_text(render_card(p, text, stats.rel_errors), encoding="utf-8")
    return RunResult(path=target, plan=p, stats=stats)
