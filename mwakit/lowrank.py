"""LoRA factor algebra: factor averaging, exact rank concatenation, QR + small-SVD truncation.

Shapes follow PEFT: A is (r, in) — conv (r, in, kh, kw) — and B is (out, r) — conv
(out, r, 1, 1); the embedding LoRA (lora_embedding_A (r, vocab), lora_embedding_B (dim, r))
has the same layout. Every function treats A as the 2-D (r, prod(rest)) and B as (out, r) and
restores the trailing dims on output.

Nothing here forms the out×in matrix except `dense_delta` and `dense_refactor`, which exist for
task-vector methods (their sparsified ΔW is no longer low rank) and for tests. The math is
docs/methods.md §2; the randomized re-factorisation of a dense ΔW is `mwakit.rsvd`.

Thread count: every result here is the same bytes whatever ``torch.get_num_threads()`` is (on
one machine and library build). The QR and SVD of LAPACK split their work by thread count, so
they run single-threaded (`serial`); they only ever see small matrices, except the exact SVD of
a dense ΔW (small modules and the fallback of `mwakit.rsvd`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from mwakit.adapters import full_rank

__all__ = [
    "Refactored",
    "concat_factors",
    "dense_delta",
    "dense_refactor",
    "factor_sum",
    "factors_average",
    "refactor",
    "serial",
]


@contextmanager
def serial() -> Iterator[None]:
    """Run the enclosed torch ops on one intra-op thread, then restore the thread count.

    MKL's LAPACK (QR, SVD, eigh) and reductions split their work by the thread count, and each
    split rounds differently: with 1 and 2 threads the same QR gives different bits. Inside this
    block the result depends on the inputs alone (and the CPU's kernels, see README
    "Reproducibility").
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def factor_sum(
    ts: Sequence[torch.Tensor], ws: Sequence[float], dtype: torch.dtype, what: str
) -> torch.Tensor:
    """Σ_i w_i t_i: in float32 (float64 for float64), term by term, rounded to ``dtype`` once.

    The sum starts from the first term with a non-zero weight and adds each next one. A term
    is the input in the accumulator's dtype times w_i rounded to it, rounded; each addition
    rounds: two IEEE roundings per term, never a fused multiply-add (torch's
    ``add_(t, alpha=w)`` fuses in its vector kernels). So the sum does not depend on a
    kernel's choice to fuse, and `mwakit.executors.factors`, which computes it with NumPy (no
    torch import), writes the same bytes.
    """
    if not ts:
        raise ValueError(f"no {what} tensors to average")
    if len(ts) != len(ws):
        raise ValueError(f"{len(ts)} {what} tensors but {len(ws)} weights")
    shape = ts[0].shape
    for t in ts:
        if t.shape != shape:
            raise ValueError(f"{what} shapes differ: {list(t.shape)} vs {list(shape)}")
    # The sum runs in float32 (float64 for float64) whatever ``dtype`` is, rounded to it once:
    # a bf16 accumulator would round after every checkpoint.
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    acc: torch.Tensor | None = None
    term: torch.Tensor | None = None
    for t, w in zip(ts, ws, strict=True):
        if w == 0.0:
            continue  # no pass over memory at all
        if acc is None:
            # Widened first: mul(bf16, w) would compute (and round) in bf16.
            acc = t.to(acc_dtype).mul_(w) if t.dtype != acc_dtype else torch.mul(t, w)
            continue
        if term is None:
            term = torch.empty_like(acc)
        if t.dtype == acc_dtype:
            torch.mul(t, w, out=term)
        else:
            term.copy_(t).mul_(w)  # mul(bf16, w, out=float32) would round in bf16 too
        acc.add_(term)
    if acc is None:
        acc = torch.zeros(shape, dtype=acc_dtype, device=ts[0].device)
    return acc if acc.dtype == dtype else acc.to(dtype)


