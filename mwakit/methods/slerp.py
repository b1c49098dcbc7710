"""SLERP: spherical linear interpolation between two checkpoints.

Formula, per tensor flattened to a vector, with cos Ω = ⟨θ_1, θ_2⟩ / (‖θ_1‖ ‖θ_2‖):
θ = sin((1 − t)Ω)/sin Ω · θ_1 + sin(tΩ)/sin Ω · θ_2, and the plain lerp
θ = (1 − t) θ_1 + t θ_2 where the vectors are nearly colinear (|cos Ω| > 1 − ``eps``: sin Ω
would be ~0) or either has norm 0 (no direction to rotate). t = 0 gives θ_1 and t = 1 gives
θ_2, bit for bit.
Space: delta (adapters: on ΔW_i, then re-factorised by SVD) or full. It is not linear in the
inputs, so LoRA factors cannot be interpolated directly.
Reference: Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH); the
model-merging use follows mergekit's ``slerp``.

Where mwakit deliberately differs from mergekit:
- Computed with torch on the tensors' own device; mergekit round-trips every tensor through
  numpy float32 on the CPU, even with ``--cuda``. The norms and the dot product that give Ω
  are summed in float64 (a float32 ``vector_norm`` over millions of elements is off by up to
  3.5e-5, which put float32 SLERP 1.5e-5 from exact); the combination is computed in float32
  (float64 for ``dtype: float64``) and rounded to ``dtype`` once.
- The two checkpoints are the two ends; mergekit requires ``base_model`` to be one of them
  (its t = 0 end). A ``base`` passed here is ignored: SLERP does not use task vectors.
- The colinearity cut-off is ``eps`` = 1e-6 on |cos Ω| (mergekit: 0.9995, i.e. 5e-4). The
  cut-off only has to keep sin Ω away from 0: the SLERP coefficients depend on Ω at second
  order, so a rounded Ω near colinear barely moves them (the sines are taken in float64), and
  the lerp fallback differs from SLERP by O(Ω²) there.
- A zero-norm tensor gives the lerp; mergekit leaves it unnormalised, so its cosine is 0 and
  it rotates by 90° (θ = sin(tπ/2)·θ_2 when θ_1 = 0).
- ``t`` may be a per-layer list (`mwakit.layer_params`), interpolated over depth as mergekit's
  gradients, and set per tensor by ``rules:``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from mwakit.methods.registry import CheckpointView, MergeMethod, register

if TYPE_CHECKING:
    import torch


class Params(BaseModel):
    """Parameters of `slerp`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    t: float = Field(default=0.5, ge=0.0, le=1.0)
    """Interpolation factor in [0, 1]: 0 gives the first checkpoint, 1 the second."""
    eps: float = Field(default=1e-6, gt=0.0, lt=1.0)
    """Fall back to lerp where |cos Ω| > 1 − eps (nearly colinear: sin Ω ≈ 0)."""


def weigh(params: Params, checkpoints: Sequence[CheckpointView]) -> list[float]:
    """The lerp weights (1 − t, t), for the card; `merge` reads ``t`` from the params."""
    if len(checkpoints) != 2:
        # The planner rejects other counts before weighing; stay total for other callers.
        return [1.0] * len(checkpoints)
    return [1.0 - params.t, params.t]


def merge(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: Params,
    *,
    base: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    key: str = "",
) -> torch.Tensor:
    """SLERP of two tensors.

    Args:
        tensors: θ_1 and θ_2 (any float dtype, same shape).
        weights: Unused: the interpolation factor is ``params.t``.
        params: Validated `Params`.
        base: Ignored (SLERP interpolates the checkpoints themselves).
        dtype: Compute and result dtype (default float32).
        key: Tensor name (unused).

    Returns:
        The interpolated tensor in ``dtype``.

    Raises:
        ValueError: Not exactly two tensors, or their shapes differ.
    """
    import torch

    if len(tensors) != 2:
        raise ValueError(f"slerp takes exactly 2 checkpoints, got {len(tensors)}")
    a_in, b_in = tensors
    if a_in.shape != b_in.shape:
        raise ValueError(f"slerp needs equal shapes, got {list(a_in.shape)} and {list(b_in.shape)}")
    from mwakit.methods.precision import accumulator, gram64

    dt = dtype or torch.float32
    t = params.t
    # The ends are returned as copies, not recomputed: sin(Ω)/sin(Ω) is not exactly 1 in floats.
    if t == 0.0:
        return a_in.to(dt, copy=True)
    if t == 1.0:
        return b_in.to(dt, copy=True)
    acc = accumulator(dt)
    s_a, s_b = 1.0 - t, t  # colinear, antipodal or zero-norm: no rotation plane, plain lerp
    aa, bb, ab = gram64(a_in, b_in)
    na, nb = math.sqrt(aa), math.sqrt(bb)
    if na > 0.0 and nb > 0.0 and math.isfinite(na * nb):
        cos = min(1.0, max(-1.0, ab / (na * nb)))  # rounding can push |cos| just past 1
        if abs(cos) <= 1.0 - params.eps:
            omega = math.acos(cos)
            sin_omega = math.sin(omega)
            s_a = math.sin((1.0 - t) * omega) / sin_omega
            s_b = math.sin(t * omega) / sin_omega
    out = a_in.to(acc).mul(s_a).add_(b_in, alpha=s_b)
    return out if out.dtype == dt else out.to(dt)


METHOD = register(
    MergeMethod(
        name="slerp",
        params=Params,
        merge=merge,
        weigh=weigh,
        summary="spherical interpolation between exactly two checkpoints (lerp when colinear)",
        formula="θ = sin((1−t)Ω)/sin Ω · θ_1 + sin(tΩ)/sin Ω · θ_2, cos Ω = ⟨θ_1,θ_2⟩/‖θ_1‖‖θ_2‖",
        reference="Shoemake 1985 (SLERP); as in mergekit's slerp",
        linear=False,
        spaces=("delta", "full"),
        inputs=(2, 2),
        uses_weights=False,  # the ends are weighted (1 − t, t); a `weight:` is refused
    )
)
