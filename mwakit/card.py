"""The model card (README.md) and the resolved recipe written beside a merged checkpoint."""

from __future__ import annotations

from typing import Any

import yaml

from mwakit import __version__
from mwakit.planner import Plan
from mwakit.recipe import Recipe

RESOLVED_RECIPE = "mwakit.yaml"

_READINGS = {
    "power": "w_i = q_i^p / Σ_j q_j^p with q = 1/metric for lower-is-better metrics, q = metric "
    "otherwise (computed as softmax(p·log q))",
    "softmax": "w_i ∝ exp(−p·m_i) for lower-is-better metrics, exp(p·m_i) otherwise",
    "rank": "w_i ∝ p^rank_i, rank 0 = the best checkpoint",
}


def resolved_recipe(plan: Plan) -> Recipe:
    """The recipe as run: explicit checkpoints (absolute paths) with the metrics used.

    Re-running it reproduces the merge even when ``select:`` would now find other folders or
    trainer_state.json files are gone.
    """
    data = plan.recipe.to_yaml_dict()
    data.pop("select", None)
    data["checkpoints"] = [
        {
            "path": str(c.path.resolve()),
            **({"metrics": dict(c.metrics)} if c.metrics else {}),
            **({"weight": c.weight} if c.weight is not None else {}),
        }
        for c in plan.checkpoints
    ]
    data["params"] = plan.params.model_dump(mode="json", exclude_none=True)
    return Recipe.model_validate(data)


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.6g}"


def render_card(plan: Plan, recipe_yaml: str, rel_errors: dict[str, float]) -> str:
    """README.md for the merged adapter: Hub front matter, method, weights table, recipe."""
    front: dict[str, Any] = {}
    if plan.base_model:
        front["base_model"] = plan.base_model
    full = plan.kind == "full"
    front["library_name"] = "transformers" if full else "peft"
    front["tags"] = ["mwakit", "merge", *([] if full else ["lora"]), plan.method.name]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
    title = plan.recipe.name or ("Merged model" if full else "Merged LoRA adapter")
    lines += [f"# {title}", ""]
    lines += [
        f"This {'model' if full else 'adapter'} was merged by "
        f"[mwakit](https://pypi.org/project/mwakit/) {__version__} "
        f"from {len(plan.checkpoints)} checkpoints with **{plan.method.name}** "
        f"({plan.method.summary}).",
        "",
        f"- Formula: `{plan.method.formula}`",
        f"- Reference: {plan.method.reference}",
    ]
    params = plan.params.model_dump(mode="json")
    mwa = params if plan.method.name == "mwa" else None
    if plan.recipe.weighting is not None:
        from mwakit.methods.mwa import Params as MwaParams

        mwa = MwaParams.model_validate(plan.recipe.weighting.mwa).model_dump(mode="json")
        lines.append("- Weights: MWA (`weighting: {mwa: ...}`) feeding the method's weights")
    if mwa is not None:
        lines.append(
            f"- Reading of MWA: `transform: {mwa['transform']}` — "
            f"{_READINGS[mwa['transform']]}; "
            f"metric `{mwa['metric']}`, penalty p = {mwa['penalty']}"
        )
    if full:
        if plan.base is not None:
            lines.append(f"- Base model (θ_0 of the task vectors): `{plan.base.ref}`")
    else:
        space = {
            "factors": "factors (A and B merged; same rank; scalings folded into B)",
            "concat": "delta, rank concatenation (the merged ΔW is exact)",
            "svd": f"delta, re-factorised to rank {plan.recipe.delta_rank} with QR + small SVD",
            "dense": f"delta: the method acts on each ΔW_i = s_i·B_i·A_i, the result is "
            f"re-factorised to rank {plan.recipe.delta_rank} with a truncated SVD",
        }[plan.lora_mode]
        lines.append(f"- LoRA space: {space}")
    if rel_errors:
        worst = max(rel_errors.items(), key=lambda kv: kv[1])
        mean = sum(rel_errors.values()) / len(rel_errors)
        lines.append(
            f"- Truncation error (relative Frobenius): mean {mean:.3g}, max {worst[1]:.3g} "
            f"at `{worst[0]}`"
        )
    metric_names = sorted({k for c in plan.checkpoints for k in c.metrics})
    shown = [m for m in ("step", "loss", "eval_loss") if m in metric_names] + [
        m for m in metric_names if m not in ("step", "loss", "eval_loss")
    ][:3]
    lines += ["", "## Checkpoints", ""]
    lines.append("| checkpoint | " + " | ".join(shown) + " | weight |")
    lines.append("|---" * (len(shown) + 2) + "|")
    for c, w in zip(plan.checkpoints, plan.weights, strict=True):
        cells = [_fmt(c.metrics.get(m)) for m in shown]
        lines.append(f"| `{c.ref}` | " + " | ".join(cells) + f" | {w:.6f} |")
    if plan.recipe.rules:
        lines += [
            "",
            "Per-tensor rules (first match wins) change the weights of matching tensors; "
            "see the recipe below.",
        ]
    if plan.warnings:
        lines += ["", "## Notes", ""] + [f"- {w}" for w in plan.warnings]
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        f"pip install mwakit=={__version__}",
        f"mwakit run {RESOLVED_RECIPE}",
        "```",
        "",
        f"The recipe as run (`{RESOLVED_RECIPE}` in this folder):",
        "",
        "```yaml",
        recipe_yaml.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