def factors_average(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    weights: Sequence[float],
    scalings: Sequence[float],
    out_scaling: float,
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average the factors element-wise (PEFT's ``linear`` family, cross terms included).

    Ā = Σ_i w_i A_i and B̄ = Σ_i w_i (s_i / s_out) B_i.

    Folding s_i / s_out into B makes s_out·B̄Ā reduce to s_i B_i A_i when one checkpoint has
    all the weight, so checkpoints trained with different α merge consistently. For K > 1
    B̄Ā ≠ Σ w_i B_i A_i (cross terms B_i A_j, docs/methods.md §2).

    Args:
        As: The A factors, (r, in) or (r, in, kh, kw), all of one shape.
        Bs: The B factors, (out, r) or (out, r, 1, 1), all of one shape.
        weights: w_i, one per checkpoint.
        scalings: s_i = α_i / r_i (or α_i / √r_i with rsLoRA), one per checkpoint.
        out_scaling: s_out, the scaling the merged adapter's config will imply.
        dtype: The accumulator dtype (inputs of any floating dtype are promoted into it).

    Returns:
        (Ā, B̄) in ``dtype``, with the input shapes.

    Raises:
        ValueError: No inputs, lengths differ, shapes (ranks) differ, or A's rank does not
            match B's, or ``out_scaling`` is 0.
    """
    if len(As) != len(Bs) or len(scalings) != len(weights):
        raise ValueError(
            f"{len(As)} A, {len(Bs)} B, {len(weights)} weights, {len(scalings)} scalings"
        )
    if out_scaling == 0.0:
        raise ValueError("out_scaling must be non-zero")
    a = factor_sum(As, weights, dtype, "A")
    b_weights = [w * s / out_scaling for w, s in zip(weights, scalings, strict=True)]
    b = factor_sum(Bs, b_weights, dtype, "B")
    if a.shape[0] != b.shape[1]:
        raise ValueError(f"A has rank {a.shape[0]} but B has {b.shape[1]} columns")
    return a, b


def concat_factors(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    coeffs: Sequence[float],
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge by stacking ranks (PEFT's ``cat``, with the coefficient on B).

    A* = [A_1; …; A_K] (rows stacked, Σr × in) and B* = [c_1 B_1, …, c_K B_K] (out × Σr), so
    B*A* = Σ_i c_i B_i A_i exactly, with c_i = w_i s_i and output scaling 1 (α = r = Σr).

    Args:
        As: The A factors, (r_i, in) or (r_i, in, kh, kw); ranks may differ.
        Bs: The B factors, (out, r_i) or (out, r_i, 1, 1).
        coeffs: c_i, one per checkpoint.
        dtype: The output dtype.

    Returns:
        (A*, B*): (Σr, in[, kh, kw]) and (out, Σr[, 1, 1]) in ``dtype``.

    Raises:
        ValueError: No inputs, lengths differ, or the non-rank dims differ.
    """
    if not As or len(As) != len(Bs) or len(As) != len(coeffs):
        raise ValueError(f"{len(As)} A, {len(Bs)} B and {len(coeffs)} coefficients")
    a_rest, b_out, b_rest = As[0].shape[1:], Bs[0].shape[0], Bs[0].shape[2:]
    for a, b in zip(As, Bs, strict=True):
        if a.shape[1:] != a_rest or b.shape[0] != b_out or b.shape[2:] != b_rest:
            raise ValueError(f"factor shapes differ: A {list(a.shape)}, B {list(b.shape)}")
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"A has rank {a.shape[0]} but B has {b.shape[1]} columns")
    total = sum(a.shape[0] for a in As)
    dev = As[0].device
    # Write into preallocated outputs: copy_ casts in place, so a bf16 input never exists as a
    # separate float32 temporary next to the output (torch.cat of casts would hold both).
    a_out = torch.empty((total, *a_rest), dtype=dtype, device=dev)
    b_out_t = torch.empty((b_out, total, *b_rest), dtype=dtype, device=dev)
    off = 0
    for a, b, c in zip(As, Bs, coeffs, strict=True):
        r = a.shape[0]
        a_out[off : off + r].copy_(a)
        b_out_t[:, off : off + r].copy_(b).mul_(c)
        off += r
    return a_out, b_out_t


@dataclass(frozen=True)
class Refactored:
    """A rank-``rank`` factorisation B·A of a LoRA update and the error of the truncation.

    Attributes:
        A: (rank, in[, kh, kw]); rows beyond the available rank are zero.
        B: (out, rank[, 1, 1]); columns beyond the available rank are zero.
        rel_error: ‖M − BA‖_F / ‖M‖_F, in [0, 1]; 0.0 when M = 0.
        rank: The requested rank (the shape, not the numerical rank).
        solver: How it was computed: ``"qr"`` (QR + small SVD of factors), ``"exact"`` (dense
            SVD), ``"randomized"`` (sketch certified within 1 % of the optimal error, see
            `mwakit.rsvd`), ``"fallback"`` (a dense SVD after the sketch was not certified) or
            ``"none"`` (no SVD: full-rank factors).
    """

    A: torch.Tensor
    B: torch.Tensor
    rel_error: float
    rank: int
    solver: str = "exact"


def _check_rank(rank: int) -> None:
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")


def _split(
    u: torch.Tensor,
    s: torch.Tensor,
    vh: torch.Tensor,
    rank: int,
    a_rest: tuple[int, ...],
    b_rest: tuple[int, ...],
    *,
    rel: float | None = None,
) -> Refactored:
    """Turn an SVD M = U diag(S) Vᵀ into rank-``rank`` factors with √S split across both.

    ``rel`` is the relative error when S is not the whole spectrum (a sketch's truncation).
    """
    k = min(rank, s.numel())
    # Tail from the discarded values directly (not total − kept, which cancels to noise when
    # the tail is tiny); divide by s_0 first so squaring cannot overflow in float32.
    top = float(s[0]) if s.numel() else 0.0
    if rel is None and top > 0.0:
        sn = s / top
        rel = math.sqrt(float(sn[k:].square().sum()) / float(sn.square().sum()))
    elif rel is None:
        rel = 0.0
    root = s[:k].sqrt()
    b = u[:, :k] * root  # B' = U_r √S_r  (balanced split keeps both factors well scaled)
    a = root[:, None] * vh[:k]  # A' = √S_r V_rᵀ
    if k < rank:
        # Pad with zero rows/columns: the product is unchanged and the shapes match the
        # r the merged adapter_config promises for every module.
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], dim=0)
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
    return Refactored(
        A=a.reshape(rank, *a_rest),
        B=b.reshape(b.shape[0], rank, *b_rest),
        rel_error=min(rel, 1.0),
        rank=rank,
    )


