"""Task-vector merges fused over cache-sized blocks: trims, DARE drops, sums and TIES consensus.

Why this module exists: written as whole-tensor torch ops, TIES is ~30 passes over memory and
every op allocates a fresh tensor, whose page faults and zeroing cost more than the arithmetic;
bool tensors (comparisons, masks, ``where``) are 5–20× slower than float ops on a CPU. Here a
tensor group is processed ``block`` elements at a time (512 KiB per float32 buffer, so a block's
working set stays in cache), into buffers allocated once per group, with only in-place or
``out=`` float and integer ops:

- magnitude trim |δ| ≥ t: ``hardshrink`` with λ = the float just below t (one op);
- outlier cut |δ| < u and DARE's drop: an all-ones/all-zeros integer mask built from a sign bit,
  ANDed into the float's bits (exact zeros, no bool tensor);
- DARE's randomness: `mwakit.methods.splitmix` (counter-based, so blocks and devices agree);
- TIES: one pass accumulates P = Σ w_i δ̂_i⁺, N = Σ w_i δ̂_i⁻, S = Σ w_i sgn δ̂_i and
  A = Σ |w_i| |sgn δ̂_i|; then γ = sgn(P + N) and the disjoint mean is P / ((A + S)/2) where
  γ > 0 and N / ((A − S)/2) where γ < 0 (the agreeing mass over the agreeing weight).

The per-tensor top-k threshold is found exactly by `kth_largest_abs`: a bracket from a seeded
sample of |δ|, one blocked pass that counts the elements above it and collects the few inside,
and a radix select on those; if the bracket misses (rare), the radix select on the whole |δ|.
On a CPU that pass compares, counts and gathers with NumPy (bool arrays are cheap there, and
``compress`` gathers at memory speed), on a GPU with float ops.

On a CPU the merge pass over a tensor of several blocks is split over
`mwakit.threads.block_workers` threads, each with its own buffers, taking the next block when
free (`_each_block`): every element is computed by the same ops whichever thread takes its
block, so the bytes do not depend on the count.

A LoRA task vector may come as its factors (`Factored`: ΔW = s·B·A): a block is then a run of
whole rows, formed by one small matrix product straight into the block buffer, so the dense
ΔW_i — gigabytes for ten 14336×4096 modules — is never held, and the passes read the factors
(kilobytes per row) instead of streaming it from memory. Both passes (threshold and merge)
form the same row blocks, so they see the same bits.

On a GPU a block is up to 16M elements: there the op count, not the cache, is what matters.
Inputs are cast to float32 (float64 if asked) whatever their storage dtype; a bfloat16 or
float16 compute dtype is computed in float32 (compute in float32, write the requested dtype).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from mwakit.methods import sparsify
from mwakit.methods.splitmix import Stream

BLOCK = 1 << 17
"""Elements per block on a CPU (512 KiB of float32)."""

GPU_BLOCK = 1 << 24
"""Elements per block on a GPU: few kernel launches, ~11 × 64 MiB of buffers at most."""

SAMPLE = 1 << 16
"""Smallest sample for the threshold bracket (it grows to 1/32 of a tensor, at most 2^18, so
that the bracket holds ~1% of the elements); tensors under 4× this are selected whole."""

THREAD_BLOCK = 1 << 16
"""Smallest block worth splitting over threads: each op hands the GIL over, which costs more
than a smaller block's arithmetic (measured: two threads 0.74× as fast as one at 2^14 elements,
1.46× at 2^17)."""

_ROW = 32
"""Rows of this many elements are skipped whole when their maximum fails a test."""

_MARGIN = 4.5
"""Bracket half-width in standard deviations of the sample's rank: a miss (~1e-5) only costs
a radix select on the whole tensor."""

_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64}


@dataclass(frozen=True)
class Trim:
    """How one task vector δ_i is sparsified before it is merged (every field optional).

    Attributes:
        keep_from: Keep |δ| ≥ keep_from (magnitude trim); None keeps every magnitude.
        drop_from: Drop |δ| ≥ drop_from (breadcrumbs' outliers); None drops none.
        drop_rate: DARE: drop each element with probability p and scale the kept by 1/(1 − p).
        seed: The SplitMix64 seed of the drop mask.
    """

    keep_from: float | None = None
    drop_from: float | None = None
    drop_rate: float = 0.0
    seed: int = 0


_ROW_ALIGN = 4
"""Row blocks of a `Factored` hold a multiple of this many rows where they can: BLAS computes
such row slices of B·A with the same kernel as the whole product (same bits, measured with MKL)."""


class Factored:
    """One LoRA task vector ΔW = s·B·A, formed a block of whole rows at a time, never whole.

    Args:
        a: A, (r, in) or (r, in, kh, kw), already in the compute dtype.
        b: B, (out, r) or (out, r, 1, 1), of ``a``'s dtype and device.
        scaling: s.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        self.a = a.reshape(a.shape[0], -1)
        self.b = b.reshape(b.shape[0], -1)
        self.scaling = scaling
        self.shape = torch.Size((b.shape[0], *a.shape[1:]))
        self.cols = self.a.shape[1]
        if scaling != 1.0 and math.frexp(scaling)[0] == 0.5:
            # A power of two (lora_alpha = 2r, …) times B is exact, and so is every product
            # and sum of s·B·A: fold it into B once instead of scaling every block.
            folded = self.b * scaling
            if torch.equal(folded / scaling, self.b) and bool(torch.isfinite(folded).all()):
                self.b, self.scaling = folded, 1.0
        # Finite factors whose products cannot overflow give a finite ΔW: then the merge need
        # not check every block (the executor still checks the result).
        bound = (
            float(self.b.abs().amax()) * float(self.a.abs().amax()) * self.a.shape[0]
            if self.a.numel() and self.b.numel()
            else 0.0
        )
        self.finite = (
            math.isfinite(bound) and bound * abs(self.scaling) < 0.5 * torch.finfo(self.dtype).max
        )

    @property
    def dtype(self) -> torch.dtype:
        """The dtype ΔW is formed in."""
        return self.a.dtype

    @property
    def device(self) -> torch.device:
        """Where ΔW is formed."""
        return self.a.device

    def numel(self) -> int:
        """Elements of ΔW."""
        return self.b.shape[0] * self.cols

    def form(self, out: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """ΔW's flat elements [start, end), whole rows, computed into ``out`` (returned)."""
        r0, r1 = start // self.cols, end // self.cols
        view = out[: end - start].view(r1 - r0, self.cols)
        torch.mm(self.b[r0:r1], self.a, out=view)
        return view.mul_(self.scaling).view(-1) if self.scaling != 1.0 else view.view(-1)

    def dense(self) -> torch.Tensor:
        """ΔW whole, flat (the rare fallback and small modules), in the row blocks `form` uses."""
        n = self.numel()
        out = torch.empty(n, dtype=self.dtype, device=self.device)
        size = _block_size(n, self.device, None, self.cols)
        for s in range(0, n, size):
            self.form(out[s:], s, min(n, s + size))
        return out


Delta = torch.Tensor | Factored
"""A task-vector input: a tensor (θ_i, or δ_i when there is no base) or LoRA factors."""


def compute_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """float64 if asked, else float32 (half-precision compute dtypes are computed in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_size(n: int, device: torch.device, block: int | None, cols: int | None = None) -> int:
    """Elements per block: always even (random bits come in pairs), at most the tensor.

    With ``cols`` (`Factored` inputs) a block is whole rows of that many elements: a multiple
    of `_ROW_ALIGN` rows when a block holds that many, else at least one (two if odd).
    """
    if block is None:
        block = BLOCK if device.type == "cpu" else GPU_BLOCK
    if cols is not None:
        rows = max(1, block // cols)
        rows = rows - rows % _ROW_ALIGN if rows >= _ROW_ALIGN else rows
        rows += (rows * cols) % 2
        return rows * cols
    return max(2, min(block, n) + min(block, n) % 2)


def _cols(tensors: Sequence[Delta]) -> int | None:
    """The row length of `Factored` inputs (None for plain tensors; they cannot be mixed)."""
    factored = [t for t in tensors if isinstance(t, Factored)]
    if not factored:
        return None
    if len(factored) != len(tensors) or len({t.cols for t in factored}) != 1:
        raise ValueError("factored task vectors must all be factored, with one shape")
    return factored[0].cols


Span = tuple[int, int, int]
"""One block: its index, first and end element."""


def _each_block(
    n: int,
    size: int,
    device: torch.device,
    worker: Callable[[], Callable[[int, int, int], None]],
    *,
    threads: bool = True,
) -> None:
    """Call ``fn(bi, start, end)`` once for every block of a tensor of ``n`` elements.

    ``worker()`` makes one worker's ``fn`` (with its own buffers). On a CPU, tensors of several
    blocks are split over `mwakit.threads.block_workers` threads that each take the next block
    when free; ``fn`` must write only its block's part of any shared result (torch ops release
    the GIL, so the threads compute at once). An error in one stops the others at their next
    block and is raised here. ``threads=False`` runs every block here, in order.
    """
    spans = [(bi, s, min(n, s + size)) for bi, s in enumerate(range(0, n, size))]
    few = not threads or device.type != "cpu" or len(spans) < 4 or size < THREAD_BLOCK
    count = 1 if few else _workers(len(spans) // 2)
    _in_threads(spans, worker, count)


def _workers(most: int) -> int:
    """Block threads to use, at most ``most``: none on top of intra-op threads (MWAKIT_THREADS >
    1, or torch's default outside a merge), where every op is parallel already."""
    from mwakit.threads import block_workers

    return 1 if torch.get_num_threads() > 1 else max(1, min(block_workers(), most))


def _in_threads(
    items: Sequence[tuple[int, ...]], worker: Callable[[], Callable[..., None]], count: int
) -> None:
    """``worker()``'s ``fn(*item)`` for every item, over ``count`` threads (here if 1)."""
    if count <= 1:
        fn = worker()
        for item in items:
            fn(*item)
        return
    todo = iter(items)
    lock = threading.Lock()
    stop = threading.Event()
    from mwakit.threads import usable_cpus

    cores = usable_cpus() if hasattr(os, "sched_setaffinity") else []

    def run(at: int) -> None:
        try:
            if len(cores) >= count:
                # One core each (this thread only): woken after waiting for the GIL, an
                # unpinned worker is often put on its peer's core (measured: 1.5× → 1.9×
                # from two workers). The items are handed out as workers free up, so a
                # core slowed by other load simply takes fewer.
                os.sched_setaffinity(0, {cores[at]})
            fn = worker()
            while not stop.is_set():
                with lock:
                    item = next(todo, None)
                if item is None:
                    return
                fn(*item)
        except BaseException:
            stop.set()
            raise

    with ThreadPoolExecutor(count, thread_name_prefix="mwakit-block") as pool:
        futures = [pool.submit(run, i) for i in range(count)]
        try:
            for f in futures:
                f.result()
        finally:
            stop.set()


def _flat(t: Delta) -> Delta:
    return t if isinstance(t, Factored) else t.reshape(-1)


def _load_delta(
    out: torch.Tensor, t: Delta, b: torch.Tensor | None, s: int, e: int
) -> torch.Tensor:
    if isinstance(t, Factored):
        return t.form(out, s, e)  # task vectors: never a base
    d = out[: e - s].copy_(t[s:e])
    return d if b is None else d.sub_(b)


def kth_largest_abs(
    tensor: Delta,
    base: torch.Tensor | None,
    ks: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    block: int | None = None,
) -> list[float]:
    """The k-th largest |δ|, δ = tensor − base in ``dtype``, exactly, for each k in ``ks``.

    Args:
        tensor: θ_i (or δ_i when ``base`` is None), any float dtype, or a `Factored` δ_i.
        base: θ_0 or None.
        ks: Ranks from the top, each in [1, numel].
        dtype: float32 or float64: the dtype δ is computed in (as the merge computes it).
        block: Elements per block (default: `BLOCK` on a CPU, `GPU_BLOCK` on a GPU).
    """
    n = tensor.numel()
    flat_t = _flat(tensor)
    flat_b = None if base is None else base.reshape(-1)
    if n < 4 * SAMPLE:
        a = _whole_abs(flat_t, flat_b, dtype)
        return [_kth(a, k) for k in ks]

    # A bracket [lo, hi] around each k-th largest from a seeded sample of |δ|.
    if isinstance(flat_t, Factored):
        sample, se = _grid_sample(flat_t, dtype)
    else:
        sample, se = _run_sample(flat_t, flat_b, n, dtype)
    m = sample.numel()
    brackets = []
    for k in ks:
        f = k / n  # fraction above the k-th largest
        # Samples come in correlated groups (grids share a row of B and a column of A, runs are
        # neighbours): the larger of their own spread and that of independent draws.
        sd = math.sqrt(m * f * (1.0 - f))
        sd = max(sd, m * float(se(sample, _kth(sample, max(1, min(m, round(f * m)))))))
        width = _MARGIN * sd + 2.0
        top_hi = math.floor(f * m - width)  # sample rank (from the top) of hi
        top_lo = math.ceil(f * m + width)
        hi = torch.finfo(dtype).max if top_hi < 1 else _kth(sample, min(top_hi, m))
        lo = 0.0 if top_lo > m else _kth(sample, max(top_lo, 1))
        brackets.append((lo, hi))

    size = _block_size(n, tensor.device, block, _cols([tensor]))
    if tensor.device.type == "cpu":
        totals, inside, open_ok = _scan_cpu(flat_t, flat_b, n, size, brackets, dtype)
    else:
        totals, inside, open_ok = _scan_torch(flat_t, flat_b, n, size, brackets, dtype)
    out = []
    for j, k in enumerate(ks):
        if not math.isfinite(totals[j]):
            out.append(math.nan)  # NaN in δ: `merge` turns the result NaN for the executor
            continue
        cand = inside[j]
        r = k - int(totals[j])
        if 1 <= r <= cand.numel():
            out.append(_kth(cand, r))
        elif r > cand.numel() and brackets[j][0] <= 0.0 and open_ok[j]:
            out.append(0.0)  # the k-th largest is one of the zeros (all of [0, hi] is inside)
        else:
            # The sample missed (or the values are degenerate): select on the whole |δ|.
            out.append(_kth(_whole_abs(flat_t, flat_b, dtype), k))
    return out


Scan = tuple[list[float], list[torch.Tensor], list[bool]]
"""Per bracket: the count above it (NaN if δ has a NaN), the values inside it, and whether an
open-below count can be trusted."""


def _scan_cpu(
    flat_t: Delta,
    flat_b: torch.Tensor | None,
    n: int,
    size: int,
    brackets: Sequence[tuple[float, float]],
    dtype: torch.dtype,
) -> Scan:
    """One blocked pass over |δ| with NumPy's comparisons, counts and compress.

    On a CPU these beat torch's float tricks several times over: a bool compare is one cheap
    pass there, and ``compress`` gathers the ~0.5 % inside a bracket at memory speed (torch's
    ``nonzero``/boolean indexing cost ~10 ns per element). NaN fails every comparison, so a
    block whose ≤ hi and > hi counts do not add up to its size has one.
    """
    import numpy as np

    # Finite factors whose products cannot overflow have no NaN to look for.
    check = not (isinstance(flat_t, Factored) and flat_t.finite)
    blocks_n = -(-n // size)
    above = [[0] * blocks_n for _ in brackets]
    nan = [False] * blocks_n
    inside: list[list[np.ndarray]] = [[np.empty(0, np.float32)] * blocks_n for _ in brackets]

    def worker() -> Callable[[int, int, int], None]:
        b_buf, a_buf = (torch.empty(size, dtype=dtype) for _ in range(2))
        gt, ge, le = (np.empty(size, dtype=np.bool_) for _ in range(3))

        def scan(bi: int, s: int, e: int) -> None:
            m = e - s
            bb = None if flat_b is None else b_buf[:m].copy_(flat_b[s:e])
            a = _load_delta(a_buf, flat_t, bb, s, e).abs_().numpy()
            g, t = gt[:m], ge[:m]
            for j, (lo, hi) in enumerate(brackets):
                count = int(np.count_nonzero(np.greater(a, hi, out=g)))
                above[j][bi] = count
                if check and count + int(np.count_nonzero(np.less_equal(a, hi, out=le[:m]))) != m:
                    nan[bi] = True
                # Inside: [lo, hi], or (0, hi] when open below (zeros are not collected); > hi
                # is a subset of ≥ lo, so "≥ lo and not > hi" is their exclusive or.
                np.greater_equal(a, lo, out=t) if lo > 0.0 else np.greater(a, 0.0, out=t)
                inside[j][bi] = np.compress(np.not_equal(t, g, out=t), a)

        return scan

    # One thread: between its few torch ops a block's NumPy steps are short and many, and two
    # threads handing the GIL over at each ran no faster than one (measured, 2 cores).
    _each_block(n, size, torch.device("cpu"), worker, threads=False)
    totals = [math.nan if any(nan) else float(sum(c)) for c in above]
    values = [torch.from_numpy(np.concatenate(v)) for v in inside]
    return totals, values, [True] * len(brackets)


def _scan_torch(
    flat_t: Delta,
    flat_b: torch.Tensor | None,
    n: int,
    size: int,
    brackets: Sequence[tuple[float, float]],
    dtype: torch.dtype,
) -> Scan:
    """The same pass with float ops only (GPUs: no bool tensors, no host sync per block)."""
    device = flat_t.device
    blocks_n = -(-n // size)
    # One float32 count per block (exact below 2^24), summed in float64 at the end: no
    # per-block dtype conversion.
    above = torch.zeros(len(brackets), blocks_n, dtype=dtype, device=device)
    open_sums = torch.zeros_like(above)
    inside: list[list[torch.Tensor]] = [[] for _ in brackets]
    cuts = [(None if lo <= 0.0 else _below(lo, dtype), hi) for lo, hi in brackets]
    shrink = torch.ops.aten.hardshrink.out

    b_buf, a_buf, s_buf, z_buf = (torch.empty(size, dtype=dtype, device=device) for _ in range(4))
    for bi, s in enumerate(range(0, n, size)):
        e = min(n, s + size)
        bb = None if flat_b is None else b_buf[: e - s].copy_(flat_b[s:e])
        a = _load_delta(a_buf, flat_t, bb, s, e).abs_()
        sv, zv = s_buf[: e - s], z_buf[: e - s]
        for j, (lo_cut, hi) in enumerate(cuts):
            # hardshrink keeps a > λ: zv = a above hi, sv = a in [lo, hi] (0 elsewhere;
            # NaN stays NaN and makes the count NaN). Float ops: far cheaper than bool.
            shrink(a, hi, out=zv)
            if lo_cut is not None:
                shrink(a, lo_cut, out=sv).sub_(zv)
            else:
                # Open below: everything up to hi is inside, zeros too (not collected, so
                # the sum tells whether an inf hid a row from the collection: inf − inf).
                torch.sum(torch.sub(a, zv, out=sv), 0, out=open_sums[j, bi])
            inside[j].append(_positive_values(sv))
            torch.sum(zv.sign_(), 0, out=above[j, bi])
    totals = above.double().sum(dim=1).tolist()
    open_ok = torch.isfinite(open_sums.double().sum(dim=1)).tolist()
    return totals, [torch.cat(v) for v in inside], open_ok


_RUN = 64
"""Elements in each contiguous run a tensor's sample is made of."""


def _run_sample(
    flat_t: torch.Tensor, flat_b: torch.Tensor | None, n: int, dtype: torch.dtype
) -> tuple[torch.Tensor, Callable[[torch.Tensor, float], float]]:
    """|δ| on seeded random runs of `_RUN` neighbours (about 1/32 of the tensor, 2^16–2^18),
    and the standard error of a fraction.

    Single random elements are a cache miss each (12 ms for 2^18 of them, as much as the whole
    threshold pass over a 5632×2048 tensor); runs are read as rows of a sliding-window view, 6×
    faster. Neighbours may be correlated (a row of a weight matrix), so the standard error of
    "the fraction of |δ| above t" is measured from the spread of that fraction across the runs.
    """
    gen = torch.Generator(device="cpu").manual_seed(0x5EED)
    runs = min(1 << 18, max(SAMPLE, n // 32)) // _RUN
    starts = torch.randint(0, n - _RUN + 1, (runs,), generator=gen).to(flat_t.device)
    sample = flat_t.unfold(0, _RUN, 1)[starts].to(dtype)  # (runs, _RUN): each run contiguous
    if flat_b is not None:
        sample.sub_(flat_b.unfold(0, _RUN, 1)[starts].to(dtype))
    return sample.abs_().reshape(-1), _spread(runs)


def _spread(groups: int) -> Callable[[torch.Tensor, float], float]:
    """The standard error of the fraction above ``at`` of a sample made of ``groups`` equal
    groups, from the spread of that fraction across them."""

    def se(flat: torch.Tensor, at: float) -> float:
        frac = (flat.view(groups, -1) > at).to(torch.float64).mean(dim=1)
        return float(frac.std()) / math.sqrt(groups)

    return se


_GRID = 16
"""Rows and columns of each small grid a `Factored` sample is made of."""


def _grid_sample(
    t: Factored, dtype: torch.dtype
) -> tuple[torch.Tensor, Callable[[torch.Tensor, float], float]]:
    """|ΔW| on seeded random grids of rows × columns, and the standard error of a fraction.

    Gathering single elements of s·B·A costs a product each (and the gathers dominate); a
    grid of 16 random rows by 16 random columns is one tiny matrix product (all the grids: one
    batched product). Grid elements share rows and columns, so they are not independent: the
    standard error of "the fraction of |ΔW| above t" is measured from the spread of that
    fraction across the grids (≈1.5× that of as many independent draws, on random factors).
    """
    gen = torch.Generator(device="cpu").manual_seed(0x5EED)
    out_n, in_n = t.b.shape[0], t.cols
    grids = max(256, min(4096, t.numel() // (32 * _GRID * _GRID)))
    rows = torch.randint(0, out_n, (grids, _GRID), generator=gen).to(t.device)
    cols = torch.randint(0, in_n, (grids, _GRID), generator=gen).to(t.device)
    b = t.b[rows.reshape(-1)].reshape(grids, _GRID, -1)  # (G, g, r)
    a = t.a[:, cols.reshape(-1)].reshape(t.a.shape[0], grids, _GRID).permute(1, 0, 2)
    vals = torch.bmm(b, a).reshape(grids, -1)  # (G, g·g)
    if t.scaling != 1.0:
        vals.mul_(t.scaling)
    sample = vals.to(dtype).abs_()
    return sample.reshape(-1), _spread(grids)


def _positive_values(x: torch.Tensor) -> torch.Tensor:
    """The values of ``x`` (≥ 0 or NaN) that are > 0: few (~1%), found without a full bool scan.

    Rows of `_ROW` whose maximum is 0 (or NaN) are skipped whole, so the slow bool scan runs
    over 1/_ROW of the block and the rows that pass.
    """
    if x.numel() % _ROW:
        return x[x > 0]
    rows = x.view(-1, _ROW)
    hit = torch.nonzero(rows.amax(dim=1) > 0).reshape(-1)
    if hit.numel() == 0:
        return x[:0].clone()
    sel = torch.index_select(rows, 0, hit).reshape(-1)
    return sel[sel > 0]


def magnitude_trims(
    tensors: Sequence[Delta],
    weights: Sequence[float],
    base: torch.Tensor | None,
    density: float,
    thresholds: Sequence[float] | None,
    dtype: torch.dtype,
) -> list[Trim]:
    """The top-``density`` trim of each task vector: keep |δ_i| ≥ its k-th largest |δ_i|.

    Args:
        tensors: θ_i (or δ_i when ``base`` is None).
        weights: w_i; zero-weight checkpoints are not selected on (they are skipped anyway).
        base: θ_0 or None.
        density: Kept fraction, k = ⌈density·n⌉ (`sparsify.keep_count`).
        thresholds: Whole-model thresholds (``trim_scope: model``) to use instead.
        dtype: The compute dtype δ is selected in.
    """
    if thresholds is not None:
        return [Trim(keep_from=t) for t in thresholds]
    n = tensors[0].numel()
    k = sparsify.keep_count(density, n)
    if k >= n:
        return [Trim() for _ in tensors]
    trims = [Trim() for _ in tensors]
    live = [i for i, w in enumerate(weights) if w != 0.0]

    def worker() -> Callable[[int], None]:
        def select(i: int) -> None:
            trims[i] = Trim(keep_from=kth_largest_abs(tensors[i], base, [k], dtype)[0])

        return select

    # Each checkpoint's selection on a thread of its own (the scan itself is too fine-grained
    # to split: see `_scan_cpu`): 1.3–1.5× from two on large tensors, the same thresholds.
    cpu = tensors[0].device.type == "cpu"
    count = _workers(len(live)) if cpu and n >= 4 * max(SAMPLE, THREAD_BLOCK) else 1
    _in_threads([(i,) for i in live], worker, count)
    return trims


def _whole_abs(flat_t: Delta, flat_b: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """|δ| of the whole tensor in ``dtype``, a fresh tensor (small tensors and the fallback)."""
    if isinstance(flat_t, Factored):
        return flat_t.dense().to(dtype).abs_()
    a = flat_t.to(dtype, copy=True)
    if flat_b is not None:
        a.sub_(flat_b.to(dtype))
    return a.abs_()


def _positive(x: torch.Tensor) -> torch.Tensor:
    return x > 0


def _positions(x: torch.Tensor, test: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Flat indices of ``x`` where ``test`` holds, for a test that holds for a row's maximum
    if and only if it holds somewhere in the row (x ≥ 0, x > 0).

    Few elements pass (~1%): rows of `_ROW` whose maximum fails are skipped, so the slow
    bool scan (`nonzero`) runs over 1/_ROW of the block and the rows that pass.
    """
    n = x.numel()
    if n % _ROW:
        return torch.nonzero(test(x)).reshape(-1)
    rows = x.view(-1, _ROW)
    hit = torch.nonzero(test(rows.amax(dim=1))).reshape(-1)
    if hit.numel() == 0:
        return hit
    r, c = torch.nonzero(test(rows[hit]), as_tuple=True)
    return hit[r] * _ROW + c


def _kth(a: torch.Tensor, k: int) -> float:
    """The k-th largest of the non-negative values ``a`` (radix select on float32)."""
    return float(sparsify.kth_largest_abs(a, k, absolute=a))


def _below(x: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` below x: |δ| > _below(t) ⟺ |δ| ≥ t for δ in ``dtype``."""
    v = torch.tensor(x, dtype=dtype)
    return float(torch.nextafter(v, torch.tensor(-math.inf, dtype=dtype)))


class _Workspace:
    """Scratch buffers shared by the sparsifiers of one merge (they run one at a time)."""

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.size, self.dtype, self.device = size, dtype, device
        self.int_dtype = _INT_OF[dtype]
        self._stream: Stream | None = None
        self._scratch: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    def stream(self) -> Stream:
        if self._stream is None:
            self._stream = Stream(self.size, self.device)
        return self._stream

    def scratch(self, m: int) -> torch.Tensor:
        if self._scratch is None:
            self._scratch = torch.empty(self.size, dtype=self.dtype, device=self.device)
        return self._scratch[:m]

    def mask(self, r: torch.Tensor) -> torch.Tensor:
        """The int32 mask ``r`` in the float's integer width (float64 needs int64)."""
        if self.int_dtype == torch.int32:
            return r
        if self._mask is None:
            self._mask = torch.empty(self.size, dtype=self.int_dtype, device=self.device)
        return self._mask[: r.numel()].copy_(r)


class _Sparsifier:
    """Applies one `Trim` to a block of δ in place."""

    def __init__(self, trim: Trim, work: _Workspace) -> None:
        self.trim = trim
        self.work = work
        self.lambd = None if not trim.keep_from else _below(trim.keep_from, work.dtype)
        self.k31 = round((1.0 - trim.drop_rate) * 2.0**31)
        self.drops = trim.drop_rate > 0.0 and self.k31 < 2**31
        # The realised keep probability is K / 2^31 (within 2^-32 of 1 − p).
        self.rescale = 1.0 / (1.0 - trim.drop_rate) if self.drops else 1.0

    def __call__(self, d: torch.Tensor, start: int) -> torch.Tensor:
        t, work = self.trim, self.work
        if self.lambd is not None:
            torch.ops.aten.hardshrink.out(d, self.lambd, out=d)
        bits = d.view(work.int_dtype)
        if t.drop_from is not None:
            # |δ| − u < 0 exactly where |δ| < u (equality gives +0): its sign bit is the mask.
            s = torch.abs(d, out=work.scratch(d.numel())).sub_(t.drop_from)
            bits.bitwise_and_(s.view(work.int_dtype).bitwise_right_shift_(s.element_size() * 8 - 1))
        if self.drops:
            # r_j − K < 0 exactly where r_j < K (kept, probability K / 2^31): sign → mask.
            r = work.stream().bits31(t.seed, start, d.numel())
            bits.bitwise_and_(work.mask(r.sub_(self.k31).bitwise_right_shift_(31)))
        return d


def merge(
    tensors: Sequence[Delta],
    weights: Sequence[float],
    base: torch.Tensor | None,
    trims: Sequence[Trim],
    *,
    consensus: bool,
    scale: float = 1.0,
    dtype: torch.dtype | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """θ_0 + scale·M(δ̂_1 … δ̂_K) with δ̂_i = trims[i](θ_i − θ_0), over blocks.

    M is the weighted sum Σ w_i δ̂_i (``consensus=False``: task arithmetic, DARE-linear,
    magnitude prune, breadcrumbs) or the TIES sign election and disjoint mean
    (``consensus=True``, see `mwakit.methods.ties`). A DARE drop rate p folds its 1/(1 − p)
    rescale into w_i. Zero weights are skipped (their inputs are not read).

    A non-finite δ makes the whole result NaN, even where a trim or drop would hide it, so the
    executor's finiteness check names the input instead of writing a silently repaired merge.

    Args:
        tensors: θ_i (or δ_i when ``base`` is None), any float dtypes, one shape; or all
            `Factored` δ_i (no base).
        weights: w_i (negative: the task vector is subtracted).
        base: θ_0, or None: then the merged δ (times ``scale``) is returned.
        trims: One `Trim` per tensor.
        consensus: TIES consensus instead of a weighted sum.
        scale: λ applied to the merged task vector.
        dtype: Compute dtype (see `compute_dtype`); the result has it.
        block: Elements per block (default: `BLOCK` on a CPU, `GPU_BLOCK` on a GPU).
    """
    dt = compute_dtype(dtype)
    shape, device = tensors[0].shape, tensors[0].device
    n = tensors[0].numel()
    size = _block_size(n, device, block, _cols(tensors))
    flat_b = None if base is None else base.reshape(-1)
    inputs = [
        (_flat(t), w, tr) for t, w, tr in zip(tensors, weights, trims, strict=True) if w != 0.0
    ]
    out = torch.empty(n, dtype=dt, device=device)
    # Per-block sums of δ (finiteness) and of γ (majority sign), reduced after the last block.
    blocks_n = -(-n // size)
    check = torch.zeros(blocks_n, len(inputs), dtype=dt, device=device)
    gamma_sums = torch.zeros(blocks_n, dtype=dt, device=device)
    ambiguous: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def worker() -> Callable[[int, int, int], None]:
        """One worker's buffers (its sparsifiers' scratch and random stream too) and body."""

        def buf() -> torch.Tensor:
            return torch.empty(size, dtype=dt, device=device)

        work = _Workspace(size, dt, device)
        live = [(t, w, _Sparsifier(tr, work)) for t, w, tr in inputs]
        b_buf, d_buf, s_buf = buf(), buf(), buf()
        acc = [buf() for _ in range(4 if consensus else 1)]
        fin = [buf() for _ in range(2)] if consensus else []

        def body(bi: int, s: int, e: int) -> None:
            m = e - s
            bb = None if flat_b is None else b_buf[:m].copy_(flat_b[s:e])
            parts = [a[:m].zero_() for a in acc]
            sv = s_buf[:m]
            for li, (flat_t, w, sparsify_) in enumerate(live):
                d = _load_delta(d_buf, flat_t, bb, s, e)
                if not (isinstance(flat_t, Factored) and flat_t.finite):
                    torch.sum(d, 0, out=check[bi, li])
                d = sparsify_(d, s)
                wd = w * sparsify_.rescale
                if not consensus:
                    parts[0].add_(d, alpha=wd)
                    continue
                pos, neg, sgn, cnt = parts
                # For w < 0 the task vector is negated: its negative part is positive mass.
                lo, hi = (pos, neg) if w > 0 else (neg, pos)
                lo.add_(torch.clamp_min(d, 0.0, out=sv), alpha=wd)
                hi.add_(torch.clamp_max(d, 0.0, out=sv), alpha=wd)
                torch.sign(d, out=sv)
                sgn.add_(sv, alpha=w)
                cnt.add_(sv.abs_(), alpha=abs(w))
            if consensus:
                found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
                fm = [f[:m] for f in fin]
                res = _consensus(parts, fm, s, gamma_sums[bi], found, bb, scale)
                ambiguous.extend(found)  # one call: atomic under the GIL
            else:
                res = parts[0].mul_(scale) if scale != 1.0 else parts[0]
                if bb is not None:
                    res.add_(bb)
            out[s:e].copy_(res)

        return body

    _each_block(n, size, device, worker)

    if ambiguous:
        # Exact zero mass with agreeing elements on both sides: the tensor's majority sign.
        pick = 1 if float(gamma_sums.double().sum()) >= 0 else 2
        for entry in ambiguous:
            out[entry[0]] = entry[pick]
    if not bool(torch.isfinite(check).all()):
        out.fill_(math.nan)
    return out.reshape(shape)


def _consensus(
    parts: list[torch.Tensor],
    fin: list[torch.Tensor],
    start: int,
    gamma_sum: torch.Tensor,
    ambiguous: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    bb: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """The disjoint mean of one block from P, N, S, A (overwritten); returns θ_0 + scale·δ_m."""
    pos, neg, sgn, cnt = parts
    gamma, den = fin[0], fin[1]
    torch.add(pos, neg, out=gamma).sign_()
    torch.sum(gamma, 0, out=gamma_sum)
    # Where γ = 0 but some checkpoint has a non-zero δ̂ (an exact cancellation) the side is the
    # tensor's majority sign, known only after the last block: keep both candidates there.
    zero_mass = torch.abs(gamma, out=den).sub_(1.0).neg_().mul_(cnt)
    idx = _positions(zero_mass, _positive)
    if idx.numel():
        a, sg = cnt[idx], sgn[idx]
        # A side may have no agreeing weight (the mass underflowed: 0.5 × the smallest
        # subnormal is 0): 0 / tiny = 0 there, as in the main path, never 0 / 0.
        tiny = torch.finfo(a.dtype).tiny
        p = pos[idx] / ((a + sg) * 0.5).clamp_min_(tiny) * scale
        q = neg[idx] / ((a - sg) * 0.5).clamp_min_(tiny) * scale
        if bb is not None:
            p, q = p.add_(bb[idx]), q.add_(bb[idx])
        ambiguous.append((idx + start, p, q))
    # γ's side of the mass is the larger in magnitude of P ≥ 0 and N ≤ 0 (that is what decides
    # γ): γ·max(P, −N), exactly P or N. Its agreeing weight c = (A + γS)/2: γS only flips a
    # sign, so this is c⁺ = (A + S)/2 or c⁻ = (A − S)/2 to the bit. Both are 0 where γ = 0.
    torch.maximum(pos, neg.neg_(), out=pos).mul_(gamma)
    torch.mul(sgn, gamma, out=den).add_(cnt).mul_(0.5).clamp_min_(torch.finfo(den.dtype).tiny)
    # max(+0, −0) may be either zero: + 0.0 makes every zero +0, as the sums are.
    res = pos.div_(den).add_(0.0)
    if scale != 1.0:
        res.mul_(scale)
    return res if bb is None else res.add_(bb)
