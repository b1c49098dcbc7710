"""DARE (Drop And REscale), then task arithmetic (`dare_linear`) or TIES (`dare_ties`).

Formula, with δ_i = θ_i − θ_0 and drop rate p: each element of each δ_i is dropped with
probability p and the kept ones are scaled by 1/(1 − p), so E[δ̂_i] = δ_i. Then
- dare_linear: θ = θ_0 + λ Σ_i w_i δ̂_i (λ folded into the weights, as task_arithmetic);
- dare_ties: TIES sign election γ = sign(Σ w_i δ̂_i) and disjoint mean, θ = θ_0 + λ δ_m
  (no magnitude trim: the random drop is the sparsification).
Space: delta (adapters: on ΔW_i, base 0, then re-factorised by SVD) or full (with a base).
Reference: Yu et al. 2023, Language Models are Super Mario (arXiv 2311.03099).

Reproducible: element j is kept iff r_j < (1 − p)·2^31, with r_j the counter-based SplitMix64
bits of `mwakit.methods.splitmix` seeded by a stable hash of (``seed``, tensor name, checkpoint
index), so the same recipe gives bit-identical output in any tensor order and on CPU or GPU.

Where mwakit deliberately differs:
- The rescale is the paper's 1/(1 − p) per element; mergekit's ``rescale`` restores each
  tensor's L1 norm instead.
- The parameter is the paper's drop rate p (mergekit and PEFT take density = 1 − p); p = 1 is
  an error rather than an all-zero merge.
- dare_ties elects signs by weighted mass and takes the weighted disjoint mean (see `ties`);
  PEFT's dare_ties elects unweighted and divides by the count of agreeing checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field, field_validator

from mwakit.methods.registry import CheckpointView, MergeMethod, register
from mwakit.methods.task_arithmetic import TASK_VECTOR_CONFIG, scaled_weights

if TYPE_CHECKING:
    import torch

    from mwakit.methods.blocks import Trim


class _DareParams(BaseModel):
    model_config = TASK_VECTOR_CONFIG

    drop_rate: float = 0.5
    """Drop probability p per element, in [0, 1); kept values are scaled by 1/(1 − p)."""
    seed: int = 0
    """Seed of the drop masks (with the tensor name and checkpoint index)."""
    lambda_: float = Field(default=1.0, alias="lambda", allow_inf_nan=False)
    """Scaling λ of the merged task vector."""

    @field_validator("drop_rate")
    @classmethod
    def _drop_rate(cls, v: float) -> float:
        if not (math.isfinite(v) and 0.0 <= v < 1.0):
            raise ValueError(
                f"drop_rate must be in [0, 1), got {v} (p = 1 drops everything and 1/(1 − p) "
                "is infinite)"
            )
        return v


class LinearParams(_DareParams):
    """Parameters of `dare_linear`."""

    normalize: bool = False
    """Divide the weights by Σ w_i first (a weighted mean of the task vectors)."""


class TiesParams(_DareParams):
    """Parameters of `dare_ties`."""


def weigh_linear(params: LinearParams, checkpoints: Sequence[CheckpointView]) -> list[float]:
    """λ times the recipe's ``weight`` (default 1), normalised if ``normalize``."""
    return scaled_weights(checkpoints, lam=params.lambda_, normalized=params.normalize)


def weigh_ties(params: TiesParams, checkpoints: Sequence[CheckpointView]) -> list[float]:
    """The recipe's ``weight`` (default 1); λ is applied to the disjoint mean in `merge_ties`."""
    return scaled_weights(checkpoints)


def _trims(params: _DareParams, key: str, count: int) -> list[Trim]:
    """One seeded DARE drop per checkpoint (`mwakit.methods.blocks.Trim`)."""
    from mwakit.methods import blocks, sparsify

    return [
        blocks.Trim(drop_rate=params.drop_rate, seed=sparsify.derive_seed(params.seed, key, i))
        for i in range(count)
    ]


def merge_linear(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: LinearParams,
    *,
    base: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    key: str = "",
) -> torch.Tensor:
    """DARE then θ_0 + Σ w_i δ̂_i (weights include λ). ``key`` seeds the masks."""
    from mwakit.methods import blocks

    trims = _trims(params, key, len(tensors))
    return blocks.merge(tensors, weights, base, trims, consensus=False, dtype=dtype)


def merge_ties(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: TiesParams,
    *,
    base: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    key: str = "",
) -> torch.Tensor:
    """DARE then TIES sign election and disjoint mean, θ_0 + λ δ_m. ``key`` seeds the masks."""
    from mwakit.methods import blocks

    trims = _trims(params, key, len(tensors))
    return blocks.merge(
        tensors, weights, base, trims, consensus=True, scale=params.lambda_, dtype=dtype
    )


LINEAR = register(
    MergeMethod(
        name="dare_linear",
        params=LinearParams,
        merge=merge_linear,
        weigh=weigh_linear,
        summary="DARE: drop task-vector elements at random, rescale by 1/(1−p), weighted sum",
        formula="δ̂_i = m_i ⊙ δ_i / (1−p), m ~ Bernoulli(1−p); θ = θ_0 + λ Σ w_i δ̂_i",
        reference="Yu et al. 2023, Language Models are Super Mario (arXiv 2311.03099)",
        linear=False,
        spaces=("delta", "full"),
        factored=True,
        needs_base=True,
    )
)

TIES = register(
    MergeMethod(
        name="dare_ties",
        params=TiesParams,
        merge=merge_ties,
        weigh=weigh_ties,
        summary="DARE drop and rescale, then TIES sign election and disjoint mean",
        formula="δ̂_i = m_i ⊙ δ_i / (1−p); γ = sgn Σ w_i δ̂_i; θ = θ_0 + λ·mean_{agree} δ̂_i",
        reference="Yu et al. 2023 (arXiv 2311.03099) + Yadav et al. 2023 (arXiv 2306.01708)",
        linear=False,
        spaces=("delta", "full"),
        factored=True,
        needs_base=True,
    )
)
