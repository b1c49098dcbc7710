"""NuSLERP: SLERP of two checkpoints weighted by their ``weight``, whole, per row or per column.

Formula: t = w_2 / (w_1 + w_2). For each vector pair (a, b) — the whole flattened tensor
(``flatten: true``), each row (index of dim 0, ``row_wise: true``) or each column (index of
the remaining dims, the default when not flattened) — with cos Ω = ⟨a, b⟩/(‖a‖‖b‖):
slerp(a, b) = sin((1 − t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, and the lerp (1 − t)a + tb where
|cos Ω| > 1 − ``eps`` or a norm is 0. With ``base_model`` (full models) a and b are the task
vectors δ_i = θ_i − θ_0 and θ = θ_0 + slerp(δ_1, δ_2); without one, the checkpoints themselves.

Worked examples (the golden tests), t = 0.5:
- flatten: a = (1, 0, 1, 0), b = (0, 1, 1, 0): cos Ω = 1/2, Ω = 60°, both coefficients
  sin 30°/sin 60° = 1/√3, so θ = (1, 1, 2, 0)/√3.
- row-wise: a = [[1, 0], [1, 0]], b = [[0, 1], [1, 0]]: row 0 has Ω = 90° → (1, 1)/√2;
  row 1 is colinear → its lerp (1, 0).
- column-wise, same a, b: column 0 is (1, 1) vs (0, 1), Ω = 45°, coefficients
  sin 22.5°/sin 45° = 0.541196 → (0.541196, 1.082392); column 1 is (0, 0) vs (1, 0), a zero
  norm → its lerp (0.5, 0).

Space: delta (adapters: on the updates ΔW_i — the task vectors relative to the adapters' own
base — then re-factorised by SVD) or full.
Reference: Shoemake 1985 (SLERP); mergekit's ``nuslerp``.

Where mwakit deliberately differs from mergekit:
- The options are ``flatten`` and ``row_wise`` (mergekit: ``nuslerp_flatten``,
  ``nuslerp_row_wise``; `mwakit convert` renames them).
- Dot products and norms are in float64 whatever the compute dtype, and the lerp fallback
  uses mwakit's ``eps`` = 1e-6 on |cos Ω| (as `slerp`); a zero-norm vector gives the lerp.
- Weights must be ≥ 0 with a positive sum (t must lie in [0, 1]).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from mwakit.methods.karcher import nonnegative_weights
from mwakit.methods.registry import CheckpointView, MergeMethod, register

if TYPE_CHECKING:
    import torch

_ROWS = 1 << 12
"""Rows per float64 chunk when reducing along an axis."""


class Params(BaseModel):
    """Parameters of `nuslerp`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    flatten: bool = True
    """SLERP the whole tensor as one vector (false: per row or per column)."""
    row_wise: bool = False
    """With flatten false: SLERP each row (index of dim 0) instead of each column."""
    eps: float = Field(default=1e-6, gt=0.0, lt=1.0)
    """Fall back to lerp where |cos Ω| > 1 − eps (nearly colinear: sin Ω ≈ 0)."""


def weigh(params: Params, checkpoints: Sequence[CheckpointView]) -> list[float]:
    """(1 − t, t) with t = w_2/(w_1 + w_2) from the recipe's ``weight`` (default equal)."""
    raw = nonnegative_weights(checkpoints)
    total = sum(raw)
    return [w / total for w in raw]


def _reduce(
    a: torch.Tensor, b: torch.Tensor, rows: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(⟨a, b⟩, ‖a‖², ‖b‖²) in float64 per row (rows) or per column of 2-D a, b."""
    import torch

    n_out = a.shape[0] if rows else a.shape[1]
    sums = [torch.zeros(n_out, dtype=torch.float64, device=a.device) for _ in range(3)]
    for s in range(0, a.shape[0], _ROWS):
        x, y = a[s : s + _ROWS].double(), b[s : s + _ROWS].double()
        dim = 1 if rows else 0
        parts = ((x * y).sum(dim), (x * x).sum(dim), (y * y).sum(dim))
        for acc, part in zip(sums, parts, strict=True):
            if rows:
                acc[s : s + _ROWS] = part
            else:
                acc += part
    return sums[0], sums[1], sums[2]


def coefficients(
    dot: torch.Tensor, na2: torch.Tensor, nb2: torch.Tensor, t: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """SLERP coefficients (c_a, c_b) per vector pair, float64; the lerp's where degenerate."""
    import torch

    denom = (na2 * nb2).sqrt()
    ok = denom > 0
    cos = torch.where(ok, dot / torch.where(ok, denom, 1.0), 0.0).clamp_(-1.0, 1.0)
    ok &= cos.abs() <= 1.0 - eps
    omega = torch.acos(cos)
    sin = torch.where(ok, torch.sin(omega), 1.0)
    c_a = torch.where(ok, torch.sin((1.0 - t) * omega) / sin, 1.0 - t)
    c_b = torch.where(ok, torch.sin(t * omega) / sin, t)
    return c_a, c_b


def merge(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: Params,
    *,
    base: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    key: str = "",
) -> torch.Tensor:
    """NuSLERP of two tensors (of their task vectors when ``base`` is given).

    Args:
        tensors: θ_1, θ_2 (or ΔW_1, ΔW_2), any float dtype, one shape.
        weights: (1 − t, t) from `weigh`.
        params: Validated `Params`.
        base: θ_0 (optional).
        dtype: Compute and result dtype (float64 if asked, else float32).
        key: Tensor name (unused).

    Raises:
        ValueError: Not exactly two tensors, or their shapes differ.
    """
    from mwakit.methods.blocks import compute_dtype
    from mwakit.methods.sparsify import finish, task_vectors

    if len(tensors) != 2:
        raise ValueError(f"nuslerp takes exactly 2 checkpoints, got {len(tensors)}")
    if tensors[0].shape != tensors[1].shape:
        raise ValueError(
            f"nuslerp needs equal shapes, got {list(tensors[0].shape)} and {list(tensors[1].shape)}"
        )
    dt = compute_dtype(dtype)
    t = weights[1] / (weights[0] + weights[1])
    a, b = task_vectors(tensors, base, dt)  # fresh copies: combined in place below
    if t == 0.0 or t == 1.0:
        return finish(a if t == 0.0 else b, base, dt)
    shape = a.shape
    if params.flatten or a.dim() < 2:
        m_a, m_b = a.reshape(1, -1), b.reshape(1, -1)
        rows = True
    else:
        m_a, m_b = a.reshape(shape[0], -1), b.reshape(shape[0], -1)
        rows = params.row_wise
    c_a, c_b = coefficients(*_reduce(m_a, m_b, rows), t, params.eps)
    c_a, c_b = c_a.to(dt), c_b.to(dt)
    if rows:
        c_a, c_b = c_a.unsqueeze(1), c_b.unsqueeze(1)
    out = m_a.mul_(c_a).add_(m_b.mul_(c_b)).reshape(shape)
    return finish(out, base, dt)


METHOD = register(
    MergeMethod(
        name="nuslerp",
        params=Params,
        merge=merge,
        weigh=weigh,
        summary="SLERP of 2 checkpoints (or task vectors) with t from their weights; row/col-wise",
        formula="t = w_2/(w_1+w_2); θ = θ_0 + sin((1−t)Ω)/sin Ω · δ_1 + sin(tΩ)/sin Ω · δ_2",
        reference="Shoemake 1985 (SLERP); as in mergekit's nuslerp",
        linear=False,
        spaces=("delta", "full"),
        uses_base=True,
        inputs=(2, 2),
    )
)
