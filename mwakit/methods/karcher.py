"""Karcher mean: the Riemannian (Fréchet) mean of N checkpoints on the sphere.

Formula, per tensor flattened to a vector x_i with direction u_i = x_i/‖x_i‖ and weights ŵ_i
(the recipe's ``weight``, default equal, normalised): the mean direction m minimises
Σ ŵ_i d(m, u_i)² with d the great-circle distance. It is found by Riemannian gradient steps:
start from the normalised Euclidean mean, map every u_i into the tangent space at m,
v_i = θ_i/sin θ_i · (u_i − cos θ_i · m) (cos θ_i = ⟨m, u_i⟩), average T = Σ ŵ_i v_i and move along
the geodesic, m ← cos‖T‖ · m + sin‖T‖ · T/‖T‖, until ‖T‖ < ``tol`` or ``max_iter`` steps. The
result is θ = m · Σ ŵ_i ‖x_i‖ (the mean direction times the mean norm). With ``base_model``
(full models) the points are the task vectors δ_i = θ_i − θ_0 and θ = θ_0 + mean.

Worked example (the golden test): x = (1, 0), (2, 0), (0, 3), equal weights. The directions
are at 0°, 0°, 90°; on a circle the Karcher mean is the mean angle, 30°; the mean norm is 2,
so θ = 2·(cos 30°, sin 30°) = (√3, 1). The Euclidean start (2/3, 1/3) is at 26.57°; one step
rotates by T = mean(θ_i − 26.57°) = 3.43° and lands on 30°, where T = 0.

Space: delta (adapters: the points are the updates ΔW_i — the sphere of update directions,
base 0 — then re-factorised by SVD) or full. The Karcher mean of the fine-tuned weights
W_0 + ΔW_i themselves would need the base weights, which an adapter merge does not read.
Reference: Karcher 1977, Riemannian center of mass and mollifier smoothing (Comm. Pure Appl.
Math.); Buss & Fillmore 2001 (spherical averages); as in mergekit's ``karcher``.

Where mwakit deliberately differs from mergekit:
- Per-checkpoint ``weight`` is honoured (normalised); mergekit always weighs equally. With
  the default weights the two agree.
- ``base_model`` is optional and switches to task vectors (mergekit's karcher takes no base).
- Dot products and norms are summed in float64 (the tangent buffers stay float32), whatever
  the compute dtype; a zero-norm tensor has no direction: it counts toward the mean norm but
  not the direction (mergekit divides by a clamped norm).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from mwakit.errors import MetricError
from mwakit.methods.registry import CheckpointView, MergeMethod, register

if TYPE_CHECKING:
    import torch


class Params(BaseModel):
    """Parameters of `karcher`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    max_iter: int = Field(default=10, ge=1, le=1000)
    """Most Riemannian gradient steps per tensor."""
    tol: float = Field(default=1e-5, gt=0.0, allow_inf_nan=False)
    """Stop when the tangent mean ‖T‖ (radians) falls below this."""
    eps: float = Field(default=1e-12, gt=0.0, allow_inf_nan=False)
    """A tensor of norm ≤ eps has no direction (it only lowers the mean norm)."""


def nonnegative_weights(checkpoints: Sequence[CheckpointView]) -> list[float]:
    """The recipe's ``weight`` (default 1), checked ≥ 0 and not all 0 (spherical means).

    Raises:
        MetricError: A weight is negative or not finite, or all are 0.
    """
    raw = [1.0 if c.weight is None else c.weight for c in checkpoints]
    for c, w in zip(checkpoints, raw, strict=True):
        if not math.isfinite(w) or w < 0.0:
            raise MetricError(
                f"weight is {w}; a spherical mean takes weights ≥ 0",
                where=c.name,
                fix="give a finite weight ≥ 0",
            )
    if raw and not any(raw):
        raise MetricError(
            "every weight is 0", where="checkpoints", fix="give at least one positive weight"
        )
    return raw


def weigh(params: Params, checkpoints: Sequence[CheckpointView]) -> list[float]:
    """The recipe's ``weight`` (default 1: equal, as in mergekit), normalised."""
    raw = nonnegative_weights(checkpoints)
    total = sum(raw)
    return [w / total for w in raw] if total else raw


def merge(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: Params,
    *,
    base: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    key: str = "",
) -> torch.Tensor:
    """The Karcher mean of one tensor group (of the task vectors when ``base`` is given).

    Args:
        tensors: θ_i (or ΔW_i), any float dtype, one shape.
        weights: Normalised weights from `weigh`.
        params: Validated `Params`.
        base: θ_0 (optional): then the mean of δ_i = θ_i − θ_0 is added to it.
        dtype: Compute and result dtype (float64 if asked, else float32).
        key: Tensor name (unused).
    """
    from mwakit.methods import sphere
    from mwakit.methods.blocks import compute_dtype
    from mwakit.methods.sparsify import finish, task_vectors

    dt = compute_dtype(dtype)
    points = list(tensors) if base is None else task_vectors(tensors, base, dt)
    res = sphere.spherical_mean(
        points, weights, max_iter=params.max_iter, tol=params.tol, eps=params.eps, dtype=dt
    )
    return finish(res.mean, base, dt)


METHOD = register(
    MergeMethod(
        name="karcher",
        params=Params,
        merge=merge,
        weigh=weigh,
        summary="Karcher (Riemannian) mean of N checkpoints on the sphere, times the mean norm",
        formula="m = argmin Σ ŵ_i d(m, θ_i/‖θ_i‖)² on the sphere; θ = m · Σ ŵ_i ‖θ_i‖",
        reference="Karcher 1977 (Riemannian center of mass); as in mergekit's karcher",
        linear=False,
        spaces=("delta", "full"),
        uses_base=True,
    )
)
