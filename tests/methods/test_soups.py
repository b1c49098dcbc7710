"""SLERP, Model Stock, Fisher-weighted averaging and sparse soups: hand-computed goldens,
edge cases, properties (hypothesis) and bf16 inputs."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mwakit.methods import get_method
from mwakit.methods.registry import CheckpointView
from mwakit.methods.sparse import sparsity

SQRT2 = math.sqrt(2.0)


def T(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def _merge(name: str, tensors: list[torch.Tensor], weights: list[float], **kw: Any) -> Any:
    params = kw.pop("params", {})
    m = get_method(name)
    return m.merge(tensors, weights, m.params.model_validate(params), **kw)


def _views(*weights: float | None) -> list[CheckpointView]:
    return [CheckpointView(f"c{i}", {}, w) for i, w in enumerate(weights)]


# ---------------------------------------------------------------------------------------------
# Registration and params


@pytest.mark.parametrize("name", ["slerp", "model_stock", "fisher", "sparse"])
def test_params_reject_unknown_keys_and_document_every_field(name: str) -> None:
    m = get_method(name)
    with pytest.raises(ValidationError):
        m.params.model_validate({"no_such_key": 1})
    for field, info in m.params.model_fields.items():
        assert info.description, f"{name}.{field} has no attribute docstring"
    assert not m.linear and m.formula and m.reference


def test_registry_input_counts_and_bases() -> None:
    assert get_method("slerp").inputs == (2, 2)
    assert get_method("model_stock").inputs == (2, None)
    assert get_method("model_stock").needs_base
    assert not get_method("fisher").needs_base and not get_method("sparse").needs_base
    # Fisher files hold the adapter's own keys (A and B), so fisher merges factors, not ΔW.
    assert get_method("fisher").spaces == ("factors", "full")


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("slerp", {"t": 1.5}),
        ("slerp", {"t": -0.1}),
        ("slerp", {"eps": 0}),
        ("fisher", {"floor": 0}),
        ("fisher", {"floor": float("nan")}),
        ("fisher", {"fisher_file": "../f.safetensors"}),
        ("sparse", {"mask": "any"}),
    ],
)
def test_bad_params(name: str, params: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        get_method(name).params.model_validate(params)


def test_weigh() -> None:
    slerp, stock = get_method("slerp"), get_method("model_stock")
    assert slerp.weigh(slerp.params(t=0.25), _views(None, None)) == [0.75, 0.25]
    assert stock.weigh(stock.params(), _views(None, 3.0)) == [0.25, 0.75]
    for name in ("fisher", "sparse"):
        m = get_method(name)
        assert m.weigh(m.params(), _views(1.0, 1.0, 2.0)) == [0.25, 0.25, 0.5]


# ---------------------------------------------------------------------------------------------
# SLERP


def test_slerp_endpoints_are_exact() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    assert torch.equal(_merge("slerp", [a, b], [1, 1], params={"t": 0.0}), a)
    assert torch.equal(_merge("slerp", [a, b], [1, 1], params={"t": 1.0}), b)


def test_slerp_midpoint_of_orthogonal_unit_vectors_stays_on_the_sphere() -> None:
    out = _merge("slerp", [T(1, 0), T(0, 1)], [0.5, 0.5], params={"t": 0.5})
    torch.testing.assert_close(out, T(SQRT2 / 2, SQRT2 / 2))
    assert float(out.norm()) == pytest.approx(1.0, abs=1e-6)
    # lerp would give norm √2/2: the rotation is what keeps the norm.
    out = _merge("slerp", [T(1, 0), T(0, 1)], [0.5, 0.5], params={"t": 1 / 3})
    torch.testing.assert_close(out, T(math.cos(math.pi / 6), math.sin(math.pi / 6)))


def test_slerp_of_2d_tensor_uses_the_flattened_vector() -> None:
    a, b = torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # orthogonal when flattened
    out = _merge("slerp", [a, b], [0.5, 0.5], params={"t": 0.5})
    torch.testing.assert_close(out, (a + b) / SQRT2)


@pytest.mark.parametrize(
    "b",
    [T(2, 4, 6), T(-1, -2, -3), T(0, 0, 0), T(1, 2, 3.000001)],
    ids=["colinear", "antipodal", "zero", "nearly-colinear"],
)
def test_slerp_falls_back_to_lerp(b: torch.Tensor) -> None:
    a = T(1, 2, 3)
    out = _merge("slerp", [a, b], [0.7, 0.3], params={"t": 0.3})
    torch.testing.assert_close(out, 0.7 * a + 0.3 * b, rtol=0, atol=1e-6)


def test_slerp_zero_first_vector_is_lerp() -> None:
    out = _merge("slerp", [T(0, 0), T(2, 4)], [0.5, 0.5], params={"t": 0.25})
    torch.testing.assert_close(out, T(0.5, 1.0))


@pytest.mark.parametrize("n", [1, 3])
def test_slerp_needs_exactly_two(n: int) -> None:
    with pytest.raises(ValueError, match=f"exactly 2 checkpoints, got {n}"):
        _merge("slerp", [T(1, 2)] * n, [1.0] * n)


# ---------------------------------------------------------------------------------------------
# Model Stock


def test_model_stock_two_models_hand_computed() -> None:
    # δ_1 = (1, 0), δ_2 = (1, 1): c = cos 45° = 1/√2, t = 2c/(1 + c) = 2(√2 − 1) = 0.828427.
    base = T(1, 2)
    c = 1 / SQRT2
    t = 2 * c / (1 + c)
    assert t == pytest.approx(0.8284271)
    out = _merge("model_stock", [base + T(1, 0), base + T(1, 1)], [0.5, 0.5], base=base)
    # θ = t·mean θ_i + (1 − t)·θ_0 = θ_0 + t·(1, 0.5)
    torch.testing.assert_close(out, T(1 + t, 2 + 0.5 * t))
    torch.testing.assert_close(out, t * T(2, 2.5) + (1 - t) * base)


def test_model_stock_three_models_hand_computed() -> None:
    # cos(δ1,δ2) = 0, cos(δ1,δ3) = cos(δ2,δ3) = 1/√2 → c = √2/3 = 0.4714045,
    # t = 3c/(1 + 2c) = 0.7279221; mean δ = (2/3, 2/3, 0).
    c = SQRT2 / 3
    t = 3 * c / (1 + 2 * c)
    assert (c, t) == (pytest.approx(0.4714045), pytest.approx(0.7279221))
    deltas = [T(1, 0, 0), T(0, 1, 0), T(1, 1, 0)]
    out = _merge("model_stock", deltas, [1 / 3] * 3)  # base None: the inputs are ΔW
    torch.testing.assert_close(out, T(2 * t / 3, 2 * t / 3, 0))


def test_model_stock_filter_wise_takes_t_per_row() -> None:
    # Row 0: δ = (1,0) and (1,1) → t = 0.828427; row 1: (1,0) and (2,0) → c = 1 → t = 1.
    a, b = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    t0 = 2 * (SQRT2 - 1)
    rows = _merge("model_stock", [a, b], [0.5, 0.5], params={"filter_wise": True})
    torch.testing.assert_close(rows, torch.tensor([[t0, 0.5 * t0], [1.5, 0.0]]))
    # Not filter-wise: one c over the flattened tensors, cos((1,0,1,0), (1,1,2,0)) = 3/√12.
    c = 3 / math.sqrt(12)
    whole = _merge("model_stock", [a, b], [0.5, 0.5])
    torch.testing.assert_close(whole, (2 * c / (1 + c)) * (a + b) / 2)


def test_model_stock_opposed_or_zero_task_vectors_give_the_base() -> None:
    base = T(3, -1)
    opposed = _merge("model_stock", [base + T(1, 0), base - T(1, 0)], [0.5, 0.5], base=base)
    torch.testing.assert_close(opposed, base)
    zero = _merge("model_stock", [base, base], [0.5, 0.5], base=base)
    torch.testing.assert_close(zero, base)


def test_model_stock_needs_two() -> None:
    with pytest.raises(ValueError, match="at least 2 checkpoints, got 1"):
        _merge("model_stock", [T(1, 2)], [1.0])


# ---------------------------------------------------------------------------------------------
# Fisher


def test_fisher_golden() -> None:
    # (½·4·1 + ½·1·3) / (½·4 + ½·1) = 3.5 / 2.5 = 1.4 (the floor moves it by < 1e-6).
    out = _merge("fisher", [T(1), T(3)], [0.5, 0.5], fishers=[T(4), T(1)])
    assert float(out) == pytest.approx(1.4, abs=1e-6)
    vec = _merge("fisher", [T(1, 3), T(3, 3)], [0.5, 0.5], fishers=[T(4, 0), T(1, 7)])
    torch.testing.assert_close(vec, T(1.4, 3.0))


def test_fisher_floor_prevents_nan_and_gives_the_weighted_average() -> None:
    out = _merge("fisher", [T(1, -2), T(3, 6)], [0.25, 0.75], fishers=[T(0, 0), T(0, 0)])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, T(2.5, 4.0))


def test_fisher_normalize_with_given_norms() -> None:
    # F̂_1 = 4/8 = 0.5, F̂_2 = 1/0.5 = 2: (½·0.5·1 + ½·2·3) / (½·0.5 + ½·2) = 3.25/1.25 = 2.6.
    # Unnormalised the same inputs give 1.4: the global norms change the balance.
    out = _merge(
        "fisher",
        [T(1), T(3)],
        [0.5, 0.5],
        params={"normalize_fisher": True},
        fishers=[T(4), T(1)],
        fisher_norms=[8.0, 0.5],
    )
    assert float(out) == pytest.approx(2.6, abs=1e-5)


def test_fisher_normalize_needs_norms_and_survives_a_zero_norm() -> None:
    p = {"normalize_fisher": True}
    with pytest.raises(ValueError, match="global L2 norm"):
        _merge("fisher", [T(1), T(3)], [0.5, 0.5], params=p, fishers=[T(4), T(1)])
    # An all-zero Fisher (norm 0) is not divided: it contributes through the floor only.
    out = _merge(
        "fisher", [T(1), T(3)], [0.5, 0.5], params=p, fishers=[T(0), T(1)], fisher_norms=[0, 1]
    )
    assert float(out) == pytest.approx(3.0, abs=1e-5)


@pytest.mark.parametrize(
    ("fishers", "match"),
    [(None, "diagonal Fisher"), ([T(1), T(-1)], "negative"), ([T(1), T(1, 2)], "shape")],
)
def test_fisher_rejects_bad_fishers(fishers: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _merge("fisher", [T(1), T(3)], [0.5, 0.5], fishers=fishers, key="w")


# ---------------------------------------------------------------------------------------------
# Sparse soups


def test_sparse_shared_mask_is_preserved_exactly() -> None:
    a, b = T(1, 0, 2, 0, 3, 0), T(5, 0, 1, 0, 1, 0)
    out = _merge("sparse", [a, b], [0.25, 0.75])
    torch.testing.assert_close(out, T(4, 0, 1.25, 0, 1.5, 0))
    assert torch.equal(out != 0, a != 0)
    assert sparsity(out) == sparsity(a) == sparsity(b) == 0.5


def test_sparse_shared_refuses_differing_masks() -> None:
    with pytest.raises(ValueError, match="masks differ") as exc:
        _merge("sparse", [T(1, 0, 3, 0), T(3, 5, 0, 0)], [0.5, 0.5], key="w")
    assert "intersection, union or reprune" in str(exc.value)
    assert "disagree on 2 of 4" in str(exc.value)


@pytest.mark.parametrize(
    ("mask", "want"),
    [
        ("intersection", T(2, 0, 0, 0)),  # only position 0 is non-zero in both
        ("union", T(2, 2.5, 1.5, 0)),  # the plain average: a pruned weight counts as 0
        ("reprune", T(2, 2.5, 0, 0)),  # both have 2 non-zeros: keep the 2 largest |avg|
    ],
)
def test_sparse_policies_hand_computed(mask: str, want: torch.Tensor) -> None:
    out = _merge("sparse", [T(1, 0, 3, 0), T(3, 5, 0, 0)], [0.5, 0.5], params={"mask": mask})
    torch.testing.assert_close(out, want)


def test_sparse_reprune_rounds_the_mean_count_half_up_and_unnormalised_weights() -> None:
    # Non-zero counts 2 and 3 → mean 2.5 → k = 3; weights (1, 3) are divided by their sum.
    a, b = T(4, 0, 0, 8, 0), T(0, 4, 2, 0, 1)
    out = _merge("sparse", [a, b], [1.0, 3.0], params={"mask": "reprune"})
    # average (1, 3, 1.5, 2, 0.75): the 3 largest are 3, 2 and 1.5
    torch.testing.assert_close(out, T(0, 3, 1.5, 2, 0))


def test_sparsity_helper() -> None:
    assert sparsity(T(0, 1, 0, 0)) == 0.75
    assert sparsity(torch.zeros(0)) == 0.0
    assert sparsity(torch.ones(3, dtype=torch.bfloat16)) == 0.0


def test_sparse_weights_summing_to_zero_raise() -> None:
    with pytest.raises(ValueError, match="sum to 0"):
        _merge("sparse", [T(1), T(2)], [1.0, -1.0])


# ---------------------------------------------------------------------------------------------
# bf16 inputs


def test_bf16_inputs_compute_in_float32() -> None:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 6, generator=g).to(torch.bfloat16) for _ in range(3)]
    fs = [torch.rand(4, 6, generator=g).to(torch.bfloat16) for _ in range(3)]
    base = torch.randn(4, 6, generator=g).to(torch.bfloat16)
    f32 = [x.float() for x in xs]
    cases: list[tuple[str, list[torch.Tensor], list[torch.Tensor], dict[str, Any]]] = [
        ("slerp", xs[:2], f32[:2], {}),
        ("model_stock", xs, f32, {"base": base}),
        ("fisher", xs, f32, {"fishers": fs}),
        ("sparse", xs, f32, {"params": {"mask": "reprune"}}),
    ]
    for name, bf, fl, kw in cases:
        w = [1 / len(bf)] * len(bf)
        got = _merge(name, bf, w, **dict(kw))
        want_kw = dict(kw)
        if "base" in want_kw:
            want_kw["base"] = base.float()
        if "fishers" in want_kw:
            want_kw["fishers"] = [f.float() for f in fs]
        want = _merge(name, fl, w, **want_kw)
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, want, msg=name)
    # An explicit compute dtype is honoured.
    out = _merge("slerp", xs[:2], [0.5, 0.5], dtype=torch.float64)
    assert out.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# Properties

_floats = st.floats(-10, 10, allow_nan=False, allow_subnormal=False, width=32)


@st.composite
def _groups(draw: st.DrawFn, min_n: int = 2, ints: bool = False) -> dict[str, Any]:
    n = draw(st.integers(min_n, 4))
    size = draw(st.integers(1, 8))
    elem = st.integers(-3, 3).map(float) if ints else _floats
    vals = [draw(st.lists(elem, min_size=size, max_size=size)) for _ in range(n)]
    fish = [
        draw(st.lists(st.floats(0, 100, allow_subnormal=False), min_size=size, max_size=size))
        for _ in range(n)
    ]
    weights = [1.0] * n if ints else draw(st.lists(st.floats(0.1, 10), min_size=n, max_size=n))
    total = math.fsum(weights)
    return {
        "tensors": [torch.tensor(v) for v in vals],
        "fishers": [torch.tensor(f) for f in fish],
        "weights": [w / total for w in weights] if not ints else weights,
        "perm": draw(st.permutations(range(n))),
    }


def _permuted(g: dict[str, Any], key: str) -> list[Any]:
    return [g[key][i] for i in g["perm"]]


@settings(max_examples=60, deadline=None)
@given(_groups(), st.booleans())
def test_model_stock_is_permutation_invariant(g: dict[str, Any], filter_wise: bool) -> None:
    p = {"filter_wise": filter_wise}
    base = torch.linspace(-1, 1, g["tensors"][0].numel())
    a = _merge("model_stock", g["tensors"], g["weights"], params=p, base=base)
    b = _merge("model_stock", _permuted(g, "tensors"), _permuted(g, "weights"), params=p, base=base)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(_groups(), st.booleans())
def test_fisher_is_permutation_invariant(g: dict[str, Any], normalize: bool) -> None:
    p = {"normalize_fisher": normalize}
    norms = [float(f.norm()) for f in g["fishers"]]
    a = _merge(
        "fisher", g["tensors"], g["weights"], params=p, fishers=g["fishers"], fisher_norms=norms
    )
    b = _merge(
        "fisher",
        _permuted(g, "tensors"),
        _permuted(g, "weights"),
        params=p,
        fishers=_permuted(g, "fishers"),
        fisher_norms=[norms[i] for i in g["perm"]],
    )
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # A weighted average per element: inside the inputs' range.
    stack = torch.stack(g["tensors"])
    assert (a >= stack.min(0).values - 1e-4).all() and (a <= stack.max(0).values + 1e-4).all()


@settings(max_examples=60, deadline=None)
@given(_groups(ints=True), st.sampled_from(["intersection", "union", "reprune"]))
def test_sparse_is_permutation_invariant(g: dict[str, Any], mask: str) -> None:
    # Integer values and unit weights: sums are exact in any order, so top-k ties are too.
    p = {"mask": mask}
    a = _merge("sparse", g["tensors"], g["weights"], params=p)
    b = _merge("sparse", _permuted(g, "tensors"), _permuted(g, "weights"), params=p)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    if mask == "intersection":
        for t in g["tensors"]:
            assert not ((t == 0) & (a != 0)).any()


@settings(max_examples=60, deadline=None)
@given(_groups())
def test_sparse_shared_is_permutation_invariant_and_keeps_the_mask(g: dict[str, Any]) -> None:
    mask = g["tensors"][0] != 0
    # Every input gets input 0's zero pattern: zeros off the mask, non-zeros on it.
    tensors = [torch.where(mask, torch.where(t == 0, 1.0, t), 0.0) for t in g["tensors"]]
    a = _merge("sparse", tensors, g["weights"])
    b = _merge("sparse", [tensors[i] for i in g["perm"]], _permuted(g, "weights"))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not a[~mask].any()


@settings(max_examples=60, deadline=None)
@given(_groups(), st.floats(0, 1))
def test_slerp_outputs_are_finite(g: dict[str, Any], t: float) -> None:
    out = _merge("slerp", g["tensors"][:2], [0.5, 0.5], params={"t": t})
    assert torch.isfinite(out).all()


@settings(max_examples=60, deadline=None)
@given(_groups(min_n=1), st.sampled_from(["shared", "intersection", "union", "reprune"]))
def test_one_input_comes_back_unchanged(g: dict[str, Any], mask: str) -> None:
    x, f = g["tensors"][0], g["fishers"][0]
    assert torch.equal(_merge("fisher", [x], [1.0], fishers=[f]), x)
    assert torch.equal(_merge("sparse", [x], [1.0], params={"mask": mask}), x)