def _non_finite(
    rank: int,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    dtype: torch.dtype,
    dev: torch.device,
) -> Refactored:
    # The SVD raises an opaque LinAlgError on NaN/Inf; NaN factors instead let the caller's
    # finiteness check name the module and the checkpoint (TensorError).
    nan = float("nan")
    return Refactored(
        A=torch.full(a_shape, nan, dtype=dtype, device=dev),
        B=torch.full(b_shape, nan, dtype=dtype, device=dev),
        rel_error=nan,
        rank=rank,
    )


def refactor(
    A: torch.Tensor, B: torch.Tensor, rank: int, *, compute_dtype: torch.dtype = torch.float32
) -> Refactored:
    """Best rank-``rank`` approximation (Frobenius) of M = B·A without forming M.

    With reduced QRs B = Q_b R_b and Aᵀ = Q_a R_a, M = Q_b (R_b R_aᵀ) Q_aᵀ, so the SVD of the
    small core R_b R_aᵀ = U S Vᵀ gives M's singular values and

        B' = Q_b U_r √S_r,   A' = √S_r V_rᵀ Q_aᵀ,
        rel_error = sqrt(Σ_{k>r} s_k²) / sqrt(Σ_k s_k²).

    Cost O((out + in)·R²) for inner rank R, instead of O(out·in·min(out, in)) for a dense SVD.
    If ``rank`` exceeds the available rank min(R, out, in), A' and B' are zero-padded to it.

    Args:
        A: (R, in) or (R, in, kh, kw).
        B: (out, R) or (out, R, 1, 1).
        rank: The output rank r (≥ 1).
        compute_dtype: float32 or float64; the QR/SVD run in it and the outputs have it.

    Returns:
        The factors A' (r, in[, kh, kw]) and B' (out, r[, 1, 1]), the relative error and r.
        A non-finite input gives NaN factors and a NaN error.

    Raises:
        ValueError: ``rank`` < 1, or A's rank does not match B's.
    """
    return refactor_concat([A], [B], [1.0], rank, compute_dtype=compute_dtype)


class QrMemo:
    """The QR factors of each module's stacked LoRA factors, kept across merges of the same
    inputs (a tune merges the same checkpoints with other weights, candidate after candidate).

    An entry serves a module only while its inputs are the very same tensor objects, unchanged
    (`mwakit.io.cache.InputCache` hands out the same tensors every time): it holds them, so
    they cannot be freed and their identity reused. One entry per module, replaced on a miss.

    Args:
        charge: Asked for each entry's bytes before it is kept (negative: an entry given
            back); False keeps nothing (`mwakit.io.cache.InputCache.charge`: its budget).
    """

    def __init__(self, charge: Callable[[int], bool] | None = None) -> None:
        self._entries: dict[
            str, tuple[tuple[torch.Tensor, ...], tuple[int, ...], tuple[torch.Tensor, ...], int]
        ] = {}
        self._charge = charge
        self.hits = 0

    def get(
        self,
        key: str,
        inputs: Sequence[torch.Tensor],
        make: Callable[[], tuple[torch.Tensor, ...]],
    ) -> tuple[torch.Tensor, ...]:
        """``make()`` for these inputs, or what it gave the last time for the same tensors."""
        versions = tuple(t._version for t in inputs)
        held = self._entries.get(key)
        if (
            held is not None
            and len(held[0]) == len(inputs)
            and all(a is b for a, b in zip(held[0], inputs, strict=True))
            and held[1] == versions
        ):
            self.hits += 1
            return held[2]
        if held is not None:
            del self._entries[key]
            if self._charge is not None:
                self._charge(-held[3])
        value = make()
        size = sum(t.numel() * t.element_size() for t in value)
        if self._charge is None or self._charge(size):
            self._entries[key] = (tuple(inputs), versions, value, size)
        return value


