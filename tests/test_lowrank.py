"""LoRA factor algebra against dense references (METHODS.md §2)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mwakit.adapters import full_rank
from mwakit.lowrank import (
    QrMemo,
    Refactored,
    concat_factors,
    dense_delta,
    dense_refactor,
    factors_average,
    full_factors,
    refactor,
    refactor_concat,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _factors(
    g: torch.Generator, out: int, inp: int, ranks: list[int], *, conv: tuple[int, int] = ()
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Random float64 LoRA factors; ``conv=(kh, kw)`` gives A (r, in, kh, kw), B (out, r, 1, 1)."""
    tail = (1, 1) if conv else ()
    As = [torch.randn(r, inp, *conv, generator=g, dtype=F64) for r in ranks]
    Bs = [torch.randn(out, r, *tail, generator=g, dtype=F64) for r in ranks]
    return As, Bs


def _dense_truncation(m: torch.Tensor, r: int) -> tuple[torch.Tensor, float]:
    """Rank-r truncation U_r S_r V_rᵀ of a 2-D matrix and its relative Frobenius error."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    total = float(s.square().sum())
    rel = math.sqrt(float(s[r:].square().sum()) / total) if total > 0 else 0.0
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r], rel


def _product(ref: Refactored) -> torch.Tensor:
    return dense_delta(ref.A, ref.B, 1.0)


# --- factors ----------------------------------------------------------------------------------


def test_methods_md_worked_example() -> None:
    # B, A = (1, 1) and (2, 3), w = ½, ½: B̄Ā = 1.5·2 = 3, the mean ΔW is (1 + 6)/2 = 3.5.
    As = [torch.tensor([[1.0]], dtype=F64), torch.tensor([[3.0]], dtype=F64)]
    Bs = [torch.tensor([[1.0]], dtype=F64), torch.tensor([[2.0]], dtype=F64)]
    a, b = factors_average(As, Bs, [0.5, 0.5], [1.0, 1.0], 1.0, dtype=F64)
    assert (b @ a).item() == 3.0
    mean = sum(0.5 * dense_delta(A, B, 1.0) for A, B in zip(As, Bs, strict=True))
    assert mean.item() == 3.5
    a, b = concat_factors(As, Bs, [0.5, 0.5], dtype=F64)
    assert a.shape == (2, 1) and b.shape == (1, 2)
    assert (b @ a).item() == 3.5  # exact: no cross terms


def test_factors_fold_scalings_into_b() -> None:
    As, Bs = _factors(_gen(0), 5, 6, [4, 4])
    a, b = factors_average(As, Bs, [0.25, 0.75], [2.0, 0.5], 2.0, dtype=F64)
    torch.testing.assert_close(a, 0.25 * As[0] + 0.75 * As[1], rtol=0, atol=1e-15)
    # B̄ = Σ w_i (s_i / s_out) B_i = 0.25·1·B_0 + 0.75·0.25·B_1.
    torch.testing.assert_close(b, 0.25 * Bs[0] + 0.1875 * Bs[1], rtol=0, atol=1e-15)
    # All weight on one checkpoint: s_out·B̄Ā is exactly that checkpoint's own ΔW = s_1 B_1 A_1.
    a, b = factors_average(As, Bs, [0.0, 1.0], [2.0, 0.5], 2.0, dtype=F64)
    torch.testing.assert_close(dense_delta(a, b, 2.0), dense_delta(As[1], Bs[1], 0.5))


def test_factors_reject_mismatched_shapes() -> None:
    As, Bs = _factors(_gen(1), 5, 6, [4, 4])
    with pytest.raises(ValueError, match="shapes differ"):
        factors_average([As[0], torch.zeros(3, 6, dtype=F64)], Bs, [0.5, 0.5], [1, 1], 1)
    with pytest.raises(ValueError, match="shapes differ"):
        factors_average(As, [Bs[0], torch.zeros(5, 3, dtype=F64)], [0.5, 0.5], [1, 1], 1)
    with pytest.raises(ValueError, match="rank"):
        factors_average([torch.zeros(3, 6)], [torch.zeros(5, 4)], [1.0], [1.0], 1.0)
    with pytest.raises(ValueError):
        factors_average(As, Bs, [1.0], [1.0, 1.0], 1.0)
    with pytest.raises(ValueError):
        factors_average([], [], [], [], 1.0)


def test_factors_bf16_inputs_accumulate_in_float32() -> None:
    g = _gen(2)
    n = 16
    As = [torch.randn(4, 64, generator=g).to(torch.bfloat16) for _ in range(n)]
    Bs = [torch.randn(32, 4, generator=g).to(torch.bfloat16) for _ in range(n)]
    w, s = [1.0 / n] * n, [0.5 + 0.1 * i for i in range(n)]
    a, b = factors_average(As, Bs, w, s, 2.0)
    assert a.dtype == b.dtype == torch.float32
    # The float64 reference uses the same bf16-rounded inputs: only input rounding is
    # shared, so what remains is float32 accumulation error (a bf16 accumulator gives ~1e-3).
    want_a = sum(wi * t.double() for wi, t in zip(w, As, strict=True))
    want_b = sum(wi * si / 2.0 * t.double() for wi, si, t in zip(w, s, Bs, strict=True))
    torch.testing.assert_close(a.double(), want_a, rtol=0, atol=2e-6)
    torch.testing.assert_close(b.double(), want_b, rtol=0, atol=2e-6)


# --- concat -----------------------------------------------------------------------------------


def test_concat_is_exact_for_mixed_ranks() -> None:
    ranks, coeffs = [2, 5, 3], [0.2, -0.3, 1.1]
    As, Bs = _factors(_gen(3), 6, 7, ranks)
    a, b = concat_factors(As, Bs, coeffs, dtype=F64)
    assert a.shape == (10, 7) and b.shape == (6, 10) and a.dtype == b.dtype == F64
    want = sum(c * B @ A for c, A, B in zip(coeffs, As, Bs, strict=True))
    torch.testing.assert_close(b @ a, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(a[2:7], As[1], rtol=0, atol=0)  # A rows are not scaled


def test_concat_is_exact_for_conv() -> None:
    ranks, coeffs = [2, 5, 3], [0.2, -0.3, 1.1]
    As, Bs = _factors(_gen(4), 4, 3, ranks, conv=(2, 2))
    a, b = concat_factors(As, Bs, coeffs, dtype=F64)
    assert a.shape == (10, 3, 2, 2) and b.shape == (4, 10, 1, 1)
    want = sum(dense_delta(A, B, c) for c, A, B in zip(coeffs, As, Bs, strict=True))
    got = dense_delta(a, b, 1.0)
    assert got.shape == (4, 3, 2, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_concat_bf16_inputs_give_float32() -> None:
    g = _gen(5)
    As = [torch.randn(r, 8, generator=g).to(torch.bfloat16) for r in (2, 3)]
    Bs = [torch.randn(5, r, generator=g).to(torch.bfloat16) for r in (2, 3)]
    a, b = concat_factors(As, Bs, [0.3, 0.7])
    assert a.dtype == b.dtype == torch.float32
    want = sum(c * B.double() @ A.double() for c, A, B in zip([0.3, 0.7], As, Bs, strict=True))
    torch.testing.assert_close((b @ a).double(), want, rtol=0, atol=1e-5)


def test_concat_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        concat_factors([torch.zeros(2, 3), torch.zeros(2, 4)], [torch.zeros(5, 2)] * 2, [1, 1])
    with pytest.raises(ValueError, match="rank"):
        concat_factors([torch.zeros(2, 3)], [torch.zeros(5, 3)], [1.0])
    with pytest.raises(ValueError):
        concat_factors([torch.zeros(2, 3)], [torch.zeros(5, 2)], [1.0, 2.0])


# --- refactor / dense_refactor ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("out", "inp", "ranks", "r"),
    [
        (40, 30, [4, 4, 4], 4),  # plain truncation
        (40, 30, [2, 6, 3], 7),  # mixed ranks
        (5, 30, [4, 4], 3),  # out < Σr
        (30, 6, [4, 4, 4], 5),  # in < Σr
        (5, 6, [4, 4], 5),  # out, in < Σr, r = available rank
        (20, 20, [2, 2], 8),  # r > available rank: zero padding
        (3, 4, [4, 4], 6),  # r > out, in: zero padding
    ],
)
def test_refactor_equals_dense_svd_truncation(out: int, inp: int, ranks: list[int], r: int) -> None:
    As, Bs = _factors(_gen(out * 100 + inp), out, inp, ranks)
    a, b = concat_factors(As, Bs, [0.3, -0.7, 1.3][: len(ranks)], dtype=F64)
    m = b @ a
    want, rel = _dense_truncation(m, r)
    # Factored input: the core is at most Σr wide; dense input: only min(out, in) exists.
    for ref, available in (
        (refactor(a, b, r, compute_dtype=F64), min(sum(ranks), out, inp)),
        (dense_refactor(m, r, compute_dtype=F64), min(out, inp)),
    ):
        assert ref.A.shape == (r, inp) and ref.B.shape == (out, r) and ref.rank == r
        assert ref.A.dtype == ref.B.dtype == F64
        torch.testing.assert_close(ref.B @ ref.A, want, rtol=0, atol=1e-10)
        assert ref.rel_error == pytest.approx(rel, abs=1e-10)
        if r > available:  # padded rows/columns are exactly zero
            assert torch.count_nonzero(ref.A[available:]) == 0
            assert torch.count_nonzero(ref.B[:, available:]) == 0
            assert ref.rel_error < 1e-12


def test_refactor_full_rank_reproduces_product() -> None:
    As, Bs = _factors(_gen(6), 8, 9, [6])
    a, b = As[0], Bs[0]
    for ref in (refactor(a, b, 6, compute_dtype=F64), dense_refactor(b @ a, 6, compute_dtype=F64)):
        torch.testing.assert_close(ref.B @ ref.A, b @ a, rtol=0, atol=1e-10)
        assert ref.rel_error < 1e-12


def test_refactor_zero_matrix() -> None:
    for ref in (
        refactor(torch.zeros(3, 4), torch.zeros(5, 3), 2),
        dense_refactor(torch.zeros(5, 4), 2),
        refactor(torch.zeros(3, 4, dtype=F64), torch.randn(5, 3, dtype=F64), 2, compute_dtype=F64),
    ):
        assert ref.rel_error == 0.0
        assert ref.A.shape == (2, 4) and ref.B.shape == (5, 2)
        assert torch.count_nonzero(ref.B @ ref.A) == 0
        assert bool(torch.isfinite(ref.A).all() and torch.isfinite(ref.B).all())


def test_refactor_conv_shapes() -> None:
    As, Bs = _factors(_gen(7), 5, 3, [4, 2], conv=(3, 3))
    a, b = concat_factors(As, Bs, [0.5, 2.0], dtype=F64)
    m = dense_delta(a, b, 1.0)
    want, rel = _dense_truncation(m.reshape(5, -1), 2)
    for ref in (refactor(a, b, 2, compute_dtype=F64), dense_refactor(m, 2, compute_dtype=F64)):
        assert ref.A.shape == (2, 3, 3, 3) and ref.B.shape == (5, 2, 1, 1)
        torch.testing.assert_close(_product(ref).reshape(5, -1), want, rtol=0, atol=1e-10)
        assert ref.rel_error == pytest.approx(rel, abs=1e-10)
    padded = refactor(a, b, 9, compute_dtype=F64)  # Σr = 6 < 9: padding keeps conv shapes
    assert padded.A.shape == (9, 3, 3, 3) and padded.B.shape == (5, 9, 1, 1)
    torch.testing.assert_close(_product(padded), m, rtol=0, atol=1e-10)


def test_refactor_computes_in_the_dtype_given() -> None:
    As, Bs = _factors(_gen(8), 12, 10, [4])
    a, b = As[0].to(torch.bfloat16), Bs[0].to(torch.bfloat16)
    ref = refactor(a, b, 2)
    assert ref.A.dtype == ref.B.dtype == torch.float32
    want, rel = _dense_truncation(b.double() @ a.double(), 2)
    torch.testing.assert_close((ref.B @ ref.A).double(), want, rtol=0, atol=1e-4)
    assert ref.rel_error == pytest.approx(rel, abs=1e-5)


def test_refactor_errors_and_non_finite() -> None:
    with pytest.raises(ValueError, match="rank"):
        refactor(torch.zeros(3, 4), torch.zeros(5, 3), 0)
    with pytest.raises(ValueError, match="rank"):
        dense_refactor(torch.zeros(5, 4), 0)
    with pytest.raises(ValueError, match="rank"):
        refactor(torch.zeros(3, 4), torch.zeros(5, 2), 2)
    bad = torch.ones(3, 4)
    bad[1, 2] = float("inf")
    # NaN factors (not a LinAlgError from the SVD) so the executor's finiteness check reports it.
    for ref in (refactor(bad, torch.ones(5, 3), 2), dense_refactor(torch.ones(5, 4) * bad[1], 2)):
        assert ref.A.shape == (2, 4) and ref.B.shape == (5, 2)
        assert bool(torch.isnan(ref.A).all()) and math.isnan(ref.rel_error)


def test_dense_delta_scaling() -> None:
    As, Bs = _factors(_gen(9), 4, 5, [3])
    torch.testing.assert_close(dense_delta(As[0], Bs[0], 0.25), 0.25 * Bs[0] @ As[0])


# --- properties -------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    out=st.integers(1, 12),
    inp=st.integers(1, 12),
    ranks=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    r=st.integers(1, 10),
    shared_a=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_refactor_properties(
    out: int, inp: int, ranks: list[int], r: int, shared_a: bool, seed: int
) -> None:
    g = _gen(seed)
    As, Bs = _factors(g, out, inp, ranks)
    if shared_a:  # same A rows in every checkpoint: true rank < Σr, as with a shared init
        k = min(ranks)
        As = [torch.cat([As[0][:k], A[k:]]) for A in As]
    a, b = concat_factors(As, Bs, [1.0] * len(ranks), dtype=F64)
    m = b @ a
    true_rank = int(torch.linalg.matrix_rank(m))
    ref = refactor(a, b, r, compute_dtype=F64)
    assert ref.A.shape == (r, inp) and ref.B.shape == (out, r) and ref.rank == r
    assert 0.0 <= ref.rel_error <= 1.0
    assert int(torch.linalg.matrix_rank(ref.B @ ref.A)) <= min(r, true_rank)
    if r >= true_rank:
        torch.testing.assert_close(ref.B @ ref.A, m, rtol=0, atol=1e-9 * (1 + m.abs().max()))
        assert ref.rel_error < 1e-6
    _, rel = _dense_truncation(m, r)
    assert ref.rel_error == pytest.approx(rel, abs=1e-9)


# --- full_factors: the merged ΔW exactly, no SVD -------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (7, 7), (5, 3, 3, 3)])
def test_full_factors_reproduce_delta_exactly(shape: tuple[int, ...]) -> None:
    delta = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ref = full_factors(delta)
    assert ref.rel_error == 0.0
    assert ref.rank == full_rank(ref.A.shape, ref.B.shape) == ref.A.shape[0] == ref.B.shape[1]
    # Conv keeps its kernel in A (PEFT's conv lora_B is 1×1): rank = out.
    assert ref.rank == (shape[0] if len(shape) > 2 else min(shape[0], shape[1]))
    assert torch.equal(dense_delta(ref.A, ref.B, 1.0), delta)


def test_full_factors_keep_the_dtype_and_flag_non_finite() -> None:
    delta = torch.randn(4, 8).bfloat16()
    ref = full_factors(delta)
    assert ref.A.dtype == ref.B.dtype == torch.bfloat16
    assert torch.equal(dense_delta(ref.A.float(), ref.B.float(), 1.0), delta.float())
    delta[1, 2] = float("inf")
    assert math.isnan(full_factors(delta).rel_error)
    with pytest.raises(ValueError, match="2-D"):
        full_factors(torch.ones(3))


def _stack(
    seed: int, ranks: list[int], out: int = 40, inp: int = 30
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return (
        [torch.randn(r, inp, generator=g) for r in ranks],
        [torch.randn(out, r, generator=g) for r in ranks],
    )


@pytest.mark.parametrize("coeffs", [[1.0, 0.5, 2.0], [1e-6, 1.0, -0.3], [0.0, 1.0, 1.0]])
def test_refactor_concat_is_the_best_rank_r_of_the_weighted_sum(coeffs: list[float]) -> None:
    As, Bs = _stack(11, [4, 2, 3])
    ref = refactor_concat(As, Bs, coeffs, 3, compute_dtype=torch.float64)
    m = sum(c * b.double() @ a.double() for a, b, c in zip(As, Bs, coeffs, strict=True))
    s = torch.linalg.svdvals(m)
    best = float(torch.sqrt((s[3:] ** 2).sum() / (s**2).sum()))
    assert ref.rel_error == pytest.approx(best, rel=1e-9, abs=1e-12)
    err = torch.linalg.norm(m - ref.B @ ref.A) / torch.linalg.norm(m)
    assert float(err) == pytest.approx(best, rel=1e-9, abs=1e-12)
    # The same approximation as the QR of the weighted factors (`refactor`).
    a, b = concat_factors(As, Bs, coeffs, dtype=torch.float64)
    other = refactor(a, b, 3, compute_dtype=torch.float64)
    assert torch.allclose(ref.B @ ref.A, other.B @ other.A, atol=1e-10)


def test_the_qr_memo_serves_the_same_tensors_only() -> None:
    As, Bs = _stack(12, [4, 4])
    memo = QrMemo()
    first = refactor_concat(As, Bs, [1.0, 2.0], 4, memo=memo, key="m")
    assert memo.hits == 0
    # Other weights, the same tensors: the QR is reused, the bytes are a fresh call's.
    again = refactor_concat(As, Bs, [0.3, 1.5], 4, memo=memo, key="m")
    fresh = refactor_concat(As, Bs, [0.3, 1.5], 4)
    assert memo.hits == 1
    assert torch.equal(again.A, fresh.A) and torch.equal(again.B, fresh.B)
    assert not torch.equal(again.B, first.B)
    # Equal values in another tensor, or the same tensor changed in place: computed anew.
    copies = [a.clone() for a in As]
    refactor_concat(copies, Bs, [1.0, 1.0], 4, memo=memo, key="m")
    assert memo.hits == 1
    Bs[0].mul_(2.0)
    changed = refactor_concat(copies, Bs, [1.0, 1.0], 4, memo=memo, key="m")
    assert memo.hits == 1
    want = refactor_concat([a.clone() for a in copies], [b.clone() for b in Bs], [1.0, 1.0], 4)
    assert torch.equal(changed.B, want.B)


def test_refactor_concat_flags_non_finite_inputs() -> None:
    As, Bs = _stack(13, [2, 2])
    As[1][0, 0] = math.inf
    ref = refactor_concat(As, Bs, [1.0, 1.0], 2)
    assert math.isnan(ref.rel_error) and bool(torch.isnan(ref.A).all())


def test_the_qr_memo_keeps_only_what_its_budget_allows() -> None:
    As, Bs = _stack(14, [4, 4])
    charged: list[int] = []

    def refuse(n: int) -> bool:
        charged.append(n)
        return False

    memo = QrMemo(refuse)
    first = refactor_concat(As, Bs, [1.0, 2.0], 4, memo=memo, key="m")
    again = refactor_concat(As, Bs, [1.0, 2.0], 4, memo=memo, key="m")
    assert memo.hits == 0 and len(charged) == 2  # asked each time, kept nothing
    # Q_b, R_b, Q_a, R_a of a 40×8 B° and a 30×8 A*ᵀ in float32.
    assert charged[0] == 4 * (40 * 8 + 8 * 8 + 30 * 8 + 8 * 8)
    assert torch.equal(first.B, again.B)
    budget = [charged[0]]

    def allow(n: int) -> bool:
        if n > budget[0]:
            return False
        budget[0] -= n
        return True

    kept = QrMemo(allow)
    refactor_concat(As, Bs, [1.0, 2.0], 4, memo=kept, key="m")
    refactor_concat(As, Bs, [0.5, 2.0], 4, memo=kept, key="m")
    assert kept.hits == 1 and budget == [0]
    # A miss gives the old entry's bytes back before the new one is charged.
    refactor_concat([a.clone() for a in As], Bs, [1.0, 1.0], 4, memo=kept, key="m")
    assert budget == [0] and kept.hits == 1
