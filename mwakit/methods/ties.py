"""TIES-Merging: trim, elect sign, disjoint merge.

Formula, with δ_i = θ_i − θ_0:
1. Trim: δ̂_i keeps the top ``density`` fraction of |δ_i| (per tensor; ``trim_scope: model``
   keeps the top fraction over the whole model, as in the paper).
2. Elect: γ = sign(Σ_i w_i δ̂_i); where that is exactly 0, the majority sign of the tensor.
3. Disjoint mean: δ_m = Σ_i w_i δ̂_i [sign δ̂_i = γ] / Σ_i w_i [sign δ̂_i = γ], 0 where none agree.
4. θ = θ_0 + λ δ_m.
Space: delta (adapters: on ΔW_i, base 0, then re-factorised by SVD) or full (with a base).
Reference: Yadav et al. 2023, TIES-Merging (arXiv 2306.01708).

Where mwakit deliberately differs:
- ``density`` defaults to 0.2, the paper's value; mergekit defaults to 1.0 (no trim).
- Signs are elected by weighted mass Σ w_i δ̂_i (as mergekit); PEFT elects on the unweighted
  Σ δ̂_i, so there a checkpoint's weight does not count in the vote.
- The merge is always the disjoint MEAN weighted by w (mergekit's ``normalize: true``). PEFT
  divides Σ w_i δ̂_i by the number of agreeing checkpoints instead of their total weight.
- λ scales the mean inside the merge, so the per-checkpoint weights are the recipe's ``weight``
  alone: folded into the weights λ would cancel in the mean.
- Trimming keeps every element tied with the k-th largest |δ|, found exactly without a sort
  (`mwakit.methods.blocks.kth_largest_abs`).
- ``dtype: bfloat16``/``float16`` computes in float32 (written in the output dtype).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from mwakit.methods.registry import CheckpointView, MergeMethod, register
from mwakit.methods.task_arithmetic import TASK_VECTOR_CONFIG, scaled_weights

if TYPE_CHECKING:
    import torch

TrimScope = Literal["tensor", "model"]


class Params(BaseModel):
    """Parameters of `ties`."""

    model_config = TASK_VECTOR_CONFIG

    density: float = Field(default=0.2, gt=0.0, le=1.0)
    """Fraction of each task vector kept by magnitude, in (0, 1] (paper: 0.2; 1 = no trim)."""
    lambda_: float = Field(default=1.0, alias="lambda", allow_inf_nan=False)
    """Scaling λ of the merged task vector."""
    trim_scope: TrimScope = "tensor"
    """Where the top-density trim is taken: per tensor, or over the whole model (the paper)."""


def weigh(params: Params, checkpoints: Sequence[CheckpointView]) -> list[float]:
    """The recipe's ``weight`` (default 1); λ is applied to the disjoint mean in `merge`."""
    return scaled_weights(checkpoints)


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
    """TIES over one tensor group.

    Args:
        tensors: θ_i (or ΔW_i when ``base`` is None), any float dtype.
        weights: Per-checkpoint weights from `weigh` (or the recipe's weighting block).
        params: Validated `Params`.
        base: θ_0; None means the inputs are the task vectors and the merged delta is returned.
        dtype: Compute and result dtype (default float32; half precision computes in float32).
        key: Tensor name (unused: TIES is deterministic).
        thresholds: Per-checkpoint magnitude thresholds (``trim_scope: model``): keep
            |δ_i| ≥ thresholds[i] instead of the per-tensor top ``density``.
    """
    from mwakit.methods import blocks

    dt = blocks.compute_dtype(dtype)
    trims = blocks.magnitude_trims(tensors, weights, base, params.density, thresholds, dt)
    return blocks.merge(
        tensors, weights, base, trims, consensus=True, scale=params.lambda_, dtype=dt
    )


METHOD = register(
    MergeMethod(
        name="ties",
        params=Params,
        merge=merge,
        weigh=weigh,
        summary="TIES: trim each task vector by magnitude, elect signs, disjoint mean",
        formula="δ̂_i = top-density(δ_i); γ = sgn Σ w_i δ̂_i; θ = θ_0 + λ·mean_{sgn δ̂_i = γ} δ̂_i",
        reference="Yadav et al. 2023, TIES-Merging (arXiv 2306.01708)",
        linear=False,
        spaces=("delta", "full"),
        factored=True,
        needs_base=True,
    )
)
