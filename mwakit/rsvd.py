"""Randomized truncated SVD of a dense ΔW, certified against the optimal truncation error.

Task-vector merges of adapters (TIES, DARE, DELLA, SCE, breadcrumbs, …) produce a dense ΔW per
module that `mwakit.lowrank.dense_refactor` cuts back to rank k. A dense SVD of a 14336×4096
matrix takes minutes; this module finds the rank-k truncation from a thin sketch instead
(Halko, Martinsson and Tropp 2011, Algorithms 4.4 and 5.1: randomized range finder with
subspace iteration):

1. Ω: n×l test matrix, l = k + p (p = `OVERSAMPLE`), entries uniform in (−1, 1) drawn with
   SplitMix64 from a seed (the module name), so the sketch is a pure function of (ΔW, name).
2. Q = orth(ΔW Ω); ``power_iters`` times Q = orth(ΔW orth(ΔWᵀ Q)) (re-orthonormalised at every
   step, so float32 does not lose the small directions).
3. Bᵀ = ΔWᵀ Q and the small SVD of B = QᵀΔW (l×n) from the eigen-decomposition of B Bᵀ
   (l×l, float64): B = W Σ̃ Vᵀ, so U_k = Q W_k and V_k = Bᵀ W_k Σ̃_k⁻¹.

The result U_k Σ̃_k V_kᵀ is the projection P_k ΔW onto k orthonormal directions, so its error
is known exactly: e² = ‖ΔW‖² − Σ_{i≤k} σ̃_i² (computed from the residual itself when it is
small, where the difference would cancel). The optimal error e*² = Σ_{i>k} σ_i² is not known;
the result is accepted ("certified") when e ≤ 1.01·e* (`ACCURACY`) follows from either

- the bound e*² ≥ S, S = Σ_{k<i≤l} σ̃_i² the energy of the p extra directions (σ̃_i ≤ σ_i by
  interlacing): accept when S ≥ e²/1.01², i.e. the tail lies (almost) inside the sketch — for
  example ΔW of rank ≤ l; or
- the estimate e*² ≈ e² − D, D the top-k energy the sketch still misses, Σ_{i≤k} (σ_i² − σ̃_i²):
  subspace iteration gains it geometrically, so the gains of the last iterations, extrapolated
  (`_deficit`), estimate D. Accept when D ≤ (1 − 1/1.01²)·e² ≈ 2 % of e². This is the usual
  case after TIES/DARE: their trims and masks spread the tail over thousands of directions,
  the top directions converge in two iterations, and e is dominated by the tail anyway.

Otherwise one wider sketch (4·l columns, one more iteration) is tried, then the dense SVD.

Structure: the rank of a task-vector merge of K rank-r adapters is NOT bounded by K·r — a trim
or a random mask is applied element by element, and mask ⊙ (B A) has full rank. What the sketch
exploits is the shape of the spectrum (a few strong directions over a flat tail), and that a
pass over ΔW in float32 BLAS costs a fraction of an SVD (2q + 2 passes).

Thread count: products whose reduction runs over a large dimension are split into fixed chunks
of `CHUNK`, each chunk multiplied by BLAS and accumulated in float64 in a fixed order, and every
small decomposition runs single-threaded (`mwakit.lowrank.serial`): BLAS partitions a long
reduction differently for 1 and 2 threads, a chunk of 512 it does not split. The results are
the same bytes whatever the thread count (see README "Reproducibility" for what is not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "ACCURACY",
    "OVERSAMPLE",
    "POWER_ITERS",
    "Sketch",
    "sketch",
    "sum_squares",
    "test_matrix",
    "worth",
]

OVERSAMPLE = 10
"""Extra sketch columns p beyond the rank (Halko et al. suggest 5–10)."""

POWER_ITERS = 2
"""Subspace iterations q of the first sketch (each costs two passes over ΔW)."""

ACCURACY = 1.01
"""A sketch is accepted when its error is provably (or, see the module text, by the sketch's
estimate) within this factor of the optimal truncation error."""

CHUNK = 512
"""Length of the fixed chunks a long reduction is split into (thread-count independence)."""

EXACT_BELOW = 256
"""Matrices whose smaller side is at most this (or 4× the sketch width) get the dense SVD: it is
as fast there, and exact."""

_NOISE = 1e-6
"""Relative rounding noise of a sketch's captured energy (float32 products, chunked sums)."""

