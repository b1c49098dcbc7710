"""DELLA: magnitude-ranked random drop (MAGPRUNE), then TIES sign election and disjoint mean
(`della`) or a weighted sum (`della_linear`).

Formula, with δ_i = θ_i − θ_0: in each row of δ_i (the first dimension; a vector is one row)
the element of magnitude rank r (0 = smallest of m) is kept with probability
p = density − ε + 2ε·r/(m − 1), in [density − ε, density + ε], and scaled by 1/p when kept, so
E[δ̂_i] = δ_i. Then
- della: γ = sign(Σ w_i δ̂_i), δ_m = Σ w_i δ̂_i [agree] / Σ w_i [agree] and θ = θ_0 + λ δ_m
  (as `ties`);
- della_linear: θ = θ_0 + λ Σ w_i δ̂_i (``normalize: true`` divides the w_i by Σ w_i; λ is
  folded into the weights, as `dare_linear`).

Worked example of della_linear (the golden test), ε = 0 (so p = density everywhere): with
density 0.5 each kept element is doubled, and the merge is λ Σ w_i m_i ⊙ δ_i / 0.5 for the
seeded masks m_i — the test checks it against the masks drawn from the pure-Python SplitMix64.
Space: delta (adapters: on ΔW_i, base 0, then re-factorised by SVD) or full (with a base).
Reference: Deep et al. 2024, DELLA-Merging (arXiv 2406.11617).

Reproducible: the draws are the counter-based SplitMix64 bits of `mwakit.methods.splitmix`
seeded by a stable hash of (``seed``, tensor name, checkpoint index), the same on CPU and GPU;
ties in |δ| are ranked by position.

Where mwakit deliberately differs:
- ``della`` is mergekit's ``della`` (sign election + disjoint mean) and ``della_linear`` its
  ``della_linear`` (no election).
- A density ± epsilon outside [0, 1] is a recipe error for every density; mergekit skips the
  check (and the drop) when density ≥ 1. density 1 needs epsilon 0 and then keeps everything.
- Signs are elected by weighted mass and the mean is weighted by w (see `ties`).
- Ranks come from one stable sort per row: a rank is a full order, unlike the trims of the other
  methods, which only need the k-th value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field, model_validator

from mwakit.methods.registry import CheckpointView, MergeMethod, register
from mwakit.methods.task_arithmetic import TASK_VECTOR_CONFIG, scaled_weights

if TYPE_CHECKING:
    import torch


class Params(BaseModel):
    """Parameters of `della`."""

    model_config = TASK_VECTOR_CONFIG

    density: float = Field(default=0.5, gt=0.0, le=1.0)
    """Mean keep probability, in (0, 1]."""
    epsilon: float = Field(default=0.15, ge=0.0, allow_inf_nan=False)
    """Spread ε: keep probabilities run from density − ε (smallest |δ|) to density + ε."""
    lambda_: float = Field(default=1.0, alias="lambda", allow_inf_nan=False)
    """Scaling λ of the merged task vector."""
    seed: int = 0
    """Seed of the drop masks (with the tensor name and checkpoint index)."""

    @model_validator(mode="after")
    def _range(self) -> Params:
        lo, hi = self.density - self.epsilon, self.density + self.epsilon
        # A hair of tolerance so that e.g. density 0.85, epsilon 0.15 is accepted.
        if lo < -1e-12 or hi > 1.0 + 1e-12 or math.isnan(lo + hi):
            raise ValueError(
                f"density ± epsilon must stay within [0, 1] (keep probabilities), got "
                f"[{lo:g}, {hi:g}]: lower epsilon or move density"
            )
        return self


def weigh(params: Params, checkpoints: Sequence[CheckpointView]) -> list[float]:
    """The recipe's ``weight`` (default 1); λ is applied to the disjoint mean in `merge`."""
    return scaled_weights(checkpoints)


class LinearParams(Params):
    """Parameters of `della_linear`."""

    normalize: bool = False
    """Divide the weights by Σ w_i first (a weighted mean of the task vectors)."""


def weigh_linear(params: LinearParams, checkpoints: Sequence[CheckpointView]) -> list[float]:
    """λ times the recipe's ``weight`` (default 1), normalised if ``normalize``."""
    return scaled_weights(checkpoints, lam=params.lambda_, normalized=params.normalize)


def _dropped(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: Params,
    key: str,
    dt: torch.dtype,
) -> list[torch.Tensor]:
    """δ̂_i: each task vector with DELLA's ranked drop and 1/p rescale (seeded by ``key``)."""
    from mwakit.methods import sparsify

    deltas = sparsify.task_vectors(tensors, base, dt)
    for i, d in enumerate(deltas):
        probs = sparsify.della_keep_probs(d, params.density, params.epsilon)
        keep = sparsify.bernoulli_keep(
            d.shape, probs, sparsify.derive_seed(params.seed, key, i), d.device
        )
        deltas[i] = sparsify.della_rescale(d, keep, probs)  # one δ in memory per checkpoint
    return deltas


def merge(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: Params,
    *,
    base: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    key: str = "",
) -> torch.Tensor:
    """DELLA over one tensor group; ``key`` seeds the masks (see the module docstring)."""
    from mwakit.methods import blocks, sparsify

    dt = blocks.compute_dtype(dtype)
    deltas = _dropped(tensors, base, params, key, dt)
    trims = [blocks.Trim() for _ in deltas]
    merged = blocks.merge(
        deltas, weights, None, trims, consensus=True, scale=params.lambda_, dtype=dt
    )
    return sparsify.finish(merged, base, dt)


def merge_linear(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: LinearParams,
    *,
    base: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    key: str = "",
) -> torch.Tensor:
    """DELLA's drop, then θ_0 + Σ w_i δ̂_i (the weights include λ); ``key`` seeds the masks."""
    from mwakit.methods import blocks, sparsify

    dt = blocks.compute_dtype(dtype)
    deltas = _dropped(tensors, base, params, key, dt)
    trims = [blocks.Trim() for _ in deltas]
    merged = blocks.merge(deltas, weights, None, trims, consensus=False, dtype=dt)
    return sparsify.finish(merged, base, dt)


METHOD = register(
    MergeMethod(
        name="della",
        params=Params,
        merge=merge,
        weigh=weigh,
        summary="DELLA: drop with magnitude-ranked probabilities, rescale 1/p, then TIES consensus",
        formula="p = density ± ε by |δ| rank; δ̂ = m ⊙ δ / p; θ = θ_0 + λ·mean_{agree} δ̂_i",
        reference="Deep et al. 2024, DELLA-Merging (arXiv 2406.11617)",
        linear=False,
        spaces=("delta", "full"),
        needs_base=True,
    )
)

LINEAR = register(
    MergeMethod(
        name="della_linear",
        params=LinearParams,
        merge=merge_linear,
        weigh=weigh_linear,
        summary="DELLA's magnitude-ranked drop and 1/p rescale, then a weighted sum (no election)",
        formula="p = density ± ε by |δ| rank; δ̂ = m ⊙ δ / p; θ = θ_0 + λ Σ w_i δ̂_i",
        reference="Deep et al. 2024, DELLA-Merging (arXiv 2406.11617)",
        linear=False,
        spaces=("delta", "full"),
        needs_base=True,
    )
)
