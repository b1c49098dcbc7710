"""Metrics-Weighted Averaging (MWA).

Formula (``transform: power``, mwakit's reading and default): q_i = 1/m_i for lower-is-better
metrics (loss), q_i = m_i for higher-is-better ones (step, accuracy); w_i = q_i^p / Σ_j q_j^p;
θ = Σ w_i θ_i. Alternatives: ``softmax`` (w ∝ exp(∓p·m)) and ``rank`` (w ∝ p^rank, 0 = best).
p = 0 is the uniform average, p → ∞ picks the best checkpoint.
Space: factors, delta or full (a weighted sum, so linear).
Reference: Choi & Yu 2025, Metrics-Weighted Averaging (arXiv 2504.18580).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from mwakit.errors import MetricError
from mwakit.methods.linear import weighted_sum
from mwakit.methods.registry import CheckpointView, MergeMethod, register
from mwakit.weights import Transform, metric_direction, mwa_weights


class Params(BaseModel):
    """Parameters of `mwa`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    metric: str = "loss"
    """Metric each checkpoint is weighted by: loss, eval_loss, step, or any logged key."""
    penalty: float = Field(default=0.7, ge=0.0)
    """Penalty factor p ≥ 0: 0 = uniform, larger favours the best (rank: decay in [0, 1])."""
    transform: Transform = "power"
    """How metric and penalty become weights: power (default), softmax or rank."""
    higher_is_better: bool | None = None
    """Direction of the metric; needed for metrics other than loss/eval_loss/step."""

    @field_validator("penalty")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("penalty must be a finite number ≥ 0")
        return v

    @field_validator("metric")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("metric must name a metric, e.g. loss, eval_loss or step")
        return v

    @model_validator(mode="after")
    def _rank_decay(self) -> Params:
        # With `rank` the penalty is a decay per rank: p > 1 would favour the worst checkpoint.
        # Reported at params.penalty (a model validator's error would sit at `params`).
        if self.transform == "rank" and self.penalty > 1:
            msg = (
                "with transform: rank the penalty is the decay per rank (w ∝ p^rank) and must "
                f"be in [0, 1], got {self.penalty}"
            )
            err = PydanticCustomError("rank_penalty", msg)
            detail = InitErrorDetails(type=err, loc=("penalty",), input=self.penalty)
            raise ValidationError.from_exception_data("Params", [detail])
        return self


def weigh(params: Params, checkpoints: Sequence[CheckpointView]) -> list[float]:
    """MWA weights from each checkpoint's ``params.metric``.

    Raises:
        MetricError: A checkpoint lacks the metric, or it is not usable by the transform.
    """
    lacking = [c for c in checkpoints if params.metric not in c.metrics]
    if lacking:
        have = ", ".join(sorted(lacking[0].metrics)) or "none"
        raise MetricError(
            f"metric {params.metric!r} not found (metrics found: {have})",
            where=", ".join(c.name for c in lacking),  # every checkpoint that lacks it
            fix=f"give it in the recipe (metrics: {{{params.metric}: ...}}) "
            "or pick a metric every checkpoint has",
        )
    values = [c.metrics[params.metric] for c in checkpoints]
    higher = metric_direction(params.metric, params.higher_is_better)
    return mwa_weights(
        values,
        penalty=params.penalty,
        transform=params.transform,
        higher_is_better=higher,
        names=[c.name for c in checkpoints],
    )


METHOD = register(
    MergeMethod(
        name="mwa",
        params=Params,
        merge=weighted_sum,
        weigh=weigh,
        summary="Metrics-Weighted Averaging: weights from a metric and one penalty factor",
        formula="w_i = q_i^p / Σ_j q_j^p, q = 1/loss or step; θ = Σ w_i θ_i",
        reference="Choi & Yu 2025, Metrics-Weighted Averaging (arXiv 2504.18580)",
        linear=True,
        spaces=("factors", "delta", "full"),
        uses_weights=False,  # weights come from metrics; a `weight:` is refused
    )
)
