"""Multi-SLERP: weighted spherical interpolation of N checkpoints (barycentric SLERP).

Formula, per tensor flattened to x_i with direction u_i = x_i/‖x_i‖ and weights w_i: start at
the normalised weighted Euclidean mean m = Σ w_i u_i / ‖Σ w_i u_i‖, map each u_i into the
tangent space at m with the log map v_i = θ_i/sin θ_i · (u_i − cos θ_i · m), take the weighted
tangent mean T = Σ w_i v_i and map it back, u = cos‖T‖ · m + sin‖T‖ · T/‖T‖; the result is
θ = u · Σ w_i ‖x_i‖. It is one step of `karcher` from the same start. For two checkpoints
with weights (1 − t, t) the direction is exactly SLERP's: on their great circle the log maps
are the angles themselves, so u sits at the angle tΩ from u_1; with equal norms the result
is `slerp` at t. With ``base_model`` the points are the task vectors and θ = θ_0 + result.

Worked example (the golden test): x = (1, 0) and (0, 2) with weights (0.75, 0.25). Ω = 90°,
m = (0.75, 0.25)/‖·‖ at 18.43°, T = 0.75·(−18.43°) + 0.25·(71.57°) = 4.07°, so u is at
22.5° = 0.25·90° and the norm is 0.75·1 + 0.25·2 = 1.25: θ = 1.25·(cos 22.5°, sin 22.5°)
= (1.154849, 0.478354).

Space: delta (adapters: on the updates ΔW_i, base 0, then re-factorised by SVD) or full.
Reference: Buss & Fillmore 2001, Spherical averages and applications to spherical splines
and interpolation (ACM TOG); as in mergekit's ``multislerp``.

Where mwakit deliberately differs from mergekit:
- Dot products and norms are summed in float64 whatever the compute dtype; a tensor of norm
  ≤ ``eps`` has no direction and only adds its norm to the average (mergekit clamps it).
- If the weighted directions cancel (‖Σ w_i u_i‖ ≤ eps) the heaviest direction is the
  tangent point instead of a division by ~0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from mwakit.methods.karcher import nonnegative_weights
from mwakit.methods.registry import CheckpointView, MergeMethod, register

if TYPE_CHECKING:
    import torch


class Params(BaseModel):
    """Parameters of `multislerp`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    normalize_weights: bool = True
    """Divide the weights by their sum (false: the tangent step and norm scale with them)."""
    eps: float = Field(default=1e-8, gt=0.0, allow_inf_nan=False)
    """A tensor of norm ≤ eps has no direction (it only lowers the mean norm)."""


def weigh(params: Params, checkpoints: Sequence[CheckpointView]) -> list[float]:
    """The recipe's ``weight`` (default 1), ≥ 0, normalised unless ``normalize_weights: false``."""
    raw = nonnegative_weights(checkpoints)
    total = sum(raw)
    return [w / total for w in raw] if params.normalize_weights and total else raw


def merge(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: Params,
    *,
    base: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    key: str = "",
) -> torch.Tensor:
    """Multi-SLERP of one tensor group (of the task vectors when ``base`` is given).

    Args:
        tensors: θ_i (or ΔW_i), any float dtype, one shape.
        weights: Weights from `weigh`.
        params: Validated `Params`.
        base: θ_0 (optional): then the result on δ_i = θ_i − θ_0 is added to it.
        dtype: Compute and result dtype (float64 if asked, else float32).
        key: Tensor name (unused).
    """
    from mwakit.methods import sphere
    from mwakit.methods.blocks import compute_dtype
    from mwakit.methods.sparsify import finish, task_vectors

    dt = compute_dtype(dtype)
    points = list(tensors) if base is None else task_vectors(tensors, base, dt)
    res = sphere.spherical_mean(
        points,
        weights,
        max_iter=1,
        tol=0.0,
        eps=params.eps,
        dtype=dt,
        normalize=params.normalize_weights,
    )
    return finish(res.mean, base, dt)


METHOD = register(
    MergeMethod(
        name="multislerp",
        params=Params,
        merge=merge,
        weigh=weigh,
        summary="weighted SLERP of N checkpoints: one log/exp step from the Euclidean mean",
        formula="u = exp_m(Σ w_i log_m(θ_i/‖θ_i‖)), m = normalised Σ w_i u_i; θ = u · Σ w_i ‖θ_i‖",
        reference="Buss & Fillmore 2001 (spherical averages); as in mergekit's multislerp",
        linear=False,
        spaces=("delta", "full"),
        uses_base=True,
    )
)
