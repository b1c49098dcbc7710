"""Model Stock: interpolate between the base and the average, by the task vectors' angle.

Formula, with δ_i = θ_i − θ_0 and N ≥ 2 checkpoints:
c = mean over pairs i < j of cos(δ_i, δ_j); t = N·c / (1 + (N − 1)·c);
θ = t · Σ_i w_i θ_i + (1 − t) · θ_0, i.e. θ_0 + t · Σ_i w_i δ_i (w normalised, uniform by
default). ``filter_wise: true`` takes the cosines, and so t, per output row (dim 0) instead of
per tensor. Without a base (LoRA ΔW, base 0) the result is t · Σ_i w_i δ_i.
Space: delta (adapters: on ΔW_i, then re-factorised by SVD) or full (needs ``base_model``).
Reference: Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models
(arXiv 2403.19522); mergekit's ``model_stock``.

Where mwakit deliberately differs from mergekit:
- c is clamped to [0, 1] before computing t. For N unit vectors c ≥ −1/(N − 1), and as c nears
  that bound t goes to −∞; mergekit lets t go negative (extrapolating away from the average).
  Task vectors that point apart carry no shared direction, so here they give t = 0: the base.
- A pair with a zero-norm task vector has cosine 0 (mergekit: ⟨a,b⟩ / max(‖a‖‖b‖, 1e-6),
  which is also 0 for an exact zero, but scales tiny vectors' cosines down).
- The average honours per-checkpoint ``weight`` (normalised); mergekit always uses equal
  weights. The cosines, and so t, are unweighted, as in the paper.
- Cosines come from norms and dot products summed in float64; deltas and the average are
  computed in float32 (float64 for ``dtype: float64``) and rounded to ``dtype`` once.
- With ``filter_wise`` a row is everything under one index of dim 0 (one t per output
  filter, also for 3-D+ tensors, where mergekit takes the cosine over the last dim only);
  tensors of at most one dimension have a single row, as in mergekit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from mwakit.methods.registry import CheckpointView, MergeMethod, register
from mwakit.weights import normalize

if TYPE_CHECKING:
    import torch


class Params(BaseModel):
    """Parameters of `model_stock`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    filter_wise: bool = False
    """Take the cosines (and t) per output row instead of over the whole tensor."""


def weigh(params: Params, checkpoints: Sequence[CheckpointView]) -> list[float]:
    """The recipe's ``weight`` (default 1: the paper's plain average), normalised."""
    raw = [1.0 if c.weight is None else c.weight for c in checkpoints]
    return normalize(raw, [c.name for c in checkpoints])


def stock_ratio(cos: torch.Tensor, n: int) -> torch.Tensor:
    """t = N·c / (1 + (N − 1)·c), with c clamped to [0, 1] (so t is in [0, 1] too)."""
    c = cos.clamp(0.0, 1.0)
    return (n * c) / (1.0 + (n - 1) * c)


def mean_pairwise_cosine(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean of cos(x_i, x_j) over pairs i < j, per row of 2-D inputs (0 for a zero vector).

    Norms and dot products are summed in float64 block by block
    (`mwakit.methods.precision.row_grams64`): in float32 they drift by 1e-5 relative over
    large rows, and a float64 copy of every input would double the memory.

    Args:
        rows: N ≥ 2 tensors of shape (R, D): R rows, each a vector of D elements.

    Returns:
        Shape (R,), float64: the mean pairwise cosine of each row.
    """
    import torch

    from mwakit.methods.precision import row_grams64

    g = row_grams64(rows)
    n = len(rows)
    norms = [g[i, i].sqrt() for i in range(n)]
    total = torch.zeros_like(norms[0])
    pairs = 0
    for i in range(n):
        for j in range(i + 1, n):
            denom = norms[i] * norms[j]
            # No direction, no agreement: a zero vector counts as orthogonal to everything.
            cos = torch.where(
                denom > 0, g[i, j] / denom.clamp_min(torch.finfo(denom.dtype).tiny), 0.0
            )
            total += cos.clamp(-1.0, 1.0)
            pairs += 1
    return total / pairs


def merge(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: Params,
    *,
    base: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    key: str = "",
) -> torch.Tensor:
    """Model Stock over one tensor group.

    Args:
        tensors: θ_i (or ΔW_i when ``base`` is None), N ≥ 2, any float dtype.
        weights: Per-checkpoint weights from `weigh` (normalised by it).
        params: Validated `Params`.
        base: θ_0; None means the inputs are the task vectors (base 0).
        dtype: Compute and result dtype (default float32).
        key: Tensor name (unused).

    Returns:
        θ_0 + t · Σ w_i δ_i in ``dtype`` (t · Σ w_i δ_i without a base).

    Raises:
        ValueError: Fewer than two tensors (the angle between task vectors needs a pair).
    """
    import torch

    from mwakit.methods.precision import accumulator

    n = len(tensors)
    if n < 2:
        raise ValueError(f"model_stock needs at least 2 checkpoints, got {n}")
    dt = dtype or torch.float32
    acc = accumulator(dt)  # deltas, sums and the base add in float32 at least; rounded once
    b = None if base is None else base.to(acc)
    deltas = [t.to(acc) if b is None else t.to(acc) - b for t in tensors]
    shape = deltas[0].shape
    # Rows: dim 0 when filter-wise (one t per output filter), else the whole tensor as one.
    n_rows = shape[0] if params.filter_wise and len(shape) >= 2 else 1
    rows = [d.reshape(n_rows, -1) for d in deltas]
    t = stock_ratio(mean_pairwise_cosine(rows), n)
    avg = torch.zeros_like(rows[0])
    for d, w in zip(rows, weights, strict=True):
        avg.add_(d, alpha=w)
    out = avg.mul_(t.to(acc).unsqueeze(1)).reshape(shape)
    if b is not None:
        out = out.add_(b)
    return out if out.dtype == dt else out.to(dt)


METHOD = register(
    MergeMethod(
        name="model_stock",
        params=Params,
        merge=merge,
        weigh=weigh,
        summary="Model Stock: move from the base toward the average by the task vectors' angle",
        formula="c = mean cos(δ_i, δ_j); t = N·c/(1+(N−1)·c); θ = t·mean θ_i + (1−t)·θ_0",
        reference="Jang et al. 2024, Model Stock (arXiv 2403.19522)",
        linear=False,
        spaces=("delta", "full"),
        needs_base=True,
        inputs=(2, None),
    )
)
