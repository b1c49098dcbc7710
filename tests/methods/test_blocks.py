"""The fused block kernels against the plain oracle, the SplitMix64 stream, exact selection."""

from __future__ import annotations

import math
import threading
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mwakit.methods import blocks, get_method, sparsify, splitmix
from tests.methods import oracle

CPU = torch.device("cpu")


def _t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


# --- SplitMix64 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 12345, (1 << 64) - 1, 8397526441203903195])
def test_stream_equals_the_python_reference(seed: int) -> None:
    words = splitmix.reference(seed, 9)
    want = [v for z in words for v in (z & splitmix.LOW31, (z >> 32) & splitmix.LOW31)]
    stream = splitmix.Stream(18, CPU)
    assert stream.bits31(seed, 0, 18).tolist() == want
    # Any even start and odd counts give the same element-wise bits (blocks agree).
    assert splitmix.Stream(18, CPU).bits31(seed, 4, 11).tolist() == want[4:15]


def test_stream_refuses_odd_starts_and_overflows() -> None:
    stream = splitmix.Stream(8, CPU)
    with pytest.raises(ValueError, match="even"):
        stream.bits31(0, 3, 2)
    with pytest.raises(ValueError, match="8"):
        stream.bits31(0, 0, 10)


def test_uniform_is_in_unit_interval_and_seeded() -> None:
    u = splitmix.uniform(torch.Size([1000]), 5, CPU)
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.05
    assert torch.equal(u, splitmix.uniform(torch.Size([1000]), 5, CPU))
    assert not torch.equal(u, splitmix.uniform(torch.Size([1000]), 6, CPU))


# --- exact selection -----------------------------------------------------------------------------


def _big(seed: int, n: int = 5 * blocks.SAMPLE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g)


@pytest.mark.parametrize("block", [None, 4096, 1000])
def test_selection_is_exact_on_large_tensors(block: int | None) -> None:
    base = _big(0).bfloat16()
    theta = (base.float() + 0.01 * _big(1)).bfloat16()  # bf16: many exact ties
    d = theta.float() - base.float()
    n = d.numel()
    ks = [1, 7, n // 5, n // 2, n - 3, n]
    got = blocks.kth_largest_abs(theta, base, ks, block=block)
    assert got == [oracle.kth_largest(d, k) for k in ks]


def test_selection_without_a_base_and_in_float64() -> None:
    x = _big(2).reshape(-1, 64)
    k = x.numel() // 10
    assert blocks.kth_largest_abs(x, None, [k]) == [oracle.kth_largest(x, k)]
    x64 = x.double() / 3
    assert blocks.kth_largest_abs(x64, None, [k], torch.float64) == [oracle.kth_largest(x64, k)]


def test_selection_falls_back_when_the_bracket_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    # A negative margin makes every bracket too narrow: the radix select must take over.
    monkeypatch.setattr(blocks, "_MARGIN", -50.0)
    x = _big(3)
    ks = [10, x.numel() // 3]
    assert blocks.kth_largest_abs(x, None, ks) == [oracle.kth_largest(x, k) for k in ks]


def test_selection_on_degenerate_values() -> None:
    x = torch.zeros(5 * blocks.SAMPLE)
    x[:10] = 3.0
    assert blocks.kth_largest_abs(x, None, [5, 10, 11, x.numel()]) == [3.0, 3.0, 0.0, 0.0]


# --- the block merge against the oracle ----------------------------------------------------------

_vals = st.integers(-8, 8).map(lambda v: v / 4)  # small dyadic values: many exact ties/cancels


@st.composite
def _case(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 40))
    k = draw(st.integers(1, 4))
    xs = [torch.tensor(draw(st.lists(_vals, min_size=n, max_size=n))) for _ in range(k)]
    ws = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0, 0.25]), min_size=k, max_size=k))
    base = (
        torch.tensor(draw(st.lists(_vals, min_size=n, max_size=n))) if draw(st.booleans()) else None
    )
    keep = [draw(st.sampled_from([None, 0.25, 0.5, 1.0])) for _ in range(k)]
    drop = [draw(st.sampled_from([None, 0.5, 1.5])) for _ in range(k)]
    # Drop rates whose rescale 1/(1 - p) is a power of two keep the arithmetic exact: with 0.3,
    # a sign election whose masses cancel exactly in the reals (1.25/0.7 + 0.5/0.7 = 1.75/0.7)
    # is decided by float32 vs float64 rounding, not by the method.
    rates = st.sampled_from([0.0, 0.5, 0.75])
    drops = [(draw(rates), draw(st.integers(0, 99))) for _ in range(k)]
    return {"xs": xs, "ws": ws, "base": base, "keep": keep, "drop": drop, "drops": drops}


