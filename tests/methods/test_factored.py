"""LoRA task vectors as factors (`blocks.Factored`): the same bytes as the dense ΔW_i, never formed.

The dense path forms ΔW_i = s·B_i·A_i whole (`mwakit.lowrank.dense_delta`) and runs the block
kernels over it; the factored path forms each block of rows inside the kernels. Both must
select the same thresholds and write the same bits, for every method that takes factors.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mwakit.lowrank import dense_delta
from mwakit.methods import blocks, get_method, method_names
from tests.methods import oracle

OUT, IN, R = 640, 512, 4  # 327,680 elements: above 4 × SAMPLE, so the sampled bracket is used


def _factors(
    seed: int, out: int = OUT, inp: int = IN, r: int = R
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, inp, generator=g) * 0.1, torch.randn(out, r, generator=g) * 0.1


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("scaling", [1.0, 2.0, 0.25, 0.3, 16 / math.sqrt(8)])
@pytest.mark.parametrize("shape", [(OUT, IN), (4096, 96), (96, 14336)])
def test_formed_blocks_equal_the_dense_product(scaling: float, shape: tuple[int, int]) -> None:
    a, b = _factors(1, *shape)
    f = blocks.Factored(a, b, scaling)
    assert f.shape == torch.Size(shape) and f.numel() == shape[0] * shape[1]
    assert torch.equal(_bits(f.dense()), _bits(dense_delta(a, b, scaling).reshape(-1)))


def test_a_power_of_two_scaling_is_folded_into_b_exactly() -> None:
    a, b = _factors(2)
    assert blocks.Factored(a, b, 2.0).scaling == 1.0
    assert blocks.Factored(a, b, 0.3).scaling == 0.3
    # A fold that would overflow is not made.
    huge = blocks.Factored(a, b * 3e38, 4.0)
    assert huge.scaling == 4.0 and not huge.finite


def test_conv_factors_form_the_flattened_update() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(R, 24, 3, 3, generator=g)
    b = torch.randn(48, R, 1, 1, generator=g)
    f = blocks.Factored(a, b, 0.5)
    assert f.shape == torch.Size([48, 24, 3, 3])
    assert torch.equal(f.dense(), dense_delta(a, b, 0.5).reshape(-1))


@pytest.mark.parametrize("scaling", [2.0, 0.3])
def test_selection_on_factors_is_exact(scaling: float) -> None:
    a, b = _factors(4)
    d = dense_delta(a, b, scaling)
    n = d.numel()
    ks = [1, 17, n // 5, n // 2, n - 1, n]
    got = blocks.kth_largest_abs(blocks.Factored(a, b, scaling), None, ks)
    assert got == [oracle.kth_largest(d, k) for k in ks]
    assert got == blocks.kth_largest_abs(d, None, ks)


def test_selection_on_factors_with_many_zeros() -> None:
    # Most rows of B zero: most of ΔW is exactly 0, so deep ranks select a zero.
    a, b = _factors(5)
    b[: OUT - 40] = 0.0
    d = dense_delta(a, b, 2.0)
    n = d.numel()
    ks = [5, 40 * IN - 3, 40 * IN, 40 * IN + 1, n // 5, n]
    got = blocks.kth_largest_abs(blocks.Factored(a, b, 2.0), None, ks)
    assert got == [oracle.kth_largest(d, k) for k in ks]
    assert got[-3:] == [0.0, 0.0, 0.0]


def test_selection_on_factors_falls_back_when_the_bracket_misses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(blocks, "_MARGIN", -50.0)
    a, b = _factors(6)
    d = dense_delta(a, b, 0.3)
    ks = [3, d.numel() // 5]
    assert blocks.kth_largest_abs(blocks.Factored(a, b, 0.3), None, ks) == [
        oracle.kth_largest(d, k) for k in ks
    ]


def test_the_grid_sample_measures_its_own_spread() -> None:
    # Grids share rows and columns: the measured standard error of a fraction is at least
    # that of independent draws, and within a small factor of it on random factors.
    a, b = _factors(7, 4096, 1024, 16)
    f = blocks.Factored(a, b, 1.0)
    sample, se = blocks._grid_sample(f, torch.float32)
    m = sample.numel()
    t = float(sample.kthvalue(m - m // 5).values)
    iid = math.sqrt(0.2 * 0.8 / m)
    assert 0.8 * iid < se(sample, t) < 3.0 * iid


def _deltas(
    seeds: list[int], scalings: list[float]
) -> tuple[list[blocks.Factored], list[torch.Tensor]]:
    fs, ds = [], []
    for seed, s in zip(seeds, scalings, strict=True):
        a, b = _factors(seed)
        fs.append(blocks.Factored(a, b, s))
        ds.append(dense_delta(a, b, s))
    return fs, ds


FACTORED = sorted(name for name in method_names() if get_method(name).factored)


def test_the_methods_that_take_factors() -> None:
    assert FACTORED == [
        "breadcrumbs",
        "breadcrumbs_ties",
        "dare_linear",
        "dare_ties",
        "magnitude_prune",
        "ties",
    ]


@pytest.mark.parametrize("name", FACTORED)
@pytest.mark.parametrize("scalings", [[2.0, 2.0, 2.0], [0.3, 1.0, 0.7]])
def test_every_factored_method_writes_the_dense_bytes(name: str, scalings: list[float]) -> None:
    method = get_method(name)
    params = method.params.model_validate({})
    fs, ds = _deltas([10, 11, 12], scalings)
    weights = [1.0, 0.5, -0.75]
    got = method.merge(fs, weights, params, key="m.q_proj")
    want = method.merge(ds, weights, params, key="m.q_proj")
    assert got.shape == want.shape == torch.Size([OUT, IN])
    assert torch.equal(_bits(got), _bits(want))


def test_a_non_finite_factor_poisons_the_result() -> None:
    method = get_method("ties")
    params = method.params.model_validate({})
    fs, _ = _deltas([13, 14], [2.0, 2.0])
    a, b = _factors(15)
    b[3, 1] = math.inf
    bad = blocks.Factored(a, b, 2.0)
    assert not bad.finite
    out = method.merge([*fs, bad], [1.0, 1.0, 1.0], params)
    assert bool(torch.isnan(out).all())


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    density=st.sampled_from([0.05, 0.2, 0.5, 0.9, 1.0]),
    zero_rows=st.integers(0, OUT),
    scaling=st.sampled_from([1.0, 2.0, 0.3]),
)
def test_factored_ties_equals_dense_ties(
    seed: int, density: float, zero_rows: int, scaling: float
) -> None:
    fs, ds = [], []
    for i in range(3):
        a, b = _factors(seed + i)
        b[:zero_rows] = 0.0
        fs.append(blocks.Factored(a, b, scaling))
        ds.append(dense_delta(a, b, scaling))
    method = get_method("ties")
    params = method.params.model_validate({"density": density})
    got = method.merge(fs, [1.0, 1.0, 1.0], params)
    assert torch.equal(_bits(got), _bits(method.merge(ds, [1.0, 1.0, 1.0], params)))
