"""Precision: the dtype sums run in, and float64 reductions for the spherical methods.

Whatever the recipe's compute ``dtype``, sums accumulate in float32, or in float64 when the
dtype is float64. A bfloat16 accumulator rounds after every add (up to 16 ulp off after a few
checkpoints, 40 % of elements not correctly rounded); a float32 one keeps the result within
one rounding of the exact sum. The compute dtype then only says what each result is rounded
to. ``add_`` promotes a bfloat16 input view into the float32 accumulator, so no float32 copy of
an input is ever held.

Norms and dot products over whole tensors (SLERP's angle, Model Stock's cosines) run in
float64, block by block: a float32 reduction over millions of elements drifts by 1e-5
relative, and a float64 copy of a large tensor would double its memory.

This module imports torch at the top: method modules import it inside ``merge`` only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BLOCK = 1 << 20
"""Elements per block of a float64 reduction (8 MiB per float64 buffer)."""


def accumulator(dtype: torch.dtype | None) -> torch.dtype:
    """The dtype sums run in: float64 for ``dtype: float64``, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gram64(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(⟨a, a⟩, ⟨b, b⟩, ⟨a, b⟩) of two tensors of one shape, summed in float64 by blocks.

    Each product of two float32 (or narrower) values is exact in float64, so the only error is
    the float64 summation's, ~1e-16 relative per block.
    """
    fa, fb = a.reshape(-1), b.reshape(-1)
    aa = bb = ab = 0.0
    for s in range(0, fa.numel(), BLOCK):
        x = fa[s : s + BLOCK].to(torch.float64)
        y = fb[s : s + BLOCK].to(torch.float64)
        aa += float(torch.dot(x, x))
        bb += float(torch.dot(y, y))
        ab += float(torch.dot(x, y))
    return aa, bb, ab


def row_grams64(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """G[i, j, r] = ⟨rows[i][r], rows[j][r]⟩ in float64, for N tensors of shape (R, D).

    Only i ≤ j is filled (the Gram matrix is symmetric). Computed over blocks of about
    `BLOCK` elements, so memory stays at N float64 blocks whatever the tensor size.
    """
    n = len(rows)
    r_count, d = rows[0].shape
    g = torch.zeros((n, n, r_count), dtype=torch.float64, device=rows[0].device)
    r_step = max(1, BLOCK // max(d, 1))
    c_step = max(1, min(d, BLOCK))
    for r0 in range(0, r_count, r_step):
        r1 = min(r_count, r0 + r_step)
        for c0 in range(0, d, c_step):
            xs = [x[r0:r1, c0 : c0 + c_step].to(torch.float64) for x in rows]
            for i in range(n):
                for j in range(i, n):
                    g[i, j, r0:r1] += (xs[i] * xs[j]).sum(dim=1)
    return g
