"""Model Breadcrumbs: drop both tails of each task vector's magnitudes, then task arithmetic.

Formula, with δ_i = θ_i − θ_0: δ̂_i keeps the elements whose |δ_i| lies in the top ``density``
fraction but not in the top ``gamma`` fraction (the outliers): magnitude ranks in
[gamma, density), a kept fraction of density − gamma. θ = θ_0 + λ Σ_i w_i δ̂_i
(``normalize: true`` divides the w_i by Σ w_i); λ is folded into the per-checkpoint weights.
Space: delta (adapters: on ΔW_i, base 0, then re-factorised by SVD) or full (with a base).
Reference: Davari & Belilovsky 2023, Model Breadcrumbs (arXiv 2312.06795).

Where mwakit deliberately differs:
- ``density`` is where the band starts from the top (as in `ties` and `magnitude_prune`), not
  the kept fraction: mergekit keeps ranks [gamma, gamma + density), so mergekit's density d
  is mwakit's d + gamma. This way ``trim_scope: model`` uses the same whole-model
  threshold as the other trims.
- With ``trim_scope: model`` the lower cut is whole-model and the outlier cut stays per tensor.
- Density 1 with gamma > 0 still drops the outliers (mergekit returns the tensor unchanged
  whenever density ≥ 1); density 1, gamma 0 is task arithmetic.
- mergekit's ``breadcrumbs`` is this weighted sum; its ``breadcrumbs_ties`` variant (sign
  election) is not offered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field, model_validator

from mwakit.methods.registry import CheckpointView, MergeMethod, register
from mwakit.methods.task_arithmetic import TASK_VECTOR_CONFIG, scaled_weights
from mwakit.methods.ties import TrimScope

if TYPE_CHECKING:
    import torch


class Params(BaseModel):
    """Parameters of `breadcrumbs`."""

    model_config = TASK_VECTOR_CONFIG

    density: float = Field(default=0.9, gt=0.0, le=1.0)
    """Top fraction of |δ| the kept band starts from, in (0, 1]; smaller magnitudes are dropped."""
    gamma: float = Field(default=0.01, ge=0.0, lt=1.0)
    """Fraction of the largest magnitudes also dropped as outliers, in [0, density)."""
    lambda_: float = Field(default=1.0, alias="lambda", allow_inf_nan=False)
    """Scaling λ of the summed task vectors."""
    normalize: bool = False
    """Divide the weights by Σ w_i first (a weighted mean of the task vectors)."""
    trim_scope: TrimScope = "tensor"
    """Where the density cut is taken: per tensor, or over the whole model."""

    @model_validator(mode="after")
    def _band(self) -> Params:
        if self.gamma >= self.density:
            raise ValueError(
                f"gamma ({self.gamma}) must be below density ({self.density}): the kept band is "
                "the magnitude ranks between the two, so nothing would be kept"
            )
        return self


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
    """θ_0 + Σ w_i band(δ_i); the weights already include λ.

    Args:
        tensors: θ_i (or ΔW_i when ``base`` is None), any float dtype.
        weights: Per-checkpoint weights from `weigh`.
        params: Validated `Params`.
        base: θ_0; None means the inputs are the task vectors and the merged delta is returned.
        dtype: Compute and result dtype (default float32; half precision computes in float32).
        key: Tensor name (unused: deterministic).
        thresholds: Per-checkpoint lower cuts (``trim_scope: model``): keep |δ_i| ≥
            thresholds[i] (and below the tensor's own outlier cut).
    """
    from mwakit.methods import blocks
    from mwakit.methods.sparsify import keep_count, outlier_count

    dt = blocks.compute_dtype(dtype)
    n = tensors[0].numel()
    k_low = keep_count(params.density, n)
    k_top = outlier_count(params.gamma, n)
    # Both cuts of a tensor come from one selection pass: the band's lower edge (unless it is
    # whole-model or keeps everything) and the outlier cut (unless gamma keeps none).
    low_k = [k_low] if thresholds is None and k_low < n else []
    top_k = [k_top] if k_top else []
    ks = low_k + top_k
    trims = []
    for i, (t, w) in enumerate(zip(tensors, weights, strict=True)):
        # Zero weights are skipped by the merge: nothing to select for them.
        cuts = blocks.kth_largest_abs(t, base, ks, dt) if w != 0.0 and ks else []
        low = cuts[0] if low_k and cuts else (None if thresholds is None else thresholds[i])
        high = cuts[-1] if top_k and cuts else None
        trims.append(blocks.Trim(keep_from=low, drop_from=high))
    return blocks.merge(tensors, weights, base, trims, consensus=False, dtype=dt)


METHOD = register(
    MergeMethod(
        name="breadcrumbs",
        params=Params,
        merge=merge,
        weigh=weigh,
        summary="drop the smallest and the largest (outlier) magnitudes, then a weighted sum",
        formula="δ̂_i = δ_i ⊙ [rank |δ_i| ∈ [gamma, density)]; θ = θ_0 + λ Σ w_i δ̂_i",
        reference="Davari & Belilovsky 2023, Model Breadcrumbs (arXiv 2312.06795)",
        linear=False,
        spaces=("delta", "full"),
        needs_base=True,
    )
)
