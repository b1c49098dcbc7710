"""Magnitude pruning of task vectors, then task arithmetic.

Formula, with δ_i = θ_i − θ_0: δ̂_i keeps the top ``density`` fraction of |δ_i| (per tensor, or
over the whole model with ``trim_scope: model``), the rest is zeroed; θ = θ_0 + λ Σ_i w_i δ̂_i
(``normalize: true`` divides the w_i by Σ w_i). λ is folded into the per-checkpoint weights.
Space: delta (adapters: on ΔW_i, base 0, then re-factorised by SVD) or full (with a base).
Reference: TIES step 1 without sign election (Yadav et al. 2023, arXiv 2306.01708); PEFT's
``magnitude_prune`` combination and mergekit's task_arithmetic with ``density``.

Where mwakit deliberately differs:
- ``density`` defaults to 0.2 (as `ties`); mergekit's density defaults to 1.0.
- No rescale of the kept values (PEFT and mergekit do not rescale magnitude pruning either).
- Trimming keeps every element tied with the k-th largest |δ| (exact selection, no sort).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from mwakit.methods.registry import CheckpointView, MergeMethod, register
from mwakit.methods.task_arithmetic import TASK_VECTOR_CONFIG, scaled_weights
from mwakit.methods.ties import TrimScope

if TYPE_CHECKING:
    import torch


class Params(BaseModel):
    """Parameters of `magnitude_prune`."""

    model_config = TASK_VECTOR_CONFIG

    density: float = Field(default=0.2, gt=0.0, le=1.0)
    """Fraction of each task vector kept by magnitude, in (0, 1] (1 = task arithmetic)."""
    lambda_: float = Field(default=1.0, alias="lambda", allow_inf_nan=False)
    """Scaling λ of the summed task vectors."""
    normalize: bool = False
    """Divide the weights by Σ w_i first (a weighted mean of the task vectors)."""
    trim_scope: TrimScope = "tensor"
    """Where the top-density trim is taken: per tensor, or over the whole model (the paper)."""


def weigh(params: Params, checkpoints: Sequence[CheckpointView]) -> list[float]:
    """λ times the recipe's ``weight`` (default 1), normalised if ``normalize``."""
    return scaled_weights(checkpoints, lam=params.lambda_, normalized=params.normalize)


def merge(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: Params,
    *,
    base: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    key: str = "",
    thresholds: Sequence[float] | None = None,
) -> torch.Tensor:
    """θ_0 + Σ w_i top-density(δ_i); the weights already include λ.

    Args:
        tensors: θ_i (or ΔW_i when ``base`` is None), any float dtype.
        weights: Per-checkpoint weights from `weigh`.
        params: Validated `Params`.
        base: θ_0; None means the inputs are the task vectors and the merged delta is returned.
        dtype: Compute and result dtype (default float32; half precision computes in float32).
        key: Tensor name (unused: deterministic).
        thresholds: Per-checkpoint thresholds (``trim_scope: model``): keep |δ_i| ≥ thresholds[i].
    """
    from mwakit.methods import blocks

    dt = blocks.compute_dtype(dtype)
    trims = blocks.magnitude_trims(tensors, weights, base, params.density, thresholds, dt)
    return blocks.merge(tensors, weights, base, trims, consensus=False, dtype=dt)


METHOD = register(
    MergeMethod(
        name="magnitude_prune",
        params=Params,
        merge=merge,
        weigh=weigh,
        summary="keep the largest-magnitude fraction of each task vector, then a weighted sum",
        formula="δ̂_i = top-density(δ_i); θ = θ_0 + λ Σ w_i δ̂_i",
        reference="Yadav et al. 2023 (arXiv 2306.01708), trim step; PEFT magnitude_prune",
        linear=False,
        spaces=("delta", "full"),
        factored=True,
        needs_base=True,
    )
)
