"""An independent, deliberately plain implementation of the task-vector merges (test oracle).

Whole-tensor bool masks and ``torch.where``, written straight from METHODS.md §5–6 and the
papers, sharing no code with `mwakit.methods.blocks` (which fuses the same maths over blocks
with float tricks). DARE's keep mask is computed from the pure-Python SplitMix64 reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mwakit.methods import splitmix


def deltas(tensors: Sequence[torch.Tensor], base: torch.Tensor | None) -> list[torch.Tensor]:
    b = None if base is None else base.double()
    return [t.double() if b is None else t.double() - b for t in tensors]


def kth_largest(x: torch.Tensor, k: int) -> float:
    """The k-th largest |x| by a full sort (the oracle may sort)."""
    return float(torch.sort(x.abs().reshape(-1), descending=True).values[k - 1])


def dare_keep(seed: int, n: int, drop_rate: float) -> torch.Tensor:
    """Element j is kept iff r_j < (1 − p)·2^31, r_j from the Python SplitMix64."""
    k31 = round((1.0 - drop_rate) * 2**31)
    words = splitmix.reference(seed, (n + 1) // 2)
    bits = [v for z in words for v in (z & splitmix.LOW31, (z >> 32) & splitmix.LOW31)][:n]
    return torch.tensor([r < k31 for r in bits])


def ties_consensus(ds: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Sign election by weighted mass (zeros → majority sign) and the weighted disjoint mean."""
    mass = torch.zeros_like(ds[0])
    for d, w in zip(ds, weights, strict=True):
        if w != 0.0:
            mass += w * d
    gamma = torch.sign(mass)
    majority = 1.0 if float(gamma.sum()) >= 0 else -1.0
    gamma[gamma == 0] = majority
    num = torch.zeros_like(mass)
    den = torch.zeros_like(mass)
    for d, w in zip(ds, weights, strict=True):
        if w == 0.0:
            continue
        agree = (torch.sign(d) * (1.0 if w > 0 else -1.0)) == gamma
        num += torch.where(agree, w * d, 0.0)
        den += torch.where(agree, abs(w), 0.0)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def merge(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None,
    *,
    keep_from: Sequence[float | None] | None = None,
    drop_from: Sequence[float | None] | None = None,
    drops: Sequence[tuple[float, int]] | None = None,
    consensus: bool,
    scale: float = 1.0,
) -> torch.Tensor:
    """θ_0 + scale·M(δ̂_i), in float64, with the trims given per checkpoint."""
    ds = deltas(tensors, base)
    out = []
    for i, d in enumerate(ds):
        if keep_from is not None and keep_from[i] is not None:
            d = torch.where(d.abs() >= keep_from[i], d, 0.0)
        if drop_from is not None and drop_from[i] is not None:
            d = torch.where(d.abs() < drop_from[i], d, 0.0)
        if drops is not None and drops[i][0] > 0:
            p, seed = drops[i]
            keep = dare_keep(seed, d.numel(), p).reshape(d.shape)
            d = torch.where(keep, d / (1.0 - p), 0.0)
        out.append(d)
    if consensus:
        m = ties_consensus(out, weights)
    else:
        m = sum(
            (w * d for d, w in zip(out, weights, strict=True) if w != 0.0), torch.zeros_like(ds[0])
        )
    m = scale * m
    return m if base is None else base.double() + m
