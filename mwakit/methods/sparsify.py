"""Pure helpers shared by the task-vector methods: counts, seeds, selection, DELLA's drop.

Every function here is a pure function of its arguments (randomness comes only from an explicit
seed), works on any device, and never mutates its inputs unless its name ends in ``_``.
The k-th largest |δ| is found by a radix select (O(n)), never a full sort; the fused trims,
drops and TIES consensus are in `mwakit.methods.blocks`. The only sort is in
`della_keep_probs`: DELLA's keep probabilities are a function of each element's rank, and a
rank is a full order by definition.

This module imports torch at the top, so method modules import it inside ``merge`` only
(`import mwakit.methods` must stay torch-free).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch

from mwakit.methods import splitmix

# ---------------------------------------------------------------------------------------------
# Counts and seeds


def keep_count(fraction: float, n: int) -> int:
    """How many of ``n`` elements the top ``fraction`` is: ⌈fraction·n⌉, at least 1 when n > 0.

    The product is rounded to 6 decimals first so that 0.3·10 = 3.0000000000000004 counts as 3
    and not 4 (float noise must not keep an extra element).
    """
    if n <= 0:
        return 0
    return min(n, max(1, math.ceil(round(fraction * n, 6))))


def outlier_count(fraction: float, n: int) -> int:
    """How many of ``n`` elements the top ``fraction`` of outliers is: ⌊fraction·n⌋ (may be 0)."""
    return min(n, math.floor(round(fraction * n, 6)))


def derive_seed(seed: int, key: str, index: int) -> int:
    """A 63-bit seed from (recipe seed, tensor name, checkpoint index).

    A stable hash (BLAKE2b), never Python's salted ``hash()``: the same recipe gives the same
    masks in every process, and each tensor's masks do not depend on the order tensors are
    processed in.
    """
    digest = hashlib.blake2b(f"{seed}\x1f{key}\x1f{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------
# Task vectors


def task_vectors(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, dtype: torch.dtype
) -> list[torch.Tensor]:
    """δ_i = θ_i − θ_0 in ``dtype`` (base None: the inputs already are the deltas).

    Always returns fresh tensors the caller may modify in place: inputs may be memory-mapped
    views of the files, and ``t.to(dtype)`` returns ``t`` itself when the dtype already matches.
    The subtraction is done after the cast, exactly as `mwakit.thresholds` computes |δ| for
    whole-model thresholds, so a threshold equal to an element compares exactly.
    """
    if base is None:
        return [t.to(dtype, copy=True) for t in tensors]
    b = base.to(dtype)
    return [t.to(dtype) - b for t in tensors]


def finish(
    delta: torch.Tensor, base: torch.Tensor | None, dtype: torch.dtype, scale: float = 1.0
) -> torch.Tensor:
    """θ_0 + scale·δ in ``dtype`` (base None: scale·δ)."""
    out = delta if scale == 1.0 else delta.mul_(scale)
    return out if base is None else out.add_(base.to(dtype))


# ---------------------------------------------------------------------------------------------
# Magnitude trims


def kth_largest_abs(
    x: torch.Tensor, k: int, *, absolute: torch.Tensor | None = None
) -> torch.Tensor:
    """The k-th largest |x| (1 ≤ k ≤ numel) as a 0-d tensor, exactly, in linear time.

    A radix select: for non-negative float32 the order of values is the order of their bit
    patterns, so a `bincount` of the top 16 bits finds the bucket holding the k-th largest,
    and `kthvalue` runs only on that bucket (≈1.8× faster than `kthvalue` on everything).

    Args:
        x: The tensor.
        k: Rank from the top.
        absolute: |x| if the caller has it already (saves a pass).
    """
    a = (x.abs() if absolute is None else absolute).reshape(-1)
    if a.dtype != torch.float32 or a.device.type != "cpu":
        return torch.kthvalue(a, a.numel() - k + 1).values
    bits = a.contiguous().view(torch.int32)
    hi = bits >> 16
    above = torch.bincount(hi, minlength=1 << 15).flip(0).cumsum(0).flip(0)  # count ≥ bucket
    b = int((above >= k).nonzero().max())
    higher = int(above[b + 1]) if b + 1 < above.numel() else 0
    sel = a[hi == b]
    return torch.kthvalue(sel, sel.numel() - (k - higher) + 1).values


# ---------------------------------------------------------------------------------------------
# Random drops (DELLA)


def seeded_uniform(shape: torch.Size, seed: int, device: torch.device) -> torch.Tensor:
    """U[0, 1) float32 draws from the counter-based `mwakit.methods.splitmix` stream.

    Counter-based, so a merge on a GPU gives the very same masks, bit for bit, as on the CPU.
    """
    return splitmix.uniform(shape, seed, device)


def bernoulli_keep(
    shape: torch.Size, keep_prob: float | torch.Tensor, seed: int, device: torch.device
) -> torch.Tensor:
    """A seeded keep mask: element j is kept with probability ``keep_prob`` (scalar or tensor).

    u_j < p_j with u_j ~ U[0, 1), so p = 1 keeps everything and p = 0 nothing.
    """
    return seeded_uniform(shape, seed, device) < keep_prob


def della_keep_probs(x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA keep probabilities: linear in each element's |x| rank within its row.

    p = density − ε + 2ε · rank/(m − 1), rank 0 = smallest |x| of the row (m elements), so the
    largest magnitudes get density + ε. Rows are the first dimension (a 1-D tensor is one row;
    higher dimensions are flattened after the first). Ties are ranked by position (stable), so
    the result is the same on every device.

    Returns:
        float32 probabilities of x's shape, on x's device.
    """
    rows = x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)
    m = rows.shape[1]
    if epsilon == 0.0 or m < 2:
        # Constant probability: no ranks needed (and m = 1 has no spread to rank over).
        return torch.full(x.shape, density, dtype=torch.float32, device=x.device)
    # A rank is a full order: this is the one sort in the task-vector code (not a trim).
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(m, device=x.device).expand(rows.shape[0], m)
    )
    probs = (density - epsilon) + (2.0 * epsilon / (m - 1)) * ranks.to(torch.float32)
    return probs.clamp_(0.0, 1.0).reshape(x.shape)


def della_rescale(delta: torch.Tensor, keep: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Zero the dropped elements and scale each kept one by 1/p_keep (its own probability)."""
    # where() picks the kept branch only, so a p = 0 element (never kept) cannot leak inf/NaN.
    return torch.where(keep, delta / probs.to(delta.dtype), 0.0)


# ---------------------------------------------------------------------------------------------
# Weighted sums


def sparse_sum(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None,
    dtype: torch.dtype,
    sparsify: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Σ_i w_i s_i(δ_i), holding one task vector at a time; zero weights are skipped.

    Args:
        tensors: θ_i (or the task vectors when ``base`` is None), any float dtype.
        weights: w_i.
        base: θ_0 or None.
        dtype: Compute dtype.
        sparsify: s_i(δ) given the checkpoint index; it must not modify δ in place (δ may be
            the caller's input tensor). None: the identity.
    """
    acc = torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    b = None if base is None else base.to(dtype)
    for i, (t, w) in enumerate(zip(tensors, weights, strict=True)):
        if w == 0.0:
            # Skipped, not multiplied by 0: a zero weight cannot even turn an inf into NaN.
            continue
        d = t.to(dtype) if b is None else t.to(dtype) - b
        acc.add_(d if sparsify is None else sparsify(i, d), alpha=w)
    return acc
