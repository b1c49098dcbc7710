"""LoRA factor algebra: factor averaging, exact rank concatenation, QR + small-SVD truncation.

Shapes: A is (r, in) — conv (r, in, kh, kw) — and B is (out, r) — conv (out, r, 1, 1); the
embedding LoRA (lora_embedding_A (r, vocab), lora_embedding_B (dim, r)) has the same layout.
Every function treats A as (r, prod(rest)) and B as (out, r) and restores trailing dims.
Nothing here forms the out×in matrix except `dense_delta`/`dense_refactor`, which exist for
task-vector methods (whose sparsified ΔW is no longer low rank) and for tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def _acc(ts: Sequence[torch.Tensor], ws: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
    acc = torch.zeros(ts[0].shape, dtype=dtype, device=ts[0].device)
    for t, w in zip(ts, ws, strict=True):
        if t.shape != acc.shape:
            raise ValueError(f"shapes differ: {list(t.shape)} vs {list(acc.shape)}")
        if w != 0.0:
            acc.add_(t, alpha=w)  # promotes bf16 into the accumulator, no float32 copy
    return acc


def factors_average(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    weights: Sequence[float],
    scalings: Sequence[float],
    out_scaling: float,
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average factors: Ā = Σ w_i A_i, B̄ = Σ w_i (s_i/s_out) B_i (equal ranks).

    Folding s_i/s_out into B keeps each checkpoint's own update exact, so checkpoints with
    different α merge correctly; B̄Ā is still not Σ w_i ΔW_i (cross terms, METHODS.md §2).

    Raises:
        ValueError: Shapes (ranks) differ.
    """
    a = _acc(As, weights, dtype)
    b = _acc(Bs, [w * s / out_scaling for w, s in zip(weights, scalings, strict=True)], dtype)
    return a, b


def concat_factors(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    coeffs: Sequence[float],
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact rank concatenation: A* = [A_1; …; A_K], B* = [c_1 B_1, …, c_K B_K].

    B*A* = Σ c_i B_i A_i exactly (c_i = w_i s_i, output scaling 1); ranks may differ.
    """
    a = torch.cat([t.to(dtype) for t in As], dim=0)
    b = torch.cat([t.to(dtype) * c for t, c in zip(Bs, coeffs, strict=True)], dim=1)
    return a, b


@dataclass(frozen=True)
class Refactored:
    """A rank-``rank`` factorisation B·A and the relative Frobenius error of the truncation."""

    A: torch.Tensor
    B: torch.Tensor
    rel_error: float
    rank: int


def _split(
    u: torch.Tensor,
    s: torch.Tensor,
    vh: torch.Tensor,
    rank: int,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
) -> Refactored:
    k = min(rank, s.numel())
    total = float(s.square().sum())
    kept = float(s[:k].square().sum())
    rel = math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0
    root = s[:k].sqrt()
    b = u[:, :k] * root  # B' = U_r √S_r
    a = root[:, None] * vh[:k]  # A' = √S_r V_rᵀ
    if k < rank:  # pad with zero rows/columns: same product, the rank the config promises
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], dim=0)
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
    a = a.reshape(rank, *a_shape[1:])
    b = b.reshape(b_shape[0], rank, *b_shape[2:])
    return Refactored(A=a, B=b, rel_error=rel, rank=rank)


def refactor(
    A: torch.Tensor, B: torch.Tensor, rank: int, *, compute_dtype: torch.dtype = torch.float32
) -> Refactored:
    """Best rank-``rank`` factorisation of M = B·A without forming M.

    QR(B) = Q_b R_b and QR(Aᵀ) = Q_a R_a, then the SVD of the small R_b R_aᵀ = U S Vᵀ gives
    B' = Q_b U_r √S_r and A' = √S_r V_rᵀ Q_aᵀ. Cost O((out + in)·R²) for inner rank R, instead
    of O(out·in·min(out, in)) for a dense SVD.
    """
    a2 = A.reshape(A.shape[0], -1).to(compute_dtype)
    b2 = B.reshape(B.shape[0], -1).to(compute_dtype)
    qb, rb = torch.linalg.qr(b2)
    qa, ra = torch.linalg.qr(a2.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return _split(qb @ u, s, vh @ qa.T, rank, tuple(A.shape), tuple(B.shape))


def dense_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = s·B·A as a dense (out, in[, kh, kw]) tensor — for task-vector methods and tests."""
    m = B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)
    return (scaling * m).reshape(B.shape[0], *A.shape[1:])


def dense_refactor(
    delta: torch.Tensor, rank: int, *, compute_dtype: torch.dtype = torch.float32
) -> Refactored:
    """Truncated SVD of a dense (out, in[, kh, kw]) update into rank-``rank`` factors."""
    m = delta.reshape(delta.shape[0], -1).to(compute_dtype)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    a_shape = (rank, *delta.shape[1:])
    b_shape = (delta.shape[0], rank) + ((1,) * (delta.dim() - 2))
    return _split(u, s, vh, rank, a_shape, b_shape)