_SLOW = 0.9
"""Energy gains shrinking slower than this per iteration are not extrapolated."""

_CUT = 1e-13
"""Directions of a sketch with σ² below this fraction of the largest are dropped (numerically
zero: ΔW has lower rank than the sketch is wide)."""


@dataclass(frozen=True)
class Sketch:
    """A rank-k truncation U·diag(S)·Vh found from a randomized sketch, and its checks.

    Attributes:
        u: (m, k') with orthonormal columns, k' ≤ k (fewer when ΔW has lower rank).
        s: (k',) the singular values σ̃_1 ≥ … of the truncation.
        vh: (k', n) with orthonormal rows.
        rel_error: ‖ΔW − U S Vh‖_F / ‖ΔW‖_F of this truncation (0 when ΔW = 0).
        oversampled: S / e², the share of the error energy held by the sketch's extra
            directions (1 when e = 0).
        deficit: The estimated energy Σ_{i≤k} σ_i² − Σ_{i≤k} σ̃_i² the truncation misses of the
            optimal one (inf: no estimate).
        certified: Whether the result is within `ACCURACY` of the optimal error (see above).
        width: The number of sketch columns l.
    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    rel_error: float
    oversampled: float
    deficit: float
    certified: bool
    width: int


def worth(shape: tuple[int, int], rank: int) -> bool:
    """Whether a sketch beats the dense SVD of an m×n matrix for this rank."""
    width = rank + OVERSAMPLE
    return min(shape) > max(EXACT_BELOW, 4 * width)


def test_matrix(
    n: int, width: int, seed: int, *, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The n×width test matrix Ω: entries uniform in (−1, 1), from SplitMix64 with ``seed``.

    u = ⌊r/2^7⌋/2^24 from `mwakit.methods.splitmix.uniform`, then 2u − 1 + 2^-24: symmetric,
    never 0, exact in float32, and the same on every device and thread count.
    """
    from mwakit.methods.splitmix import uniform

    u = uniform(torch.Size((n, width)), seed, device)
    return u.mul_(2.0).sub_(1.0 - 2.0**-24).to(dtype)


def _matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y in float64, the reduction dimension in fixed chunks summed in a fixed order.

    ``x`` may be a transposed view; ``y`` is cast to ``x``'s dtype (BLAS in that dtype).
    """
    y = y.to(x.dtype)
    acc = torch.zeros(x.shape[0], y.shape[1], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[1], CHUNK):
        acc.add_(x[:, s : s + CHUNK] @ y[s : s + CHUNK])
    return acc


def _eigh_desc(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, ≥ 0) and eigenvectors of a small symmetric float64 matrix."""
    from mwakit.lowrank import serial

    with serial():
        lam, v = torch.linalg.eigh(g)
    return lam.flip(0).clamp_min_(0.0), v.flip(1)