def refactor_concat(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    coeffs: Sequence[float],
    rank: int,
    *,
    compute_dtype: torch.dtype = torch.float32,
    memo: QrMemo | None = None,
    key: str = "",
) -> Refactored:
    """Best rank-``rank`` approximation of Σ_i c_i B_i A_i from the stacked factors.

    The truncated SVD of `concat_factors`' B*·A* by QR + small SVD (see `refactor`), with the
    QR taken of the unweighted B° = [B_1, …, B_K]: B* = B° D with D = diag(c_i) on each block
    of columns, so B* = Q_b (R_b D) is a QR of B* too. Q_b, R_b and the QR of A*ᵀ do not depend
    on the weights, so a ``memo`` keeps them across merges of the same inputs; only the small
    core (R_b D) R_aᵀ and its SVD are new.
    (Unweighted columns are also the better-conditioned QR when weights differ by orders.)

    Args:
        As: The A factors, (r_i, in[, kh, kw]).
        Bs: The B factors, (out, r_i[, 1, 1]).
        coeffs: c_i = w_i s_i.
        rank: The output rank (≥ 1).
        compute_dtype: float32 or float64.
        memo: Keeps the QR factors for the next merge of the same tensors.
        key: The module's name in ``memo``.
    """
    _check_rank(rank)

    def qrs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b = concat_factors(As, Bs, [1.0] * len(As), dtype=compute_dtype)
        with serial():  # Householder QR rounds differently per thread count
            qb, rb = torch.linalg.qr(b.reshape(b.shape[0], -1))
            qa, ra = torch.linalg.qr(a.reshape(a.shape[0], -1).T)
        return qb, rb, qa, ra

    qb, rb, qa, ra = qrs() if memo is None else memo.get(key, [*As, *Bs], qrs)
    a_rest, b_rest = tuple(As[0].shape[1:]), tuple(Bs[0].shape[2:])
    d = torch.cat(
        [
            torch.full((a.shape[0],), float(c), dtype=compute_dtype, device=rb.device)
            for a, c in zip(As, coeffs, strict=True)
        ]
    )
    core = (rb * d) @ ra.T  # (R_b D) R_aᵀ
    if not bool(torch.isfinite(core).all()):
        return _non_finite(
            rank, (rank, *a_rest), (Bs[0].shape[0], rank, *b_rest), compute_dtype, rb.device
        )
    with serial():
        u, s, vh = torch.linalg.svd(core, full_matrices=False)
    k = min(rank, s.numel())  # only the kept directions are brought back to full size
    ref = _split(qb @ u[:, :k], s, vh[:k] @ qa.T, rank, a_rest, b_rest)
    return Refactored(ref.A, ref.B, ref.rel_error, rank, "qr")


