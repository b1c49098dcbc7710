"""Linear / weighted average (model soup, checkpoint averaging).

Formula: θ = Σ_i w_i θ_i / Σ_i w_i (``normalize: true``, the default), else θ = Σ_i w_i θ_i.
Space: factors, delta or full — it is linear, so LoRA factors and low-rank forms are exact per
checkpoint. The sum accumulates in float32 (float64 for ``dtype: float64``) whatever the compute
dtype, then is rounded to it once.
Reference: Wortsman et al. 2022 (model soups); Schmidt et al. 2023 (checkpoint averaging).
Each checkpoint's ``weight`` comes from the recipe (default 1: a uniform soup).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from mwakit.methods.registry import CheckpointView, MergeMethod, register
from mwakit.weights import normalize

if TYPE_CHECKING:
    import torch


class Params(BaseModel):
    """Parameters of `linear`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    normalize: bool = True
    """Divide by Σ w_i so the weights sum to 1."""


def weigh(params: Params, checkpoints: Sequence[CheckpointView]) -> list[float]:
    """Per-checkpoint weights: the recipe's ``weight`` (default 1), normalised if asked."""
    raw = [1.0 if c.weight is None else c.weight for c in checkpoints]
    return normalize(raw, [c.name for c in checkpoints]) if params.normalize else raw


def weighted_sum(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: Any = None,
    *,
    base: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    key: str = "",
) -> torch.Tensor:
    """Σ_i w_i t_i in ``dtype`` (default float32), accumulated in float32 (float64 for
    ``dtype: float64``) whatever ``dtype`` is, and rounded to it once at the end.

    Inputs may be bf16/fp16 views straight from the file: each is widened into one reused
    float32 buffer, never a fresh float32 copy per input.
    """
    import torch

    from mwakit.methods.precision import accumulator

    dt = dtype or torch.float32
    acc = torch.zeros(tensors[0].shape, dtype=accumulator(dt), device=tensors[0].device)
    buf: torch.Tensor | None = None
    for t, w in zip(tensors, weights, strict=True):
        if w == 0.0:
            continue
        if t.dtype.is_floating_point and t.dtype.itemsize < acc.dtype.itemsize:
            # Widen into one reused buffer first: a mixed-dtype add_ takes torch's slow
            # promoting loop (bf16 inputs: ~1.5x the time of copy + same-dtype add). Only for
            # narrower inputs: widening is exact, so the sum is bit for bit the same.
            if buf is None:
                buf = torch.empty_like(acc)
            t = buf.copy_(t)
        acc.add_(t, alpha=w)
    return acc if acc.dtype == dt else acc.to(dt)


METHOD = register(
    MergeMethod(
        name="linear",
        params=Params,
        merge=weighted_sum,
        weigh=weigh,
        summary="weighted average with explicit per-checkpoint weights (uniform soup by default)",
        formula="θ = Σ w_i θ_i / Σ w_i",
        reference="Wortsman et al. 2022, Model soups (arXiv 2203.05482)",
        linear=True,
        spaces=("factors", "delta", "full"),
    )
)
