"""Model Breadcrumbs: drop both tails of each task vector's magnitudes, then task arithmetic
(`breadcrumbs`) or TIES sign election and disjoint mean (`breadcrumbs_ties`).

Formula, with δ_i = θ_i − θ_0: δ̂_i keeps the elements whose |δ_i| lies in the top ``density``
fraction but not in the top ``gamma`` fraction (the outliers): magnitude ranks in
[gamma, density), a kept fraction of density − gamma. Then
- breadcrumbs: θ = θ_0 + λ Σ_i w_i δ̂_i (``normalize: true`` divides the w_i by Σ w_i); λ is
  folded into the per-checkpoint weights;
- breadcrumbs_ties: γ = sign(Σ w_i δ̂_i), δ_m = Σ w_i δ̂_i [agree] / Σ w_i [agree],
  θ = θ_0 + λ δ_m (as `ties`, with the band instead of the top-density trim).
Space: delta (adapters: on ΔW_i, base 0, then re-factorised by SVD) or full (with a base).
Reference: Davari & Belilovsky 2023, Model Breadcrumbs (arXiv 2312.06795); the TIES variant
combines it with Yadav et al. 2023 (arXiv 2306.01708), as mergekit's ``breadcrumbs_ties``.

Worked example of breadcrumbs_ties (the golden test), w = 1, density 0.8, gamma 0.2 on five
elements (keep magnitude ranks 2–4 of 5, i.e. drop the largest and the smallest):
δ_1 = (0.5, −0.1, 0.3, 0.2, −0.4) → (0, 0, 0.3, 0.2, −0.4); δ_2 = (−0.2, 0.05, 0.4, 0.1, −0.3)
→ (−0.2, 0, 0, 0.1, −0.3); signs of the sums (−, ·, +, +, −); disjoint means
(−0.2, 0, 0.3, 0.15, −0.35).

Where mwakit deliberately differs:
- ``density`` is where the band starts from the top (as in `ties` and `magnitude_prune`), not
  the kept fraction: mergekit keeps ranks [gamma, gamma + density), so mergekit's density d
  is mwakit's d + gamma. This way ``trim_scope: model`` uses the same whole-model
  threshold as the other trims.
- Counts: the band starts at the ⌈density·n⌉-th largest |δ| and the outliers are the
  ⌊gamma·n⌋ largest; where those products are not whole, mergekit may round otherwise and
  keep one element more or less.
- With ``trim_scope: model`` the lower cut is whole-model and the outlier cut stays per tensor.
- Density 1 with gamma > 0 still drops the outliers (mergekit returns the tensor unchanged
  whenever density ≥ 1); density 1, gamma 0 is task arithmetic.
- breadcrumbs_ties elects signs by weighted mass and takes the weighted disjoint mean (as
  `ties`); λ scales the mean.
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

    from mwakit.methods.blocks import Trim


class _BandParams(BaseModel):
    model_config = TASK_VECTOR_CONFIG

    density: float = Field(default=0.9, gt=0.0, le=1.0)
    """Top fraction of |δ| the kept band starts from, in (0, 1]; smaller magnitudes are dropped."""
    gamma: float = Field(default=0.01, ge=0.0, lt=1.0)
    """Fraction of the largest magnitudes also dropped as outliers, in [0, density)."""
    lambda_: float = Field(default=1.0, alias="lambda", allow_inf_nan=False)
    """Scaling λ of the merged task vectors."""
    trim_scope: TrimScope = "tensor"
    """Where the density cut is taken: per tensor, or over the whole model."""

    @model_validator(mode="after")
    def _band(self) -> _BandParams:
        if self.gamma >= self.density:
            raise ValueError(
                f"gamma ({self.gamma}) must be below density ({self.density}): the kept band is "
                "the magnitude ranks between the two, so nothing would be kept"
            )
        return self


class Params(_BandParams):
    """Parameters of `breadcrumbs`."""

    normalize: bool = False
    """Divide the weights by Σ w_i first (a weighted mean of the task vectors)."""


class TiesParams(_BandParams):
    """Parameters of `breadcrumbs_ties`."""


def weigh(params: Params, checkpoints: Sequence[CheckpointView]) -> list[float]:
    """λ times the recipe's ``weight`` (default 1), normalised if ``normalize``."""
    return scaled_weights(checkpoints, lam=params.lambda_, normalized=params.normalize)


def weigh_ties(params: TiesParams, checkpoints: Sequence[CheckpointView]) -> list[float]:
    """The recipe's ``weight`` (default 1); λ is applied to the disjoint mean in `merge_ties`."""
    return scaled_weights(checkpoints)


def _band_trims(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: _BandParams,
    base: torch.Tensor | None,
    thresholds: Sequence[float] | None,
    dt: torch.dtype,
) -> list[Trim]:
    """One `Trim` per checkpoint: keep |δ_i| in [k_low-th largest, k_top-th largest)."""
    from mwakit.methods import blocks
    from mwakit.methods.sparsify import keep_count, outlier_count

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
    return trims


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

    dt = blocks.compute_dtype(dtype)
    trims = _band_trims(tensors, weights, params, base, thresholds, dt)
    return blocks.merge(tensors, weights, base, trims, consensus=False, dtype=dt)


def merge_ties(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: TiesParams,
    *,
    base: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    key: str = "",
    thresholds: Sequence[float] | None = None,
) -> torch.Tensor:
    """θ_0 + λ·(disjoint mean of band(δ_i)) (see `merge` for the arguments)."""
    from mwakit.methods import blocks

    dt = blocks.compute_dtype(dtype)
    trims = _band_trims(tensors, weights, params, base, thresholds, dt)
    return blocks.merge(
        tensors, weights, base, trims, consensus=True, scale=params.lambda_, dtype=dt
    )


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
        factored=True,
        needs_base=True,
    )
)

TIES = register(
    MergeMethod(
        name="breadcrumbs_ties",
        params=TiesParams,
        merge=merge_ties,
        weigh=weigh_ties,
        summary="breadcrumbs' magnitude band, then TIES sign election and disjoint mean",
        formula="δ̂_i = δ_i ⊙ [rank |δ_i| ∈ [gamma, density)]; θ = θ_0 + λ·mean_{agree} δ̂_i",
        reference="Davari & Belilovsky 2023 (arXiv 2312.06795) + TIES (arXiv 2306.01708)",
        linear=False,
        spaces=("delta", "full"),
        factored=True,
        needs_base=True,
    )
)