def dense_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Form ΔW = s·B·A densely — for task-vector methods and tests only.

    For conv factors ΔW = s·(B.flatten(1) @ A.flatten(1)).reshape(out, in, kh, kw).

    Args:
        A: (r, in) or (r, in, kh, kw).
        B: (out, r) or (out, r, 1, 1), of A's dtype.
        scaling: s.

    Returns:
        ΔW: (out, in) or (out, in, kh, kw).
    """
    m = B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)
    if scaling != 1.0:
        m.mul_(scaling)  # in place: ΔW is the big tensor here, do not hold it twice
    return m.reshape(B.shape[0], *A.shape[1:])


def full_factors(delta: torch.Tensor) -> Refactored:
    """ΔW exactly as LoRA factors of full rank, B·A = ΔW, with no SVD and no error.

    The smaller side becomes an identity: B = I_out and A = ΔW when out ≤ in (and for convs),
    else A = I_in and B = ΔW. PEFT loads them as a rank-``full_rank`` module with scaling 1, so
    the adapter reproduces the merged update bit for bit (in its dtype) — the choice for a
    sparse TIES/DARE result whose SVD truncation error would be too large.

    Args:
        delta: ΔW, (out, in) or (out, in, kh, kw).

    Returns:
        A, B, rel_error 0.0 (NaN when ΔW is not finite) and the rank.
    """
    if delta.dim() < 2:
        raise ValueError(f"delta must be at least 2-D, got shape {list(delta.shape)}")
    out = delta.shape[0]
    err = 0.0 if bool(torch.isfinite(delta).all()) else math.nan
    if full_rank(delta.shape, (out,)) == out:  # ΔW has A's trailing dims; B = I_out, A = ΔW
        eye = torch.eye(out, dtype=delta.dtype, device=delta.device)
        b = eye.reshape(out, out, *(1,) * (delta.dim() - 2))
        return Refactored(delta, b, err, out, "none")
    eye = torch.eye(delta.shape[1], dtype=delta.dtype, device=delta.device)
    return Refactored(eye, delta, err, delta.shape[1], "none")


def dense_refactor(
    delta: torch.Tensor,
    rank: int,
    *,
    compute_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    solver: Literal["auto", "exact"] = "auto",
) -> Refactored:
    """Best rank-``rank`` factorisation of a dense update (after TIES/DARE/pruning).

    With an SVD ΔW ≈ U_r S_r V_rᵀ, B' = U_r √S_r and A' = √S_r V_rᵀ; error, padding and output
    shapes as in `refactor`. Large matrices are factorised from a randomized sketch
    (`mwakit.rsvd`) whose error is certified within 1 % of the optimal truncation error; when
    it cannot be certified, and for small matrices, the thin dense SVD is used
    (``full_matrices=False``: the full one would allocate out×out and in×in for nothing).

    Args:
        delta: ΔW, (out, in) or (out, in, kh, kw).
        rank: The output rank r (≥ 1).
        compute_dtype: float32 or float64; the SVD runs in it and the outputs have it.
        seed: Seeds the sketch's test matrix (derive it from the module name: the result is
            then a function of ΔW and the name alone).
        solver: ``"auto"`` (sketch when worth it) or ``"exact"`` (always the dense SVD).

    Returns:
        A' (r, in[, kh, kw]), B' (out, r[, 1, 1]), the relative error, r and the solver used.
        A non-finite input gives NaN factors and a NaN error.

    Raises:
        ValueError: ``rank`` < 1 or ``delta`` has fewer than 2 dims.
    """
    from mwakit import rsvd

    _check_rank(rank)
    if delta.dim() < 2:
        raise ValueError(f"delta must be at least 2-D, got shape {list(delta.shape)}")
    a_rest = tuple(delta.shape[1:])
    b_rest = (1,) * (delta.dim() - 2)  # conv B is (out, r, 1, 1)
    m = delta.reshape(delta.shape[0], -1).to(compute_dtype)
    # ‖ΔW‖² (float64: no overflow) is NaN/Inf exactly when ΔW is not finite, and the sketch
    # needs it: one pass instead of a bool tensor from isfinite (several times slower).
    total = rsvd.sum_squares(m)
    if not math.isfinite(total):
        return _non_finite(
            rank, (rank, *a_rest), (delta.shape[0], rank, *b_rest), compute_dtype, m.device
        )
    used = "exact"
    if solver == "auto" and rsvd.worth((m.shape[0], m.shape[1]), rank):
        attempts = ((rsvd.OVERSAMPLE, rsvd.POWER_ITERS), (3 * rank + 4 * rsvd.OVERSAMPLE, 3))
        for oversample, iters in attempts:
            if rank + oversample > min(m.shape) // 2:
                break  # as wide as half the matrix: the dense SVD is the better buy
            sk = rsvd.sketch(
                m, rank, seed=seed, oversample=oversample, power_iters=iters, total=total
            )
            if sk.certified:
                u, s, vh = (t.to(compute_dtype) for t in (sk.u, sk.s, sk.vh))
                ref = _split(u, s, vh, rank, a_rest, b_rest, rel=sk.rel_error)
                return Refactored(ref.A, ref.B, ref.rel_error, rank, "randomized")
        used = "fallback"
    with serial():  # LAPACK's SVD rounds differently per thread count
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    ref = _split(u, s, vh, rank, a_rest, b_rest)
    return Refactored(ref.A, ref.B, ref.rel_error, rank, used)
