"""The randomized re-factorisation of a dense ΔW (mwakit.rsvd) against exact SVDs.

Matrices with known spectra U·diag(σ)·Vᵀ: the optimal rank-k error is then known exactly,
sqrt(Σ_{i>k} σ_i² / Σ σ_i²), whatever the SVD routine.
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mwakit import rsvd
from mwakit.lowrank import dense_delta, dense_refactor
from mwakit.methods.splitmix import reference

F64 = torch.float64
K = 8  # the rank of most cases: sketch width 18, so 300×260 matrices are sketched


def known(rows: int, cols: int, sigma: list[float], seed: int = 0) -> torch.Tensor:
    """A float32 matrix with singular values ``sigma`` (random orthonormal U, V)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(sigma), generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(sigma), generator=g, dtype=F64))
    return ((u * torch.tensor(sigma, dtype=F64)) @ v.T).float()


def optimal(sigma: list[float], k: int) -> float:
    s = sorted(sigma, reverse=True)
    total = math.fsum(x * x for x in s)
    return math.sqrt(math.fsum(x * x for x in s[k:]) / total) if total else 0.0


def exact_optimal(m: torch.Tensor, k: int) -> float:
    """The optimal error of the float32 matrix as stored (its own singular values, float64)."""
    s = torch.linalg.svdvals(m.double())
    return math.sqrt(float(s[k:].square().sum() / s.square().sum()))


