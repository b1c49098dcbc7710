"""Weights from metrics: Metrics-Weighted Averaging and normalisation. Pure Python, no torch.

MWA (docs/methods.md §1): goodness q_i = 1/m_i for lower-is-better metrics, m_i otherwise;
w_i = q_i^p / Σ_j q_j^p, computed as softmax(p·log q) so a large p never overflows. Two other
readings of the paper are selectable: ``softmax`` (w ∝ exp(∓p·m)) and ``rank`` (w ∝ p^rank).

This module is imported by ``mwakit validate`` and ``--help``, which must start without torch,
so it uses the math module only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

from mwakit.errors import MetricError

Transform = Literal["power", "softmax", "rank"]

# `eval_<dataset>_loss` comes from a dict eval_dataset; `*_loss` covers aux_loss, train_loss, …
_LOWER_IS_BETTER = re.compile(r"^(loss|train_loss|eval_loss|eval_.*loss|.*_loss)$")

_PENALTY_FIX = "use p = 0 for a uniform average, about 0.5–1 to favour better checkpoints"


def metric_direction(metric: str, higher_is_better: bool | None) -> bool:
    """Tell whether higher values of a metric are better.

    Losses (``loss``, ``train_loss``, ``eval_loss``, ``eval_*loss``, any ``*_loss``) are
    lower-is-better and ``step`` is higher-is-better; an explicit ``higher_is_better`` always
    wins, so a user can weight by any logged key.

    Args:
        metric: The metric's name, e.g. ``loss``, ``eval_loss``, ``step``, ``eval_accuracy``.
        higher_is_better: The direction declared in the recipe, or None to infer it.

    Returns:
        True when higher values are better.

    Raises:
        MetricError: The metric is unknown and its direction was not declared.
    """
    if higher_is_better is not None:
        return higher_is_better
    if metric == "step":
        return True
    if _LOWER_IS_BETTER.match(metric):
        return False
    raise MetricError(
        f"metric {metric!r} has no known direction",
        where="params.metric",
        fix="set higher_is_better: true|false in params",
    )


def _check_common(values: Sequence[float], penalty: float, names: Sequence[str]) -> None:
    """Checks shared by every transform: lengths, penalty, finiteness of each metric."""
    if len(values) != len(names):
        # A caller bug, not a user mistake: the names exist only to word messages.
        raise ValueError(f"{len(values)} metric values but {len(names)} names")
    if not values:
        raise MetricError(
            "no checkpoints to weight",
            where="checkpoints",
            fix="list at least one checkpoint in the recipe",
        )
    if not math.isfinite(penalty) or penalty < 0:
        raise MetricError(
            f"penalty must be a finite number ≥ 0, got {penalty}",
            where="params.penalty",
            fix=_PENALTY_FIX,
        )
    for name, v in zip(names, values, strict=True):
        if not math.isfinite(v):
            raise MetricError(
                f"metric is {v}, not a finite number",
                where=name,
                fix="drop this checkpoint, or give its metric in the recipe (metrics: {...})",
            )


def _tempered_softmax(scores: Sequence[float], penalty: float) -> list[float]:
    """w_i ∝ exp(p·s_i), stable for any finite p and s (s_i = -inf gives weight 0).

    Subtracting the best score *before* multiplying by p keeps every exponent ≤ 0, so neither
    p·s nor exp overflows even for p = 1e300; the best checkpoint always gets exp(0) = 1, so the
    sum is never 0.
    """
    if penalty == 0:
        # p = 0 is the uniform average, q^0 = 1 even for q = 0; also avoids 0·(-inf) = NaN.
        return [1.0 / len(scores)] * len(scores)
    top = max(scores)
    raw = [math.exp(penalty * (s - top)) for s in scores]
    total = math.fsum(raw)
    return [x / total for x in raw]


def _power_scores(
    values: Sequence[float], higher_is_better: bool, penalty: float, names: Sequence[str]
) -> list[float]:
    """log q_i for the power transform; -inf stands for q = 0 (a step-0 checkpoint)."""
    scores: list[float] = []
    for name, v in zip(names, values, strict=True):
        # A higher-is-better metric of exactly 0 (step 0) has q = 0: weight 0 for p > 0, as
        # docs/methods.md §1 specifies. Lower-is-better metrics need 1/m, so 0 is an error there.
        if v < 0 or (v == 0 and not higher_is_better):
            why = "1/m" if not higher_is_better else "log m"
            raise MetricError(
                f"metric is {v}, but the power transform needs values > 0 (it uses {why})",
                where=name,
                fix="use transform: rank (or softmax), or a positive metric",
            )
        scores.append(-math.inf if v == 0 else (math.log(v) if higher_is_better else -math.log(v)))
    if penalty > 0 and all(s == -math.inf for s in scores):
        raise MetricError(
            "every checkpoint has metric 0, so every power-transform weight is 0",
            where=", ".join(names),
            fix="use transform: rank (or softmax), or leave out the step-0 checkpoints",
        )
    return scores


def _rank_weights(values: Sequence[float], penalty: float, higher_is_better: bool) -> list[float]:
    """w ∝ p^rank with competition ranking: rank = how many checkpoints are strictly better."""
    if penalty > 1:
        # p > 1 would give the worst checkpoint the largest weight: surely a misread penalty.
        raise MetricError(
            f"with transform: rank the penalty is the decay per rank (w ∝ p^rank) and must be "
            f"in [0, 1], got {penalty}",
            where="params.penalty",
            fix="use a penalty between 0 (best checkpoint only) and 1 (uniform)",
        )
    # Ties share the lowest rank so equal metrics get equal weights; O(K²) is nothing for the
    # tens of checkpoints a run keeps.
    ranks = [sum(1 for u in values if (u > v if higher_is_better else u < v)) for v in values]
    # Python defines 0.0 ** 0 == 1.0, so with p = 0 the best checkpoint(s) keep weight 1.
    raw = [penalty**r for r in ranks]
    total = math.fsum(raw)  # ≥ 1: the best checkpoint has rank 0
    return [x / total for x in raw]


def mwa_weights(
    values: Sequence[float],
    *,
    penalty: float,
    transform: Transform = "power",
    higher_is_better: bool,
    names: Sequence[str],
) -> list[float]:
    """Metrics-Weighted Averaging weights, one per checkpoint, summing to 1.

    Args:
        values: The metric of each checkpoint.
        penalty: p ≥ 0. 0 gives the uniform average (power, softmax); larger values favour
            better checkpoints, and p → ∞ selects the best one.
        transform: ``power`` (w ∝ q^p with q = 1/m or m; the default), ``softmax``
            (w ∝ exp(−p·m) for lower-is-better, exp(p·m) for higher-is-better metrics) or
            ``rank`` (w ∝ p^rank, rank 0 = best, ties share the lowest rank; p ∈ [0, 1] is the
            decay per rank, so 1 is uniform and 0 keeps only the best).
        higher_is_better: Direction of the metric (see `metric_direction`).
        names: Checkpoint names, one per value, used in error messages.

    Returns:
        Weights ≥ 0 that sum to 1 (within 1e-12). Equal metrics get equal weights; a single
        checkpoint gets [1.0]. With ``power`` a higher-is-better metric of 0 (step 0) gets
        weight 0 for p > 0.

    Raises:
        MetricError: There are no values, a value is NaN/Inf (naming the checkpoint), p is
            negative or not finite (or above 1 for rank), or the power transform meets a value
            it cannot take the log of (naming the checkpoint).
        ValueError: ``values`` and ``names`` differ in length.
    """
    _check_common(values, penalty, names)
    if len(values) == 1:
        return [1.0]
    if transform == "power":
        return _tempered_softmax(_power_scores(values, higher_is_better, penalty, names), penalty)
    if transform == "softmax":
        sign = 1.0 if higher_is_better else -1.0
        return _tempered_softmax([sign * v for v in values], penalty)
    if transform == "rank":
        return _rank_weights(values, penalty, higher_is_better)
    raise MetricError(
        f"unknown transform {transform!r}",
        where="params.transform",
        fix="use transform: power, softmax or rank",
    )


def normalize(weights: Sequence[float], names: Sequence[str]) -> list[float]:
    """Divide weights by their sum.

    Args:
        weights: One weight per checkpoint (negative weights are allowed; only the sum matters).
        names: Checkpoint names, one per weight, used in error messages.

    Returns:
        The weights divided by their sum.

    Raises:
        MetricError: A weight is not finite (naming the checkpoint), or the weights sum to zero
            (or overflow).
        ValueError: ``weights`` and ``names`` differ in length.
    """
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} weights but {len(names)} names")
    for name, w in zip(names, weights, strict=True):
        if not math.isfinite(w):
            raise MetricError(
                f"weight is {w}, not a finite number", where=name, fix="give a finite weight"
            )
    try:
        total = math.fsum(weights)
    except OverflowError:  # fsum raises where sum() would give inf
        total = math.inf
    if total == 0 or not math.isfinite(total):
        raise MetricError(
            f"the weights sum to {total} and cannot be normalised",
            where=", ".join(names) or "checkpoints",
            fix="give weights with a non-zero sum, or set normalize: false",
        )
    return [w / total for w in weights]


def step_zero_warnings(
    names: Sequence[str],
    steps: Sequence[float],
    penalty: float,
    *,
    transform: Transform = "power",
) -> list[str]:
    """Warnings for checkpoints saved at step 0 when MWA weights them by step.

    A step-0 LoRA has B = 0, so it adds nothing but pulls the merge towards the base model.

    Args:
        names: Checkpoint names.
        steps: Each checkpoint's step.
        penalty: The MWA penalty p; with p = 0 every checkpoint is weighted alike, no warning.
        transform: The MWA transform, to say what weight step 0 gets.

    Returns:
        One warning string per step-0 checkpoint (empty when p = 0 or none is at step 0).
    """
    if penalty <= 0:
        return []
    effect = (
        "gets weight 0"
        if transform == "power"
        else f"still gets a small weight with transform: {transform}"
    )
    return [
        f"{name}: step 0 {effect} (a step-0 LoRA has B = 0)"
        for name, step in zip(names, steps, strict=True)
        if step == 0
    ]
