"""Weights from metrics: Metrics-Weighted Averaging and normalisation. Pure Python, no torch.

MWA (METHODS.md §1): goodness q_i = 1/m_i for lower-is-better metrics, m_i otherwise;
w_i = q_i^p / Σ_j q_j^p, computed as softmax(p·log q) so a large p never overflows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

from mwakit.errors import MetricError

Transform = Literal["power", "softmax", "rank"]

_LOWER_IS_BETTER = re.compile(r"^(loss|train_loss|eval_loss|eval_.*loss|.*_loss)$")


def metric_direction(metric: str, higher_is_better: bool | None) -> bool:
    """True when higher values of ``metric`` are better.

    Losses (``loss``, ``eval_loss``, any ``*_loss``) are lower-is-better and ``step`` is
    higher-is-better; an explicit ``higher_is_better`` always wins.

    Raises:
        MetricError: The direction of an unknown metric was not declared.
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


def _softmax(logits: Sequence[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = math.fsum(exps)
    return [e / total for e in exps]


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
        penalty: p ≥ 0. 0 gives the uniform average; p → ∞ selects the best checkpoint.
        transform: ``power`` (w ∝ q^p), ``softmax`` (w ∝ exp(∓p·m)) or ``rank``
            (w ∝ p^rank, rank 0 = best, ties share the better rank; p ∈ [0, 1] is the decay
            per rank, so 1 is uniform and 0 keeps the best only).
        higher_is_better: Direction of the metric.
        names: Checkpoint names, for messages.

    Raises:
        MetricError: A value is NaN/Inf, p is negative (or above 1 for rank), or a power
            transform meets m ≤ 0.
    """
    if not math.isfinite(penalty) or penalty < 0:
        raise MetricError(
            f"penalty must be a finite number ≥ 0, got {penalty}",
            where="params.penalty",
            fix="use p = 0 for a uniform average, about 0.5–1 to favour better checkpoints",
        )
    for name, v in zip(names, values, strict=True):
        if not math.isfinite(v):
            raise MetricError(
                f"metric is {v}",
                where=name,
                fix="drop this checkpoint, or give its metric in the recipe (metrics: {...})",
            )
    if transform == "power":
        for name, v in zip(names, values, strict=True):
            if v <= 0:
                raise MetricError(
                    f"metric is {v}, but the power transform needs values > 0",
                    where=name,
                    fix="use transform: rank (or softmax), or a positive metric",
                )
        sign = 1.0 if higher_is_better else -1.0
        return _softmax([penalty * sign * math.log(v) for v in values])
    if transform == "softmax":
        sign = 1.0 if higher_is_better else -1.0
        return _softmax([penalty * sign * v for v in values])
    if penalty > 1:
        raise MetricError(
            f"with transform: rank the penalty is the decay per rank (w ∝ p^rank) and must be "
            f"in [0, 1], got {penalty}",
            where="params.penalty",
            fix="use a penalty between 0 (best checkpoint only) and 1 (uniform)",
        )
    # rank: competition ranking, 0 = best; ties share the better rank so equal metrics get equal
    # weights.
    ranks = [sum(1 for u in values if (u > v if higher_is_better else u < v)) for v in values]
    raw = [penalty**r if r > 0 else 1.0 for r in ranks]
    total = math.fsum(raw)
    return [x / total for x in raw]


def normalize(weights: Sequence[float], names: Sequence[str]) -> list[float]:
    """Divide weights by their sum.

    Raises:
        MetricError: A weight is not finite, or the weights sum to zero.
    """
    for name, w in zip(names, weights, strict=True):
        if not math.isfinite(w):
            raise MetricError(f"weight is {w}", where=name, fix="give a finite weight")
    total = math.fsum(weights)
    if total == 0:
        raise MetricError(
            "the weights sum to 0 and cannot be normalised",
            where="checkpoints",
            fix="give at least one non-zero weight, or set normalize: false",
        )
    return [w / total for w in weights]