def _orth(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An orthonormal basis of range(y) (float64), numerically-zero directions dropped, and
    the squared singular values of ``y`` (descending).

    Gram eigen-decomposition twice (like CholeskyQR2, but rank-revealing): only an l×l problem
    is decomposed, and the Gram product is a fixed-order `_matmul`.
    """
    first: torch.Tensor | None = None
    for _ in range(2):
        lam, v = _eigh_desc(_matmul(y.T, y))
        first = lam if first is None else first
        if lam.numel() == 0 or not float(lam[0]) > 0.0:
            return y[:, :0], first
        keep = int((lam > float(lam[0]) * _CUT).sum())
        y = (y @ v[:, :keep]).div_(lam[:keep].sqrt())
    assert first is not None
    return y, first


def sum_squares(m: torch.Tensor) -> float:
    """‖m‖_F² in float64, the same for every thread count (fixed rows, then an exact sum)."""
    flat = m.reshape(-1)
    n = flat.numel()
    body = n - n % CHUNK
    parts = [0.0]
    for s in range(0, body, 1 << 20):  # bounded float64 temporaries
        # copy=True: a float64 ``m`` must not be squared in place through a view.
        blk = flat[s : min(body, s + (1 << 20))].to(torch.float64, copy=True).view(-1, CHUNK)
        parts += blk.square_().sum(dim=1).tolist()
    if body < n:
        parts += flat[body:].to(torch.float64).square().tolist()
    return math.fsum(parts)


def _residual_squares(m: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> float:
    """‖m − U S Vh‖_F² formed explicitly (float64), rows in fixed chunks."""
    us = u * s
    parts = [0.0]
    for r in range(0, m.shape[0], CHUNK):
        d = m[r : r + CHUNK].to(torch.float64) - us[r : r + CHUNK] @ vh
        parts += d.square_().sum(dim=1).tolist()
    return math.fsum(parts)


def sketch(
    m: torch.Tensor,
    rank: int,
    *,
    seed: int,
    oversample: int = OVERSAMPLE,
    power_iters: int = POWER_ITERS,
    total: float | None = None,
) -> Sketch:
    """The rank-``rank`` truncation of a 2-D ``m`` from one randomized sketch (see module text).

    Args:
        m: ΔW, (rows, cols), float32 or float64, finite.
        rank: k ≥ 1.
        seed: Seeds the test matrix (the caller derives it from the module name).
        oversample: p, extra sketch columns.
        power_iters: q, subspace iterations.
        total: ‖m‖_F² if the caller has it (`sum_squares`).

    Returns:
        The truncation, its relative error and whether it is certified within `ACCURACY`.
    """
    rows, cols = m.shape
    width = min(rank + oversample, rows, cols)
    omega = test_matrix(cols, width, seed, dtype=m.dtype, device=m.device)
    q, _ = _orth(_matmul(m, omega))
    captured = []  # Σ_{i≤k} σ̃_i² of each iterate Q_j: the energy it holds, for the estimate
    for _ in range(power_iters):
        z, lam = _orth(_matmul(m.T, q))  # lam: the σ̃² of Q_j (those of Bᵀ = ΔWᵀ Q_j)
        captured.append(float(lam[:rank].sum()))
        q, _ = _orth(_matmul(m, z))
    bt = _matmul(m.T, q)  # Bᵀ = ΔWᵀ Q, (cols, l')
    lam, w = _eigh_desc(_matmul(bt.T, bt))  # B Bᵀ = W Σ̃² Wᵀ
    k = min(rank, lam.numel())
    lam_k = lam[:k]
    sig = lam_k.sqrt()
    inv = torch.where(sig > 0, 1.0 / sig.clamp_min(torch.finfo(sig.dtype).tiny), 0.0)
    u = q @ w[:, :k]
    vh = ((bt @ w[:, :k]) * inv).T

    total = sum_squares(m) if total is None else total
    if total == 0.0:
        return Sketch(u, sig, vh, 0.0, 1.0, 0.0, True, width)
    err2 = max(total - float(lam_k.sum()), 0.0)
    if err2 < 1e-2 * total:
        # Below 10 % relative error the difference of two large sums loses the digits that
        # the 1 % test needs: measure the residual itself (one more pass).
        err2 = _residual_squares(m, u, sig, vh)
    captured.append(float(lam_k.sum()))
    deficit = _deficit(captured)
    over = float(lam[k:].sum())
    if err2 == 0.0:
        share, ok = 1.0, True
    else:
        share = over / err2
        # e*² ≥ S (proved), e*² ≈ e² − deficit (estimated): accept if either puts e within 1 %.
        ok = share * ACCURACY**2 >= 1.0 or err2 <= ACCURACY**2 * (err2 - deficit)
    return Sketch(u, sig, vh, min(math.sqrt(err2 / total), 1.0), share, deficit, ok, width)


def _deficit(captured: list[float]) -> float:
    """Estimated energy the last iterate misses of the optimal k directions, Σσ_i² − Σσ̃_i².

    Subspace iteration gains energy geometrically: with the last two gains g₁, g₂ and their
    ratio ρ = g₂/g₁, what is still to come is g₂·ρ/(1 − ρ), bounded below by g₂ itself (the
    gains need not be exactly geometric) and by the rounding noise of the sums (`_NOISE`).
    Infinite (no estimate) with fewer than three iterates or when the gains shrink slower than
    `_SLOW` per iteration.
    """
    if len(captured) < 3:
        return math.inf
    noise = _NOISE * abs(captured[-1])
    g1 = max(captured[-2] - captured[-3], 0.0)
    g2 = max(captured[-1] - captured[-2], 0.0)
    if g2 <= noise:
        return noise
    rho = g2 / g1 if g1 > 0.0 else math.inf
    if rho >= _SLOW:
        return math.inf
    return max(g2 * rho / (1.0 - rho), g2)
