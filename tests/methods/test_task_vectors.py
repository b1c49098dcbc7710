"""Task-vector methods: METHODS.md §4–6 goldens, sparsify helpers, determinism and invariants."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from mwakit.errors import MetricError
from mwakit.methods import blocks, get_method, sparsify
from mwakit.methods.registry import CheckpointView
from tests.methods import oracle

METHODS = (
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "breadcrumbs",
    "della",
)
#: Params that keep everything: each method must then return its one input unchanged.
IDENTITY: dict[str, dict[str, Any]] = {
    "task_arithmetic": {},
    "ties": {"density": 1.0},
    "dare_linear": {"drop_rate": 0.0},
    "dare_ties": {"drop_rate": 0.0},
    "magnitude_prune": {"density": 1.0},
    "breadcrumbs": {"density": 1.0, "gamma": 0.0},
    "della": {"density": 1.0, "epsilon": 0.0},
}
#: Params that really sparsify.
TYPICAL: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"lambda": 0.7},
    "ties": {"density": 0.5, "lambda": 0.8},
    "dare_linear": {"drop_rate": 0.3, "seed": 3},
    "dare_ties": {"drop_rate": 0.3, "seed": 3},
    "magnitude_prune": {"density": 0.5},
    "breadcrumbs": {"density": 0.8, "gamma": 0.1},
    "della": {"density": 0.5, "epsilon": 0.2, "seed": 3},
}
TRIMMED = ("ties", "magnitude_prune", "breadcrumbs")
DETERMINISTIC = ("task_arithmetic", "ties", "magnitude_prune", "breadcrumbs")


def _params(name: str, data: dict[str, Any]) -> BaseModel:
    return get_method(name).params.model_validate(data)


def _merge(name: str, data: dict[str, Any], tensors: Sequence[torch.Tensor], **kw: Any) -> Any:
    weights = kw.pop("weights", [1.0] * len(tensors))
    return get_method(name).merge(list(tensors), list(weights), _params(name, data), **kw)


def _t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _views(*weights: float | None) -> list[CheckpointView]:
    return [CheckpointView(f"c{i}", {}, w) for i, w in enumerate(weights)]


# --- registry and params -----------------------------------------------------------------------


def test_registered_with_the_right_flags() -> None:
    for name in METHODS:
        m = get_method(name)
        assert m.needs_base and m.spaces == ("delta", "full"), name
        assert m.linear == (name == "task_arithmetic"), name
        assert m.summary and m.formula and m.reference
        for field in m.params.model_fields.values():
            assert field.description, (name, field)


def test_lambda_is_written_lambda() -> None:
    p = _params("ties", {"lambda": 0.5})
    assert p.lambda_ == 0.5  # type: ignore[attr-defined]
    assert p.model_dump()["lambda"] == 0.5
    # A dumped recipe (the model card's) validates again.
    assert _params("ties", p.model_dump()) == p
    assert "lambda" in get_method("task_arithmetic").params.model_json_schema()["properties"]


@pytest.mark.parametrize(
    ("name", "data", "match"),
    [
        ("dare_linear", {"drop_rate": 1.0}, "drop_rate"),
        ("dare_ties", {"drop_rate": -0.1}, "drop_rate"),
        ("della", {"density": 0.9, "epsilon": 0.15}, "density ± epsilon"),
        ("della", {"density": 0.1, "epsilon": 0.15}, "density ± epsilon"),
        ("della", {"density": 1.0}, "density ± epsilon"),
        ("breadcrumbs", {"density": 0.1, "gamma": 0.1}, "gamma"),
        ("ties", {"density": 0.0}, "density"),
        ("ties", {"density": 1.5}, "density"),
        ("ties", {"trim_scope": "layer"}, "trim_scope"),
        ("ties", {"lambda": float("nan")}, "lambda"),
        ("magnitude_prune", {"densty": 0.5}, "densty"),
    ],
)
def test_bad_params_are_rejected(name: str, data: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        _params(name, data)


def test_della_accepts_the_edges_of_its_range() -> None:
    _params("della", {"density": 0.85, "epsilon": 0.15})
    _params("della", {"density": 0.15, "epsilon": 0.15})


def test_weigh_folds_lambda_only_into_weighted_sums() -> None:
    views = _views(1.0, 3.0)
    assert get_method("task_arithmetic").weigh(_params("task_arithmetic", {}), views) == [1, 3]
    p = _params("task_arithmetic", {"lambda": 2.0, "normalize": True})
    assert get_method("task_arithmetic").weigh(p, views) == [0.5, 1.5]
    p = _params("magnitude_prune", {"lambda": 2.0})
    assert get_method("magnitude_prune").weigh(p, _views(None, 3.0)) == [2.0, 6.0]
    # In a disjoint mean λ would cancel: those methods apply it to the mean instead.
    for name in ("ties", "dare_ties", "della"):
        m = get_method(name)
        assert m.weigh(_params(name, {**IDENTITY[name], "lambda": 2.0}), views) == [1.0, 3.0]


def test_weigh_rejects_non_finite_and_zero_sum_weights() -> None:
    with pytest.raises(MetricError, match="c1"):
        get_method("ties").weigh(_params("ties", {}), _views(1.0, float("inf")))
    p = _params("task_arithmetic", {"normalize": True})
    with pytest.raises(MetricError, match="sum to 0"):
        get_method("task_arithmetic").weigh(p, _views(1.0, -1.0))


# --- METHODS.md goldens and hand-computed cases ------------------------------------------------

TIES_IN = [
    _t(0.5, -0.1, 0.3, 0.0, -0.4),
    _t(-0.2, 0.05, 0.4, 0.1, -0.3),
    _t(0.1, -0.3, -0.6, 0.02, 0.2),
]
TIES_OUT = _t(0.5, -0.3, -0.6, 0.0, -0.35)


def test_ties_golden() -> None:
    # w = 1, keep 2 of 5 (density 0.4).
    got = _merge("ties", {"density": 0.4}, TIES_IN)
    torch.testing.assert_close(got, TIES_OUT, rtol=0, atol=1e-7)


def test_ties_golden_with_a_base_and_lambda() -> None:
    base = _t(1.0, -2.0, 0.5, 3.0, 0.0)
    got = _merge("ties", {"density": 0.4, "lambda": 2.0}, [base + d for d in TIES_IN], base=base)
    torch.testing.assert_close(got, base + 2 * TIES_OUT, rtol=0, atol=1e-6)


def test_ties_elects_by_weighted_mass() -> None:
    # Unweighted (PEFT) would elect + and return 1.0; the mass 1·1 + 2·(−0.6) is negative.
    got = _merge("ties", {"density": 1.0}, [_t(1.0), _t(-0.6)], weights=[1.0, 2.0])
    torch.testing.assert_close(got, _t(-0.6))


def test_ties_disjoint_mean_is_weighted() -> None:
    got = _merge("ties", {"density": 1.0}, [_t(1.0), _t(3.0)], weights=[1.0, 3.0])
    torch.testing.assert_close(got, _t(2.5))  # (1·1 + 3·3) / (1 + 3)


def test_ties_zero_mass_takes_the_majority_sign() -> None:
    # Last element: +0.5 and −0.5 cancel; the tensor's elected signs are mostly +.
    a, b = _t(1.0, 1.0, 1.0, 0.5), _t(1.0, 1.0, 1.0, -0.5)
    torch.testing.assert_close(_merge("ties", {"density": 1.0}, [a, b]), _t(1, 1, 1, 0.5))
    torch.testing.assert_close(_merge("ties", {"density": 1.0}, [-a, -b]), -_t(1, 1, 1, 0.5))


def test_ties_negative_weight_negates() -> None:
    got = _merge("ties", {"density": 1.0}, [_t(1.0, -2.0)], weights=[-1.0])
    torch.testing.assert_close(got, _t(-1.0, 2.0))


def test_dare_drops_and_rescales_with_its_seeded_mask() -> None:
    # METHODS.md §6 with the method's own seeds: kept elements are δ/(1 − p), the rest 0.
    delta = _t(0.2, -0.4, 0.1, 0.3)
    got = _merge("dare_linear", {"drop_rate": 0.5, "seed": 1}, [delta], key="k")
    keep = oracle.dare_keep(sparsify.derive_seed(1, "k", 0), 4, 0.5)
    assert torch.equal(got, torch.where(keep, delta / 0.5, 0.0))


def test_task_arithmetic_by_hand() -> None:
    base = _t(1.0, 2.0)
    thetas = [_t(2.0, 2.0), _t(1.0, 4.0)]
    m = get_method("task_arithmetic")
    p = _params("task_arithmetic", {"lambda": 0.5})
    w = m.weigh(p, _views(1.0, 2.0))
    assert w == [0.5, 1.0]
    # 1 + 0.5·1 + 1·0 and 2 + 0.5·0 + 1·2
    torch.testing.assert_close(m.merge(thetas, w, p, base=base), _t(1.5, 4.0))
    # One model, λ = 1 → the model itself.
    theta = torch.randn(7, 5)
    b = torch.randn(7, 5)
    torch.testing.assert_close(m.merge([theta], [1.0], p, base=b), theta)


def test_magnitude_prune_by_hand() -> None:
    got = _merge("magnitude_prune", {"density": 0.4}, TIES_IN[:2], weights=[1.0, 2.0])
    # keep (0.5, −0.4) of δ_1 and (0.4, −0.3) of δ_2; then δ_1 + 2 δ_2
    torch.testing.assert_close(got, _t(0.5, 0.0, 0.8, 0.0, -1.0))


def test_breadcrumbs_band() -> None:
    x = torch.arange(1, 101, dtype=torch.float32) * torch.tensor([1.0, -1.0]).repeat(50)
    got = _merge("breadcrumbs", {"density": 0.5, "gamma": 0.1}, [x])
    kept = got.abs()[got != 0]
    # Ranks [10, 50) from the top: magnitudes 51..90.
    assert torch.equal(kept, torch.arange(51, 91, dtype=torch.float32))
    assert torch.equal(got[got != 0], x[50:90])


def test_breadcrumbs_keeps_at_least_one_without_outliers() -> None:
    got = _merge("breadcrumbs", {"density": 0.1, "gamma": 0.0}, [_t(3.0, 1.0, 2.0)])
    assert got.tolist() == [3.0, 0.0, 0.0]


def test_della_keep_probs_are_rank_linear() -> None:
    x = torch.tensor([[0.1, -0.3, 0.2], [5.0, 4.0, -6.0]])
    p = sparsify.della_keep_probs(x, 0.5, 0.1)
    torch.testing.assert_close(p, torch.tensor([[0.4, 0.6, 0.5], [0.5, 0.4, 0.6]]))
    # A vector is one row; one element has no spread.
    torch.testing.assert_close(sparsify.della_keep_probs(_t(2.0), 0.5, 0.1), _t(0.5))


def test_della_rescales_by_each_probability() -> None:
    delta, probs = _t(1.0, 2.0, 3.0), _t(0.5, 0.25, 0.0)
    got = sparsify.della_rescale(delta, torch.tensor([True, True, False]), probs)
    assert torch.equal(got, _t(2.0, 8.0, 0.0))


def test_keep_count_ignores_float_noise() -> None:
    assert sparsify.keep_count(0.3, 10) == 3  # 0.3·10 = 3.0000000000000004
    assert sparsify.keep_count(0.2, 5) == 1
    assert sparsify.keep_count(1e-9, 5) == 1
    assert sparsify.keep_count(1.0, 5) == 5
    assert sparsify.outlier_count(0.01, 99) == 0


# --- randomness: DARE and DELLA ------------------------------------------------------------------


def test_seed_is_a_stable_hash() -> None:
    # Pinned: Python's hash() would change per process (PYTHONHASHSEED).
    assert sparsify.derive_seed(0, "model.layers.0.q_proj.weight", 1) == 8397526441203903195
    assert sparsify.derive_seed(7, "x", 0) == 6899843359143394449


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della"])
def test_random_methods_are_reproducible_per_key(name: str) -> None:
    xs = [torch.randn(64, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    a = _merge(name, TYPICAL[name], xs, key="layers.0.w")
    b = _merge(name, TYPICAL[name], xs, key="layers.0.w")
    assert a.numpy().tobytes() == b.numpy().tobytes()
    other_key = _merge(name, TYPICAL[name], xs, key="layers.1.w")
    assert not torch.equal(a != 0, other_key != 0)
    other_seed = _merge(name, {**TYPICAL[name], "seed": 4}, xs, key="layers.0.w")
    assert not torch.equal(a != 0, other_seed != 0)


def test_dare_drops_a_fraction_p_and_rescales() -> None:
    x = torch.ones(100_000)
    got = _merge("dare_linear", {"drop_rate": 0.3}, [x], key="k")
    dropped = float((got == 0).float().mean())
    assert abs(dropped - 0.3) < 0.01
    kept = got[got != 0]
    assert torch.equal(kept, torch.full_like(kept, 1 / 0.7))


def test_della_keeps_its_mean_density() -> None:
    x = torch.randn(100, 1000, generator=torch.Generator().manual_seed(0))
    got = _merge("della", {"density": 0.4, "epsilon": 0.2}, [x], key="k")
    kept = got != 0
    assert abs(float(kept.float().mean()) - 0.4) < 0.01
    # Larger magnitudes are kept more often: top half of |x| ~0.5, bottom half ~0.3.
    big = x.abs() > x.abs().median(dim=1, keepdim=True).values
    assert float(kept[big].float().mean()) > float(kept[~big].float().mean()) + 0.15


# --- base vs deltas, dtypes, thresholds ----------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_base_none_is_the_delta_form(name: str) -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(16, 8, generator=g)
    thetas = [base + 0.1 * torch.randn(16, 8, generator=g) for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    with_base = _merge(name, TYPICAL[name], thetas, weights=weights, base=base, key="k")
    deltas = _merge(name, TYPICAL[name], [t - base for t in thetas], weights=weights, key="k")
    torch.testing.assert_close(with_base - base, deltas, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_bf16_inputs(name: str) -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(12, 6, generator=g).bfloat16()
    thetas = [(base.float() + torch.randn(12, 6, generator=g)).bfloat16() for _ in range(2)]
    got = _merge(name, TYPICAL[name], thetas, base=base, key="k")
    want = _merge(name, TYPICAL[name], [t.float() for t in thetas], base=base.float(), key="k")
    assert got.dtype == torch.float32
    assert torch.equal(got, want)
    as64 = _merge(name, TYPICAL[name], thetas, base=base, key="k", dtype=torch.float64)
    assert as64.dtype == torch.float64


@pytest.mark.parametrize("name", METHODS)
def test_inputs_are_not_modified(name: str) -> None:
    xs = [torch.randn(10, 10, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    copies = [x.clone() for x in xs]
    _merge(name, TYPICAL[name], xs, key="k")
    assert all(torch.equal(x, c) for x, c in zip(xs, copies, strict=True))


@pytest.mark.parametrize("name", TRIMMED)
def test_thresholds_equal_to_each_tensors_own_kth_value(name: str) -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(20, 9, generator=g)
    thetas = [base + torch.randn(20, 9, generator=g) for _ in range(3)]
    data = TYPICAL[name]
    k = sparsify.keep_count(data["density"], base.numel())
    ths = [float(sparsify.kth_largest_abs(t - base, k)) for t in thetas]
    per_tensor = _merge(name, data, thetas, base=base, weights=[1.0, 2.0, 0.5])
    given_ths = _merge(name, data, thetas, base=base, weights=[1.0, 2.0, 0.5], thresholds=ths)
    assert torch.equal(per_tensor, given_ths)
    # A zero threshold keeps everything (up to breadcrumbs' outliers).
    if name != "breadcrumbs":
        full = _merge(name, {**data, "density": 1.0}, thetas, base=base, weights=[1.0, 2.0, 0.5])
        zero = _merge(name, data, thetas, base=base, weights=[1.0, 2.0, 0.5], thresholds=[0.0] * 3)
        assert torch.equal(full, zero)


def test_trims_use_no_sort() -> None:
    for fn in (sparsify.kth_largest_abs, blocks.kth_largest_abs, blocks.merge, blocks._consensus):
        assert "sort" not in inspect.getsource(fn).replace("no sort", "")


# --- properties ----------------------------------------------------------------------------------

_finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
#: Dyadic values and integer weights: every sum is exact, so reordering cannot change a bit.
_dyadic = st.integers(-16, 16).map(lambda v: v / 4)


@st.composite
def _group(draw: st.DrawFn, elems: st.SearchStrategy[float], k_min: int = 1) -> Any:
    n = draw(st.integers(1, 12))
    k = draw(st.integers(k_min, 4))
    xs = [torch.tensor(draw(st.lists(elems, min_size=n, max_size=n))) for _ in range(k)]
    return xs


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(METHODS), xs=_group(_finite), with_base=st.booleans())
def test_identity_for_one_input_keeping_everything(
    name: str, xs: list[torch.Tensor], with_base: bool
) -> None:
    x = xs[0]
    if not with_base:
        assert torch.equal(_merge(name, IDENTITY[name], [x], key="k"), x)
        return
    base = torch.linspace(-5, 5, x.numel())
    got = _merge(name, IDENTITY[name], [x], base=base, key="k")
    torch.testing.assert_close(got, x, rtol=1e-6, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(("task_arithmetic", "ties", "magnitude_prune")),
    xs=_group(_dyadic, k_min=2),
    data=st.data(),
)
def test_permutation_invariance(name: str, xs: list[torch.Tensor], data: st.DataObject) -> None:
    ws = data.draw(st.lists(st.integers(0, 4).map(float), min_size=len(xs), max_size=len(xs)))
    perm = data.draw(st.permutations(range(len(xs))))
    a = _merge(name, TYPICAL[name], xs, weights=ws)
    b = _merge(name, TYPICAL[name], [xs[i] for i in perm], weights=[ws[i] for i in perm])
    assert torch.equal(a, b)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(METHODS), xs=_group(_finite, k_min=2), data=st.data())
def test_a_zero_weight_checkpoint_has_no_effect(
    name: str, xs: list[torch.Tensor], data: st.DataObject
) -> None:
    *rest, extra = xs
    ws = data.draw(st.lists(st.floats(0.1, 5.0), min_size=len(rest), max_size=len(rest)))
    # Random methods seed by checkpoint index: the extra one goes last so the others keep theirs.
    at = len(rest) if name not in DETERMINISTIC else data.draw(st.integers(0, len(rest)))
    with_zero = [*rest[:at], extra, *rest[at:]]
    w_zero = [*ws[:at], 0.0, *ws[at:]]
    a = _merge(name, TYPICAL[name], rest, weights=ws, key="k")
    b = _merge(name, TYPICAL[name], with_zero, weights=w_zero, key="k")
    assert torch.equal(a, b)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(METHODS), xs=_group(_finite), data=st.data())
def test_finite_inputs_give_finite_outputs(
    name: str, xs: list[torch.Tensor], data: st.DataObject
) -> None:
    ws = data.draw(st.lists(st.floats(-5.0, 5.0), min_size=len(xs), max_size=len(xs)))
    base = torch.tensor(
        data.draw(st.lists(_finite, min_size=xs[0].numel(), max_size=xs[0].numel()))
    )
    for b in (None, base):
        out = _merge(name, TYPICAL[name], xs, weights=ws, base=b, key="k")
        assert out.shape == xs[0].shape and bool(torch.isfinite(out).all())


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=300),
    st.data(),
)
def test_radix_select_equals_kthvalue(values: list[float], data: st.DataObject) -> None:
    from mwakit.methods.sparsify import kth_largest_abs

    x = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(1, x.numel()))
    want = torch.kthvalue(x.abs(), x.numel() - k + 1).values
    assert kth_largest_abs(x, k) == want