@settings(max_examples=150, deadline=None)
@given(case=_case(), consensus=st.booleans(), block=st.sampled_from([2, 6, None]))
def test_block_merge_equals_the_oracle(
    case: dict[str, Any], consensus: bool, block: int | None
) -> None:
    xs, ws, base = case["xs"], case["ws"], case["base"]
    trims = [
        blocks.Trim(keep_from=kf, drop_from=df, drop_rate=p, seed=s)
        for kf, df, (p, s) in zip(case["keep"], case["drop"], case["drops"], strict=True)
    ]
    got = blocks.merge(xs, ws, base, trims, consensus=consensus, scale=0.5, block=block)
    want = oracle.merge(
        xs,
        ws,
        base,
        keep_from=case["keep"],
        drop_from=case["drop"],
        drops=case["drops"],
        consensus=consensus,
        scale=0.5,
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_zero_mass_majority_is_taken_over_the_whole_tensor() -> None:
    # The cancelling element sits in the first block; the majority (+) is only known at the end.
    a = torch.tensor([0.5, 1.0, 1.0, 1.0, 1.0, -1.0])
    b = torch.tensor([-0.5, 1.0, 1.0, 1.0, 1.0, -1.0])
    trims = [blocks.Trim(), blocks.Trim()]
    for block in (2, 4, None):
        got = blocks.merge([a, b], [1.0, 1.0], None, trims, consensus=True, block=block)
        assert got.tolist() == [0.5, 1.0, 1.0, 1.0, 1.0, -1.0]
        neg = blocks.merge([-a, -b], [1.0, 1.0], None, trims, consensus=True, block=block)
        assert neg.tolist() == [-0.5, -1.0, -1.0, -1.0, -1.0, 1.0]


def test_dare_golden_fixed_mask() -> None:
    # METHODS.md §6: δ = (0.2, −0.4, 0.1, 0.3), p = 0.5, mask (1, 0, 0, 1) → (0.4, 0, 0, 0.6).
    # Seed 14 is the first whose SplitMix64 mask for 4 elements at p = 0.5 is (1, 0, 0, 1).
    assert oracle.dare_keep(14, 4, 0.5).tolist() == [True, False, False, True]
    delta = _t(0.2, -0.4, 0.1, 0.3)
    got = blocks.merge([delta], [1.0], None, [blocks.Trim(drop_rate=0.5, seed=14)], consensus=False)
    assert torch.equal(got, _t(0.4, 0.0, 0.0, 0.6))


def test_dare_masks_do_not_depend_on_the_block_size() -> None:
    xs = [_big(i, 10_001) for i in range(3)]
    trims = [blocks.Trim(drop_rate=0.7, seed=i) for i in range(3)]
    ref = blocks.merge(xs, [1.0, 0.5, 2.0], None, trims, consensus=True)
    for block in (2, 998, 4096):
        got = blocks.merge(xs, [1.0, 0.5, 2.0], None, trims, consensus=True, block=block)
        assert got.numpy().tobytes() == ref.numpy().tobytes()


def test_dare_method_uses_the_documented_mask() -> None:
    x = _big(4, 1000)
    p = get_method("dare_linear").params.model_validate({"drop_rate": 0.4, "seed": 9})
    got = get_method("dare_linear").merge([x], [1.0], p, key="layers.0.w")
    keep = oracle.dare_keep(sparsify.derive_seed(9, "layers.0.w", 0), 1000, 0.4)
    assert torch.equal(got != 0, keep & (x != 0))
    torch.testing.assert_close(got[keep], x[keep] / 0.6)


@pytest.mark.parametrize("trim", [blocks.Trim(drop_rate=0.9, seed=1), blocks.Trim(drop_from=0.5)])
def test_a_dropped_non_finite_input_still_poisons_the_result(trim: blocks.Trim) -> None:
    # A NaN or Inf that the drop hides must still reach the executor's finiteness check.
    for bad in (math.nan, math.inf):
        x = torch.full((64,), 0.1)
        x[3] = bad
        got = blocks.merge(
            [x, torch.ones(64)], [1.0, 1.0], None, [trim, blocks.Trim()], consensus=False
        )
        assert not bool(torch.isfinite(got).all())


def test_half_precision_computes_in_float32() -> None:
    assert blocks.compute_dtype(torch.bfloat16) == torch.float32
    assert blocks.compute_dtype(None) == torch.float32
    assert blocks.compute_dtype(torch.float64) == torch.float64


def test_ties_mass_that_underflows_stays_finite() -> None:
    # 0.5 × the smallest subnormal rounds to 0: no side has mass, the sign is "ambiguous", and
    # the side without agreeing weight must give 0 / tiny = 0, not 0 / 0 (hypothesis found it).
    from mwakit.methods import get_method

    m = get_method("ties")
    p = m.params.model_validate({"density": 1.0})
    x = [torch.tensor([-1.4013e-45, 1.0])]
    out = m.merge(x, [0.5], p, base=None, dtype=torch.float32, key="k")
    assert torch.equal(out, torch.tensor([0.0, 1.0]))  # a disjoint mean: 0.5·1 / 0.5


# --- block workers --------------------------------------------------------------------------------


@pytest.mark.parametrize("factored", [False, True])
def test_block_workers_do_not_change_a_bit(monkeypatch: pytest.MonkeyPatch, factored: bool) -> None:
    monkeypatch.setattr(blocks, "THREAD_BLOCK", 0)  # small blocks split too, many of them
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # as inside a merge
    g = torch.Generator().manual_seed(5)
    if factored:
        xs: list[Any] = [
            blocks.Factored(torch.randn(4, 512, generator=g), torch.randn(640, 4, generator=g), 2.0)
            for _ in range(3)
        ]
        base = None
    else:
        base = torch.randn(640, 512, generator=g)
        xs = [base + torch.randn(640, 512, generator=g) for _ in range(3)]
    n = 640 * 512
    runs = []
    for workers in ("1", "3"):
        monkeypatch.setenv("MWAKIT_BLOCK_WORKERS", workers)
        ks = [blocks.kth_largest_abs(x, base, [n // 5, n // 2], block=4096) for x in xs]
        trims = [blocks.Trim(keep_from=k[0], drop_rate=0.5, seed=i) for i, k in enumerate(ks)]
        # The per-checkpoint selections of a trim run on threads of their own.
        magnitude = blocks.magnitude_trims(xs, [1.0, 0.0, -1.0], base, 0.3, None, torch.float32)
        ks.append([t.keep_from for t in magnitude])
        ties = blocks.merge(xs, [1.0, 0.5, -1.0], base, trims, consensus=True, block=4096)
        dare = blocks.merge(xs, [1.0, 0.5, -1.0], base, trims, consensus=False, block=4096)
        runs.append((ks, ties, dare))
    (k1, t1, d1), (k3, t3, d3) = runs
    assert k1 == k3 and torch.equal(t1, t3) and torch.equal(d1, d3)


def test_every_block_runs_once_and_a_worker_error_stops_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MWAKIT_BLOCK_WORKERS", "2")
    monkeypatch.setattr(blocks, "THREAD_BLOCK", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    seen: list[tuple[int, int, int]] = []
    made: list[str] = []

    def worker() -> Any:
        made.append(threading.current_thread().name)
        return lambda *span: seen.append(span)

    blocks._each_block(1000, 64, CPU, worker)
    assert sorted(seen) == [(i, 64 * i, min(1000, 64 * i + 64)) for i in range(16)]
    assert len(made) == 2 and all(n.startswith("mwakit-block") for n in made)

    done: list[int] = []

    def failing() -> Any:
        def fn(bi: int, s: int, e: int) -> None:
            if bi == 3:
                raise ValueError("block 3 is bad")
            done.append(bi)

        return fn

    with pytest.raises(ValueError, match="block 3 is bad"):
        blocks._each_block(64 * 400, 64, CPU, failing)
    assert len(done) < 399  # the others stopped early instead of finishing every block