def written_error(m: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    m64 = m.double()
    return math.sqrt(float((m64 - b.double() @ a.double()).square().sum() / m64.square().sum()))


HEAVY_TAIL = [10.0 / (i + 1) for i in range(12)] + [0.3] * 248  # TIES-like: strong head, flat tail
SLOW_CUT = [1.0] * 6 + [0.99**i for i in range(40)]  # no gap at k: subspace iteration is slow


# --- the test matrix ---------------------------------------------------------------------------


def test_test_matrix_is_splitmix_uniform_in_open_interval() -> None:
    om = rsvd.test_matrix(5, 3, 42, dtype=torch.float32, device=torch.device("cpu"))
    assert om.shape == (5, 3)
    # Element j is from half j % 2 of SplitMix64 output j // 2 (low 31 bits, top 24 kept).
    outs = reference(42, 8)
    for j, x in enumerate(om.reshape(-1).tolist()):
        r = (outs[j // 2] >> (32 * (j % 2))) & ((1 << 31) - 1)
        assert x == 2.0 * ((r >> 7) / 2.0**24) - 1.0 + 2.0**-24
    assert bool((om.abs() < 1.0).all())


def test_test_matrix_depends_on_the_seed_only() -> None:
    cpu = torch.device("cpu")
    a = rsvd.test_matrix(300, 18, 7, dtype=torch.float32, device=cpu)
    assert torch.equal(a, rsvd.test_matrix(300, 18, 7, dtype=torch.float32, device=cpu))
    assert not torch.equal(a, rsvd.test_matrix(300, 18, 8, dtype=torch.float32, device=cpu))
    # Symmetric around 0: mean ≈ 0 and variance ≈ 1/3 over 5400 draws.
    assert abs(float(a.mean())) < 0.03 and abs(float(a.var()) - 1 / 3) < 0.03


# --- known spectra -----------------------------------------------------------------------------


def test_heavy_tail_is_certified_and_near_optimal() -> None:
    m = known(300, 260, HEAVY_TAIL)
    sk = rsvd.sketch(m, K, seed=1)
    assert sk.certified
    assert sk.rel_error <= 1.01 * optimal(HEAVY_TAIL, K)
    ref = dense_refactor(m, K, seed=1)
    assert ref.solver == "randomized"
    # The reported error is the error of the factors written.
    assert written_error(m, ref.A, ref.B) == pytest.approx(ref.rel_error, rel=1e-4)
    assert ref.rel_error <= 1.01 * exact_optimal(m, K)


def test_low_rank_within_the_sketch_is_certified_by_the_bound() -> None:
    sigma = [2.0**-i for i in range(14)]  # rank 14 ≤ width 18: the whole tail is sketched
    m = known(300, 260, sigma)
    sk = rsvd.sketch(m, K, seed=3)
    assert sk.certified and sk.oversampled >= 1 / rsvd.ACCURACY**2
    assert sk.rel_error == pytest.approx(optimal(sigma, K), rel=1e-3)


def test_slow_spectrum_fails_first_sketch_and_the_wider_one_is_near_optimal() -> None:
    m = known(300, 260, SLOW_CUT)
    first = rsvd.sketch(m, 12, seed=5)
    # The criterion refuses it, rightly: the first sketch is more than 1 % off.
    assert not first.certified
    assert first.rel_error > 1.01 * optimal(SLOW_CUT, 12)
    ref = dense_refactor(m, 12, seed=5)
    assert ref.rel_error <= 1.01 * exact_optimal(m, 12)
    assert written_error(m, ref.A, ref.B) == pytest.approx(ref.rel_error, rel=1e-4)


def test_flat_spectrum_falls_back_to_the_exact_svd() -> None:
    # 260 nearly equal singular values: subspace iteration gains energy too slowly to
    # extrapolate, and the sketch holds a fraction of the tail: only the dense SVD can say.
    sigma = [1.0 - 0.0005 * i for i in range(260)]
    m = known(300, 260, sigma)
    assert not rsvd.sketch(m, K, seed=2).certified
    ref = dense_refactor(m, K, seed=2)
    assert ref.solver == "fallback"
    exact = dense_refactor(m, K, solver="exact")
    assert torch.equal(ref.A, exact.A) and torch.equal(ref.B, exact.B)
    assert ref.rel_error == pytest.approx(exact_optimal(m, K), rel=1e-5)


def test_small_matrices_use_the_exact_svd() -> None:
    m = known(100, 90, HEAVY_TAIL[:90])
    ref = dense_refactor(m, K)
    assert ref.solver == "exact"
    assert ref.rel_error == pytest.approx(exact_optimal(m, K), rel=1e-5)


def test_zero_matrix_gives_zero_factors() -> None:
    sk = rsvd.sketch(torch.zeros(300, 260), K, seed=0)
    assert sk.certified and sk.rel_error == 0.0
    ref = dense_refactor(torch.zeros(300, 260), K)
    assert not ref.A.any() and not ref.B.any() and ref.rel_error == 0.0


def test_ties_merge_is_certified_within_one_percent() -> None:
    from mwakit.methods import ties

    g = torch.Generator().manual_seed(0)
    deltas = [
        dense_delta(torch.randn(8, 320, generator=g), torch.randn(300, 8, generator=g), 2.0)
        for _ in range(4)
    ]
    merged = ties.merge(deltas, [1.0] * 4, ties.Params(density=0.2))
    ref = dense_refactor(merged, K, seed=11)
    assert ref.solver == "randomized"
    assert ref.rel_error <= 1.01 * exact_optimal(merged, K)


# --- reproducibility ---------------------------------------------------------------------------


def _digest(*ts: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in ts:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_sketch() -> None:
    m = known(300, 260, HEAVY_TAIL, seed=4)
    a, b = dense_refactor(m, K, seed=9), dense_refactor(m, K, seed=9)
    assert a.solver == "randomized"
    assert _digest(a.A, a.B) == _digest(b.A, b.B) and a.rel_error == b.rel_error
    c = dense_refactor(m, K, seed=10)
    assert _digest(a.A, a.B) != _digest(c.A, c.B)
    assert c.rel_error == pytest.approx(a.rel_error, rel=1e-3)


def test_conv_shapes_and_float64() -> None:
    m = known(300, 260, HEAVY_TAIL).double().reshape(300, 65, 2, 2)
    ref = dense_refactor(m, K, compute_dtype=F64, seed=1)
    assert ref.solver == "randomized"
    assert ref.A.shape == (K, 65, 2, 2) and ref.B.shape == (300, K, 1, 1)
    assert ref.A.dtype == F64 and ref.B.dtype == F64


# --- property: never worse than 1 % over the optimum -------------------------------------------


@st.composite
def spectra(draw: st.DrawFn) -> list[float]:
    head = draw(st.integers(1, 30))
    head_decay = draw(st.floats(0.5, 1.0))
    tail = draw(st.integers(0, 140))
    level = draw(st.floats(1e-4, 1.0))
    tail_decay = draw(st.floats(0.95, 1.0))
    return [head_decay**i for i in range(head)] + [level * tail_decay**i for i in range(tail)]


@settings(max_examples=15, deadline=None)
@given(sigma=spectra(), k=st.integers(1, 10), seed=st.integers(0, 2**62))
def test_never_worse_than_one_percent_over_optimal(sigma: list[float], k: int, seed: int) -> None:
    m = known(200, 170, sigma[:170], seed=seed % 1000)
    sk = rsvd.sketch(m, k, seed=seed)
    opt = exact_optimal(m, k)
    # 1e-5: the float32 rounding floor of any factorisation (an exactly rank-k matrix).
    if sk.certified:
        assert sk.rel_error <= 1.01 * opt + 1e-5
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rsvd, "EXACT_BELOW", 64)  # so that dense_refactor sketches these sizes
        ref = dense_refactor(m, k, seed=seed)
    assert ref.rel_error <= 1.01 * opt + 1e-5
    assert written_error(m, ref.A, ref.B) == pytest.approx(ref.rel_error, rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_input_is_left_untouched(dtype: torch.dtype) -> None:
    m = known(300, 260, HEAVY_TAIL).to(dtype)
    before = m.clone()
    assert rsvd.sum_squares(m) == pytest.approx(float(before.double().square().sum()), rel=1e-12)
    dense_refactor(m, K, compute_dtype=dtype, seed=1)
    assert torch.equal(m, before)
