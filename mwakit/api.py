"""The Python API: load a recipe, plan it, run it. The CLI is a thin layer over these."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mwakit.card import RESOLVED_RECIPE, render_card, resolved_recipe
from mwakit.io.atomic import atomic_output_dir, check_target
from mwakit.planner import Plan, Task, build_plan
from mwakit.recipe import Recipe, dump_recipe, load_recipe
from mwakit.sources import resolve, resolve_base

if TYPE_CHECKING:
    from mwakit.execute import ExecStats

ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: Files of a full model that travel with the merged weights (from the base, else the first).
_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def copy_model_files(p: Plan, out: Path) -> None:
    """Copy config and tokenizer files of the base (or first) checkpoint into ``out``.

    ``config.json`` gets the written dtype, so loaders pick the right one.
    """
    src = p.base.path if p.base is not None else p.checkpoints[0].path
    for name in _MODEL_FILES:
        f = src / name
        if not f.is_file():
            continue
        if name == "config.json" and p.recipe.out_dtype:
            cfg = json.loads(f.read_text(encoding="utf-8"))
            cfg["torch_dtype"] = p.recipe.out_dtype
            if "dtype" in cfg:
                cfg["dtype"] = p.recipe.out_dtype
            (out / name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(f, out / name)


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
    return build_plan(r, resolve(r), resolve_base(r))


def run(
    recipe: Recipe | str | Path,
    *,
    output: str | Path | None = None,
    overwrite: bool | None = None,
    on_task: Callable[[int, Task], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
) -> RunResult:
    """Plan and execute a merge into an output folder, atomically.

    An adapter folder holds ``adapter_model.safetensors`` and ``adapter_config.json``; a full
    model ``model.safetensors`` (or shards + index), ``config.json`` and tokenizer files. Both
    get ``README.md`` (the model card) and ``mwakit.yaml`` (the resolved recipe). The folder
    appears only when complete: a failure or Ctrl-C leaves no output folder behind.

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
    p = build_plan(r, resolve(r), resolve_base(r))
    if on_plan is not None:
        on_plan(p)
    from mwakit.execute import execute  # torch is imported only when a merge really runs

    with atomic_output_dir(target, r.output.overwrite) as tmp:
        stats = execute(p, tmp, on_task=on_task)
        if p.kind == "full":
            copy_model_files(p, tmp)
        else:
            (tmp / "adapter_config.json").write_text(
                json.dumps(p.adapter_config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
        text = dump_recipe(resolved_recipe(p))
        (tmp / RESOLVED_RECIPE).write_text(text, encoding="utf-8")
        (tmp / "README.md").write_text(render_card(p, text, stats.rel_errors), encoding="utf-8")
    return RunResult(path=target, plan=p, stats=stats)
