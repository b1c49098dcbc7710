"""SCE: Select (by variance), Calculate (weights from squared magnitudes), Erase (sign conflicts).

Formula, per tensor, with task vectors δ_i = θ_i − θ_0 (i = 1..K):
1. Select: v_j = Var_i δ_i[j] (population variance across the K task vectors at position j);
   keep the positions whose v_j is among the top ``select_topk`` fraction (every position
   tied with the k-th largest is kept) and zero the others in every δ_i.
2. Calculate: η_i = w_i Σ_j δ̂_i[j]² / Σ_k w_k Σ_j δ̂_k[j]² — matrix-level coefficients from
   the squared magnitudes of the selected task vectors (w_i: the recipe's ``weight``, 1 by
   default, as in the paper).
3. Erase: γ = sign(Σ_i η_i δ̂_i); elements whose sign differs from γ are erased and
   δ_m = Σ_i η_i δ̂_i [agree] / Σ_i η_i [agree] (0 where none agree), θ = θ_0 + λ δ_m.

Worked example (the golden test), select_topk 0.5, w = 1:
δ_1 = (1, 3, 0, −1), δ_2 = (1, −2, 1, −3), δ_3 = (1, 0, −1, 2). Variances (0, 38/9, 2/3, 38/9):
positions 1 and 3 are kept, δ̂_1 = (0, 3, 0, −1), δ̂_2 = (0, −2, 0, −3), δ̂_3 = (0, 0, 0, 2).
Σ δ̂_i² = 10, 13, 4, so η = (10, 13, 4)/27. Position 1: mass 30 − 26 > 0, only δ̂_1 agrees → 3;
position 3: mass −10 − 39 + 8 < 0, δ̂_1 and δ̂_2 agree → (10·(−1) + 13·(−3))/23 = −49/23.
δ_m = (0, 3, 0, −49/23).

Space: delta (adapters: on ΔW_i, base 0, then re-factorised by SVD) or full (with a base).
Reference: Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models (arXiv 2408.07990);
as in mergekit's ``sce``.

Where mwakit deliberately differs from mergekit:
- The recipe's per-checkpoint ``weight`` multiplies η_i (mergekit's sce ignores weights; with
  the default weights the two agree), and ``lambda`` scales the merged task vector.
- Signs are elected by η-weighted mass and the erased mean is η-weighted (the disjoint mean
  of `ties`, run by the fused blocks of `mwakit.methods.blocks`).
- The variance threshold is found exactly by a selection (no sort) and keeps ties.
- A tensor whose selected task vectors are all zero is the base.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from mwakit.methods.registry import CheckpointView, MergeMethod, register
from mwakit.methods.task_arithmetic import TASK_VECTOR_CONFIG, scaled_weights

if TYPE_CHECKING:
    import torch

_CHUNK = 1 << 17
"""Positions per chunk when the variance across checkpoints is computed (512 KiB buffers)."""


class Params(BaseModel):
    """Parameters of `sce`."""

    model_config = TASK_VECTOR_CONFIG

    select_topk: float = Field(default=1.0, gt=0.0, le=1.0)
    """Fraction of positions kept by their variance across task vectors (1 = keep all)."""
    lambda_: float = Field(default=1.0, alias="lambda", allow_inf_nan=False)
    """Scaling λ of the merged task vector."""


def weigh(params: Params, checkpoints: Sequence[CheckpointView]) -> list[float]:
    """The recipe's ``weight`` (default 1); η_i and λ are applied in `merge`."""
    return scaled_weights(checkpoints)


def variance_mask_(deltas: Sequence[torch.Tensor], select_topk: float) -> None:
    """Zero, in every δ_i, the positions outside the top ``select_topk`` by variance."""
    import torch

    from mwakit.methods import blocks
    from mwakit.methods.sparsify import keep_count

    n = deltas[0].numel()
    k = keep_count(select_topk, n)
    if k >= n:
        return
    flat = [d.reshape(-1) for d in deltas]
    var = torch.empty(n, dtype=flat[0].dtype, device=flat[0].device)
    mean_buf = torch.empty(min(n, _CHUNK), dtype=var.dtype, device=var.device)
    diff_buf = torch.empty_like(mean_buf)
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        # Two passes over a cache-sized chunk with in-place float ops (no K × n stack):
        # the mean, then Σ (δ_i − mean)² / K.
        mean = mean_buf[: e - s].copy_(flat[0][s:e])
        for f in flat[1:]:
            mean.add_(f[s:e])
        mean.mul_(1.0 / len(flat))
        v = var[s:e].zero_()
        for f in flat:
            d = torch.sub(f[s:e], mean, out=diff_buf[: e - s])
            v.addcmul_(d, d)
        v.mul_(1.0 / len(flat))
    thr = blocks.kth_largest_abs(var, None, [k], var.dtype)[0]
    keep = var.ge_(thr)  # 1.0 where kept, 0.0 elsewhere, in var's buffer
    for f in flat:
        f.mul_(keep)


def merge(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: Params,
    *,
    base: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    key: str = "",
) -> torch.Tensor:
    """SCE over one tensor group.

    Args:
        tensors: θ_i (or ΔW_i when ``base`` is None), any float dtype.
        weights: The recipe's weights from `weigh` (multiplying η_i).
        params: Validated `Params`.
        base: θ_0; None means the inputs are the task vectors and the merged delta is returned.
        dtype: Compute and result dtype (float64 if asked, else float32).
        key: Tensor name (unused: SCE is deterministic).
    """
    from mwakit.methods import blocks, sparsify
    from mwakit.methods.sphere import dot64

    dt = blocks.compute_dtype(dtype)
    deltas = sparsify.task_vectors(tensors, base, dt)
    variance_mask_(deltas, params.select_topk)
    energy = [w * dot64(d.reshape(-1), d.reshape(-1)) for d, w in zip(deltas, weights, strict=True)]
    total = sum(energy)
    if total == 0.0:
        return sparsify.finish(deltas[0].zero_(), base, dt)
    eta = [e / total for e in energy]
    trims = [blocks.Trim() for _ in deltas]
    merged = blocks.merge(deltas, eta, None, trims, consensus=True, scale=params.lambda_, dtype=dt)
    return sparsify.finish(merged, base, dt)


METHOD = register(
    MergeMethod(
        name="sce",
        params=Params,
        merge=merge,
        weigh=weigh,
        summary="SCE: keep high-variance positions, weigh by squared size, erase sign conflicts",
        formula="δ̂_i = δ_i ⊙ [Var_i δ ∈ top-k]; η_i ∝ ‖δ̂_i‖²; θ = θ_0 + λ·mean^η_{agree} δ̂_i",
        reference="Wan et al. 2024, FuseChat (arXiv 2408.07990); as in mergekit's sce",
        linear=False,
        spaces=("delta", "full"),
        needs_base=True,
    )
)
