"""Validate: the whole plan without tensor bytes, every problem at once.

`checked_plan` is the one road from a recipe to a plan: it resolves every source (a missing
folder does not hide the next one), reads configs, headers and metrics, and builds the plan,
recording every problem on the way (`mwakit.errors.Problems`). `mwakit validate`, `plan` and
`run` all take it, so the same inputs get the same verdict with the same messages. `validate`
adds a schema-only mode (the recipe file alone: no checkpoint read, no torch) and a summary.
No torch import here: configs and headers are JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mwakit.errors import Problems, RecipeError
from mwakit.planner import Plan, build_plan
from mwakit.recipe import CheckpointSpec, Recipe, load_recipe
from mwakit.sources import Checkpoint, checkpoint_specs, resolve, resolve_base
from mwakit.wording import lora_space, plural


def checked_plan(recipe: Recipe, *, source: str | None = None) -> Plan:
    """Resolve the checkpoints and plan the merge, reporting every problem at once.

    Args:
        recipe: The validated recipe.
        source: The recipe file, for messages.

    Returns:
        The plan (headers, configs and metrics read; no tensor bytes).

    Raises:
        MwakitError: The one problem found (`SourceError`, `MetricError`, `PlanError`, ...).
        RecipeError: Several problems, each with its location and fix.
    """
    source = source or recipe.source
    col = Problems()
    specs: list[CheckpointSpec] | None = None
    with col.collect():
        specs = checkpoint_specs(recipe)
    checkpoints: list[Checkpoint] = []
    if specs is not None:
        checkpoints = resolve(recipe, specs=specs, problems=col)
    base: Checkpoint | None = None
    with col.collect():
        base = resolve_base(recipe)
    if recipe.device.startswith("cuda"):
        # Only a CUDA device needs torch to check; cpu and auto always work.
        from mwakit.execute import resolve_device

        with col.collect():
            resolve_device(recipe.device)
    try:
        if specs is None:
            col.raise_if_any(source)  # nothing to plan: the run could not be listed
        plan = build_plan(
            recipe,
            checkpoints,
            base,
            problems=col,
            expected=None if specs is None else len(specs),
        )
        if recipe.output.format == "merged":
            from mwakit.bake import merged_base

            merged_base(plan)  # the base to bake into exists (and this is an adapter merge)
        return plan
    except RecipeError as err:
        if err.source is None and source is not None:
            raise RecipeError(err.problems, source=source) from err
        raise


@dataclass(frozen=True)
class Verdict:
    """What `validate` found in a recipe that passed.

    Attributes:
        recipe: The validated recipe.
        plan: The plan, or None with ``schema_only``.
        warnings: Things that will not stop a merge but deserve a look.
    """

    recipe: Recipe
    plan: Plan | None
    warnings: tuple[str, ...]

    def summary(self) -> str:
        """One line: method, inputs, what will be merged, output."""
        r = self.recipe
        out = f"output {r.output.path}"
        if self.plan is None:
            src = (
                plural(len(r.checkpoints), "checkpoint")
                if r.checkpoints is not None
                else f"select over {r.select.run if r.select else '?'}"
            )
            return f"method {r.method}, {src}, {out} (schema only: no checkpoint was read)"
        p = self.plan
        doc = p.to_json()["summary"]
        n = len(p.checkpoints)
        if p.kind == "adapter":
            space = lora_space(p.kind, p.lora_mode, r.delta_rank)
            inputs = f"{plural(n, 'adapter')}, lora space {space}"
            work = f"{doc['lora_modules']} LoRA modules, {doc['full_tensors']} full tensors"
        else:
            inputs = plural(n, "full model") + (", base_model" if p.base is not None else "")
            work = f"{doc['full_tensors']} tensors merged"
        return f"method {r.method}, {inputs}, {work}, {doc['copied_tensors']} copied, {out}"


def validate(recipe: Recipe | str | Path, *, schema_only: bool = False) -> Verdict:
    """Check a recipe as `plan` and `run` would, without reading a tensor byte.

    Args:
        recipe: A recipe file, or a validated `Recipe`.
        schema_only: Check the recipe document alone (fast: no checkpoint folder is read).

    Returns:
        The verdict of a recipe that can run, with its plan and warnings.

    Raises:
        MwakitError: The one problem found.
        RecipeError: Several problems, each with its location and fix.
    """
    source = None if isinstance(recipe, Recipe) else str(recipe)
    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    warnings: list[str] = []
    out = Path(r.output.path)
    try:
        exists = out.exists()
    except OSError:  # an unreadable parent: `run` reports it when it gets there
        exists = False
    if exists and not r.output.overwrite:
        warnings.append(
            f"output folder {out} exists: `mwakit run` will refuse it (pass --force or set "
            "output.overwrite: true to replace it)"
        )
    if schema_only:
        return Verdict(r, None, tuple(warnings))
    if r.output.hub is not None:
        from mwakit.errors import HubError
        from mwakit.hub import preflight

        try:
            preflight(r.output.hub)
        except HubError as err:  # `run --no-push` still works: a warning, not a verdict
            warnings.append(f"output.hub: {err.what}; `mwakit run` will stop ({err.fix})")
    plan = checked_plan(r, source=source)
    return Verdict(r, plan, (*plan.warnings, *warnings))
