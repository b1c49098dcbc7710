"""The methods mergekit 0.1.5 added: karcher, multislerp, nuslerp, sce, della_linear,
breadcrumbs_ties, nearswap, passthrough.

Hand-worked goldens (the worked examples in each method's docstring), parity against
independent float64 numpy implementations written from mergekit's published formulas
(docs/merge_methods.md), and hypothesis properties.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mwakit.errors import MetricError
from mwakit.methods import get_method, sparsify
from mwakit.methods.registry import CheckpointView
from tests.methods import oracle

NEW = (
    "karcher",
    "multislerp",
    "nuslerp",
    "sce",
    "della_linear",
    "breadcrumbs_ties",
    "nearswap",
    "passthrough",
)


def T(*xs: Any) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def _views(*weights: float | None) -> list[CheckpointView]:
    return [CheckpointView(f"c{i}", {}, w) for i, w in enumerate(weights)]


def _merge(
    name: str,
    tensors: list[torch.Tensor],
    params: dict[str, Any] | None = None,
    weights: list[float | None] | None = None,
    **kw: Any,
) -> torch.Tensor:
    m = get_method(name)
    p = m.params.model_validate(params or {})
    ws = m.weigh(p, _views(*(weights or [None] * len(tensors))))
    return m.merge(tensors, ws, p, key=kw.pop("key", "k"), **kw)


# ---------------------------------------------------------------------------------------------
# Registration


@pytest.mark.parametrize("name", NEW)
def test_registered_with_documented_params(name: str) -> None:
    m = get_method(name)
    assert m.summary and m.formula and m.reference
    assert m.spaces == ("delta", "full"), "each works on adapters (ΔW) and full models"
    with pytest.raises(ValidationError):
        m.params.model_validate({"no_such_key": 1})
    for field, info in m.params.model_fields.items():
        assert info.description, f"{name}.{field} has no attribute docstring"
    module = {"della_linear": "della", "breadcrumbs_ties": "breadcrumbs"}.get(name, name)
    doc = importlib.import_module(f"mwakit.methods.{module}").__doc__ or ""
    assert "differ" in doc and "Formula" in doc, f"{name}: docstring lacks formula/differences"


def test_registry_flags() -> None:
    assert get_method("nuslerp").inputs == get_method("nearswap").inputs == (2, 2)
    assert get_method("passthrough").inputs == (1, 1) and get_method("passthrough").linear
    for name in ("karcher", "multislerp", "nuslerp"):
        m = get_method(name)
        assert m.uses_base and not m.needs_base
    for name in ("sce", "della_linear", "breadcrumbs_ties"):
        assert get_method(name).needs_base


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("karcher", {"max_iter": 0}),
        ("karcher", {"tol": 0}),
        ("multislerp", {"eps": -1}),
        ("nuslerp", {"eps": 1.0}),
        ("sce", {"select_topk": 0}),
        ("sce", {"select_topk": 1.5}),
        ("della_linear", {"density": 0.9, "epsilon": 0.2}),
        ("breadcrumbs_ties", {"density": 0.1, "gamma": 0.2}),
        ("nearswap", {"t": -0.1}),
        ("passthrough", {"scale": float("inf")}),
        ("passthrough", {"rest_from": -1}),
    ],
)
def test_bad_params(name: str, params: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        get_method(name).params.model_validate(params)


def test_spherical_weights_must_be_nonnegative() -> None:
    for name in ("karcher", "multislerp", "nuslerp"):
        m = get_method(name)
        with pytest.raises(MetricError, match="≥ 0"):
            m.weigh(m.params(), _views(1.0, -1.0))
        with pytest.raises(MetricError, match="every weight is 0"):
            m.weigh(m.params(), _views(0.0, 0.0))
    m = get_method("nuslerp")
    assert m.weigh(m.params(), _views(1.0, 3.0)) == [0.25, 0.75]


# ---------------------------------------------------------------------------------------------
# Goldens (the docstrings' worked examples)


def test_karcher_golden_mean_angle_times_mean_norm() -> None:
    got = _merge("karcher", [T(1.0, 0.0), T(2.0, 0.0), T(0.0, 3.0)])
    torch.testing.assert_close(got, T(math.sqrt(3.0), 1.0), rtol=1e-6, atol=1e-6)


def test_karcher_with_a_base_averages_task_vectors() -> None:
    base = T(1.0, 1.0)
    got = _merge("karcher", [T(2.0, 1.0), T(3.0, 1.0), T(1.0, 4.0)], base=base)
    torch.testing.assert_close(got, base + T(math.sqrt(3.0), 1.0), rtol=1e-6, atol=1e-6)


def test_karcher_zero_point_lowers_the_norm_only() -> None:
    got = _merge("karcher", [T(3.0, 0.0), T(0.0, 0.0)])
    torch.testing.assert_close(got, T(1.5, 0.0))
    assert torch.equal(_merge("karcher", [T(0.0, 0.0), T(0.0, 0.0)]), T(0.0, 0.0))


def test_multislerp_golden() -> None:
    got = _merge("multislerp", [T(1.0, 0.0), T(0.0, 2.0)], weights=[0.75, 0.25])
    a = math.pi / 8  # 22.5°
    torch.testing.assert_close(got, T(1.25 * math.cos(a), 1.25 * math.sin(a)))


def test_multislerp_unnormalised_weights_scale_the_norm() -> None:
    got = _merge(
        "multislerp", [T(2.0, 0.0), T(2.0, 0.0)], {"normalize_weights": False}, weights=[1, 1]
    )
    torch.testing.assert_close(got, T(4.0, 0.0))


def test_nuslerp_goldens() -> None:
    a, b = T(1.0, 0.0, 1.0, 0.0), T(0.0, 1.0, 1.0, 0.0)
    r3 = 1 / math.sqrt(3.0)
    torch.testing.assert_close(_merge("nuslerp", [a, b]), T(r3, r3, 2 * r3, 0.0))
    a2, b2 = T([1.0, 0.0], [1.0, 0.0]), T([0.0, 1.0], [1.0, 0.0])
    r2 = 1 / math.sqrt(2.0)
    rows = _merge("nuslerp", [a2, b2], {"flatten": False, "row_wise": True})
    torch.testing.assert_close(rows, T([r2, r2], [1.0, 0.0]))
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    cols = _merge("nuslerp", [a2, b2], {"flatten": False})
    torch.testing.assert_close(cols, T([c, 0.5], [2 * c, 0.0]))


def test_nuslerp_t_from_weights_and_exact_ends() -> None:
    a, b = T(1.0, 2.0), T(-3.0, 0.5)
    assert torch.equal(_merge("nuslerp", [a, b], weights=[1.0, 0.0]), a)
    assert torch.equal(_merge("nuslerp", [a, b], weights=[0.0, 2.0]), b)
    base = T(0.5, 0.5)
    got = _merge("nuslerp", [a, b], weights=[1.0, 0.0], base=base)
    torch.testing.assert_close(got, a)


def test_sce_golden() -> None:
    d = [T(1.0, 3.0, 0.0, -1.0), T(1.0, -2.0, 1.0, -3.0), T(1.0, 0.0, -1.0, 2.0)]
    got = _merge("sce", d, {"select_topk": 0.5})
    torch.testing.assert_close(got, T(0.0, 3.0, 0.0, -49.0 / 23.0))
    base = T(1.0, 1.0, 1.0, 1.0)
    with_base = _merge("sce", [x + base for x in d], {"select_topk": 0.5, "lambda": 2}, base=base)
    torch.testing.assert_close(with_base, base + 2 * T(0.0, 3.0, 0.0, -49.0 / 23.0))


def test_sce_all_zero_task_vectors_give_the_base() -> None:
    base = T(1.0, 2.0)
    assert torch.equal(_merge("sce", [base.clone(), base.clone()], base=base), base)


def test_breadcrumbs_ties_golden() -> None:
    d1, d2 = T(0.5, -0.1, 0.3, 0.2, -0.4), T(-0.2, 0.05, 0.4, 0.1, -0.3)
    got = _merge("breadcrumbs_ties", [d1, d2], {"density": 0.8, "gamma": 0.2})
    torch.testing.assert_close(got, T(-0.2, 0.0, 0.3, 0.15, -0.35))


def test_della_linear_matches_the_seeded_masks() -> None:
    # ε = 0: every element is kept with p = density and doubled; the masks are the documented
    # SplitMix64 uniforms u < p for seed derive_seed(seed, key, i).
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(64, generator=g) for _ in range(3)]
    params = {"density": 0.5, "epsilon": 0.0, "lambda": 0.5, "seed": 7}
    got = _merge("della_linear", xs, params, weights=[1.0, 2.0, 1.0], key="w")
    dropped = []
    for i, x in enumerate(xs):
        u = sparsify.seeded_uniform(x.shape, sparsify.derive_seed(7, "w", i), x.device)
        dropped.append(torch.where(u < 0.5, x.double() / 0.5, 0.0))
    want = sum(0.5 * w * d for d, w in zip(dropped, [1.0, 2.0, 1.0], strict=True))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    # The same draws as della: della_linear is della's drop without the election.
    della = get_method("della")
    p = della.params.model_validate({k: v for k, v in params.items() if k != "lambda"})
    want_ties = oracle.ties_consensus(dropped, [1.0, 2.0, 1.0])
    got_ties = della.merge(xs, [1.0, 2.0, 1.0], p, key="w")
    torch.testing.assert_close(got_ties.double(), want_ties, rtol=1e-6, atol=1e-6)


def test_della_linear_normalize_divides_by_the_weights() -> None:
    x = T(1.0, -2.0, 3.0)
    got = _merge("della_linear", [x, x], {"density": 1.0, "epsilon": 0.0, "normalize": True})
    torch.testing.assert_close(got, x)


def test_nearswap_golden_and_ends() -> None:
    a, b = T(0.0, 0.0, 1.0, 2.0), T(0.5, 0.05, 1.0, -2.0)
    torch.testing.assert_close(_merge("nearswap", [a, b], {"t": 0.1}), T(0.1, 0.05, 1.0, 1.9))
    assert torch.equal(_merge("nearswap", [a, b], {"t": 0.0}), a)
    assert torch.equal(_merge("nearswap", [a, b], {"t": 100.0}), b)


def test_passthrough_scales() -> None:
    assert torch.equal(_merge("passthrough", [T(1.0, -2.0)], {"scale": 0.5}), T(0.5, -1.0))


@pytest.mark.parametrize("name", ["nuslerp", "nearswap"])
def test_two_input_methods_refuse_other_counts_and_shapes(name: str) -> None:
    m = get_method(name)
    with pytest.raises(ValueError, match="exactly 2"):
        m.merge([T(1.0)], [1.0], m.params())
    with pytest.raises(ValueError, match="equal shapes"):
        m.merge([T(1.0), T(1.0, 2.0)], [0.5, 0.5], m.params())


def test_bf16_inputs_compute_in_float32() -> None:
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 8, generator=g) for _ in range(3)]
    base = torch.randn(4, 8, generator=g)
    for name, ts, kw in [
        ("karcher", xs, {}),
        ("multislerp", xs, {"base": base}),
        ("nuslerp", xs[:2], {"base": base}),
        ("sce", xs, {"base": base}),
        ("nearswap", xs[:2], {}),
    ]:
        bf = [t.bfloat16() for t in ts]
        kwb = {"base": kw["base"].bfloat16()} if kw else {}
        got = _merge(name, bf, **kwb)
        want = _merge(
            name, [t.float() for t in bf], **({"base": kwb["base"].float()} if kw else {})
        )
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, want, msg=name)


# ---------------------------------------------------------------------------------------------
# Parity with mergekit's published formulas (independent numpy float64 implementations)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x)


def mk_karcher(points: list[np.ndarray], max_iter: int, tol: float) -> np.ndarray:
    """Karcher mean on the sphere (equal weights, as mergekit), times the mean norm."""
    norms = [np.linalg.norm(p) for p in points]
    u = [p / n for p, n in zip(points, norms, strict=True)]
    m = _unit(np.mean(u, axis=0))
    for _ in range(max_iter):
        logs = []
        for x in u:
            c = float(np.clip(m @ x, -1.0, 1.0))
            th = math.acos(c)
            logs.append(np.zeros_like(m) if th < 1e-12 else th / math.sin(th) * (x - c * m))
        g = np.mean(logs, axis=0)
        gn = np.linalg.norm(g)
        if gn < tol:
            break
        m = _unit(math.cos(gn) * m + math.sin(gn) * g / gn)
    return m * float(np.mean(norms))


def mk_multislerp(points: list[np.ndarray], w: np.ndarray) -> np.ndarray:
    """docs: project onto the tangent space at the weighted Euclidean mean, interpolate,
    project back; scaled by the weighted mean norm."""
    w = w / w.sum()
    norms = np.array([np.linalg.norm(p) for p in points])
    u = np.stack([p / n for p, n in zip(points, norms, strict=True)])
    m = _unit((w[:, None] * u).sum(0))
    c = np.clip(u @ m, -1.0, 1.0)
    th = np.arccos(c)
    fac = np.where(th < 1e-12, 1.0, th / np.sin(np.maximum(th, 1e-300)))
    tangent = (w[:, None] * fac[:, None] * (u - c[:, None] * m)).sum(0)
    tn = np.linalg.norm(tangent)
    out = m if tn == 0 else math.cos(tn) * m + math.sin(tn) * tangent / tn
    return out * float(w @ norms)


def mk_slerp(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    dot = float(np.clip(_unit(v0) @ _unit(v1), -1.0, 1.0))
    om = math.acos(dot)
    return (math.sin((1 - t) * om) * v0 + math.sin(t * om) * v1) / math.sin(om)


def mk_nuslerp(
    a: np.ndarray, b: np.ndarray, w1: float, w2: float, base: np.ndarray, row_wise: bool
) -> np.ndarray:
    """docs: t = w2/(w1+w2); SLERP of the task vectors, row by row or column by column."""
    t = w2 / (w1 + w2)
    da, db = a - base, b - base
    if row_wise:
        out = np.stack([mk_slerp(t, x, y) for x, y in zip(da, db, strict=True)])
    else:
        out = np.stack([mk_slerp(t, x, y) for x, y in zip(da.T, db.T, strict=True)]).T
    return base + out


def mk_nearswap(base: np.ndarray, sec: np.ndarray, t: float) -> np.ndarray:
    """docs: weight = (t / |base − secondary|).clamp(0, 1); weight·secondary + (1−weight)·base."""
    with np.errstate(divide="ignore"):
        w = np.clip(t / np.abs(base - sec), 0.0, 1.0)
    return w * sec + (1 - w) * base


def _consensus(deltas: np.ndarray, w: np.ndarray) -> np.ndarray:
    """TIES election on the weighted sum, weighted mean of the agreeing values."""
    weighted = w[:, None] * deltas
    sign = np.sign(weighted.sum(0))
    agree = (np.sign(deltas) == sign) & (deltas != 0)
    num = (weighted * agree).sum(0)
    den = (w[:, None] * agree).sum(0)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def mk_sce(tensors: list[np.ndarray], base: np.ndarray, topk: float) -> np.ndarray:
    """docs: variance mask (top select_topk fraction), weights from the mean of squares
    normalised across models, TIES sign consensus, divide by the applied weights."""
    tv = np.stack([t - base for t in tensors])
    var = tv.var(axis=0)
    k = math.ceil(topk * var.size)
    thr = np.sort(var)[::-1][k - 1]
    tv = tv * (var >= thr)
    sq = (tv**2).mean(axis=1)
    return base + _consensus(tv, sq / sq.sum())


def mk_breadcrumbs_ties(
    tensors: list[np.ndarray], base: np.ndarray, density: float, gamma: float
) -> np.ndarray:
    """docs: prune the top gamma fraction and the bottom 1 − density − gamma of |δ|
    (mergekit's density: the kept fraction), then TIES consensus."""
    out = []
    for t in tensors:
        d = t - base
        order = np.argsort(-np.abs(d), kind="stable")
        n = d.size
        top, bottom = round(gamma * n), round(max(0.0, 1 - density - gamma) * n)
        keep = np.zeros(n, dtype=bool)
        keep[order[top : n - bottom]] = True
        out.append(np.where(keep, d, 0.0))
    return base + _consensus(np.stack(out), np.ones(len(tensors)))


def _rand(seed: int, *shape: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(4)]


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.astype(np.float32))


def test_karcher_parity_with_mergekit_formula_and_stationarity() -> None:
    pts = [p + 0.8 for p in _rand(0, 300)]  # a common offset keeps them on one hemisphere
    want = mk_karcher([p.astype(np.float32).astype(np.float64) for p in pts], 200, 1e-13)
    got = _merge("karcher", [_t(p) for p in pts], {"max_iter": 100, "tol": 1e-9})
    np.testing.assert_allclose(got.double().numpy(), want, rtol=2e-5, atol=2e-6)
    # First-order optimality at the result: the weighted tangent mean vanishes.
    m = _unit(got.double().numpy())
    g = np.mean(
        [
            math.acos(min(1, m @ _unit(p)))
            / max(math.sin(math.acos(min(1, m @ _unit(p)))), 1e-300)
            * (_unit(p) - (m @ _unit(p)) * m)
            for p in pts
        ],
        axis=0,
    )
    assert np.linalg.norm(g) < 1e-5


def test_multislerp_parity_with_mergekit_formula() -> None:
    pts = _rand(1, 50, 6)
    base = np.random.default_rng(9).standard_normal((50, 6))
    w = np.array([1.0, 2.0, 0.5, 3.0])
    want = base + mk_multislerp([(p - base).reshape(-1) for p in pts], w).reshape(50, 6)
    got = _merge("multislerp", [_t(p) for p in pts], weights=list(w), base=_t(base))
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("row_wise", [True, False])
def test_nuslerp_parity_with_mergekit_formula(row_wise: bool) -> None:
    a, b, base, _ = _rand(2, 12, 7)
    want = mk_nuslerp(a, b, 1.0, 3.0, base, row_wise)
    got = _merge(
        "nuslerp",
        [_t(a), _t(b)],
        {"flatten": False, "row_wise": row_wise},
        weights=[1.0, 3.0],
        base=_t(base),
    )
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-4, atol=1e-5)


def test_nearswap_parity_with_mergekit_formula() -> None:
    a, b, _, _ = _rand(3, 200)
    b = a + 0.01 * b  # mostly close: every branch of the clamp is met
    want = mk_nearswap(a, b, 0.005)
    got = _merge("nearswap", [_t(a), _t(b)], {"t": 0.005})
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6)


def test_sce_parity_with_mergekit_formula() -> None:
    xs = _rand(4, 400)
    base = np.random.default_rng(5).standard_normal(400)
    xs32 = [x.astype(np.float32).astype(np.float64) for x in xs]
    b32 = base.astype(np.float32).astype(np.float64)
    want = mk_sce(xs32, b32, 0.3)
    got = _merge("sce", [_t(x) for x in xs], {"select_topk": 0.3}, base=_t(base))
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-4, atol=1e-5)


def test_breadcrumbs_ties_parity_with_mergekit_formula() -> None:
    # mergekit density d (kept fraction) = mwakit density d + gamma (the band's start).
    xs = _rand(6, 500)
    base = np.zeros(500)
    want = mk_breadcrumbs_ties(xs, base, density=0.7, gamma=0.1)
    got = _merge("breadcrumbs_ties", [_t(x) for x in xs], {"density": 0.8, "gamma": 0.1})
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Properties

_f = st.floats(-10, 10, allow_nan=False, allow_subnormal=False, width=32)


@st.composite
def _points(draw: st.DrawFn, min_n: int = 1, max_n: int = 4) -> dict[str, Any]:
    n = draw(st.integers(min_n, max_n))
    size = draw(st.integers(2, 6))
    vals = [draw(st.lists(_f, min_size=size, max_size=size)) for _ in range(n)]
    w = draw(st.lists(st.floats(0.1, 10), min_size=n, max_size=n))
    return {
        "xs": [torch.tensor(v) for v in vals],
        "w": w,
        "perm": draw(st.permutations(range(n))),
    }


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    scale = max(1.0, float(b.abs().max()))
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale)


@settings(max_examples=40, deadline=None)
@given(_points(min_n=1, max_n=1), st.integers(1, 3))
def test_karcher_of_identical_points_is_the_point(g: dict[str, Any], k: int) -> None:
    x = g["xs"][0]
    for name in ("karcher", "multislerp"):
        _close(_merge(name, [x] * k), x)


@settings(max_examples=40, deadline=None)
@given(_points(min_n=2))
def test_spherical_means_are_permutation_invariant(g: dict[str, Any]) -> None:
    perm = g["perm"]
    for name, params in [("karcher", {}), ("multislerp", {})]:
        a = _merge(name, g["xs"], params, weights=g["w"])
        b = _merge(name, [g["xs"][i] for i in perm], params, weights=[g["w"][i] for i in perm])
        assert torch.isfinite(a).all()
        _close(a, b, 1e-3)


@settings(max_examples=40, deadline=None)
@given(_points(min_n=2, max_n=2), st.floats(0.01, 0.99))
def test_multislerp_and_nuslerp_of_two_equal_norm_points_are_slerp(
    g: dict[str, Any], t: float
) -> None:
    a, b = g["xs"]
    na, nb = float(a.norm()), float(b.norm())
    if na < 1e-3 or nb < 1e-3:
        return
    b = b * (na / nb)  # equal norms: slerp's norm is then the lerp of the norms too
    # Antipodal points have no unique great circle: each method's tie-break is its own.
    assume(float(torch.dot(a.flatten(), b.flatten())) / (na * na) > -0.999)
    slerp = get_method("slerp")
    want = slerp.merge([a, b], [1 - t, t], slerp.params(t=t))
    _close(_merge("multislerp", [a, b], weights=[1 - t, t]), want, 1e-3)
    _close(_merge("nuslerp", [a, b], weights=[1 - t, t]), want, 1e-3)


@settings(max_examples=60, deadline=None)
@given(_points(min_n=2, max_n=2), st.floats(0.0, 5.0))
def test_nearswap_moves_each_element_by_at_most_t(g: dict[str, Any], t: float) -> None:
    a, b = g["xs"]
    got = _merge("nearswap", [a, b], {"t": t})
    step = (got - a).abs()
    want = torch.minimum((b - a).abs(), torch.tensor(t))
    _close(step, want, 1e-5)


@settings(max_examples=40, deadline=None)
@given(_points(min_n=2), st.sampled_from([0.25, 0.5, 1.0]))
def test_sce_is_permutation_invariant(g: dict[str, Any], topk: float) -> None:
    perm = g["perm"]
    base = torch.linspace(-1, 1, g["xs"][0].numel())
    p = {"select_topk": topk}
    a = _merge("sce", g["xs"], p, weights=g["w"], base=base)
    b = _merge("sce", [g["xs"][i] for i in perm], p, weights=[g["w"][i] for i in perm], base=base)
    _close(a, b, 1e-4)


@settings(max_examples=40, deadline=None)
@given(_points(min_n=1, max_n=1))
def test_one_checkpoint_comes_back(g: dict[str, Any]) -> None:
    x = g["xs"][0]
    base = torch.linspace(-1, 1, x.numel())
    _close(_merge("sce", [x], {"select_topk": 0.5}, base=base), x)
    _close(_merge("breadcrumbs_ties", [x], {"density": 1.0, "gamma": 0.0}, base=base), x)
    _close(_merge("della_linear", [x], {"density": 1.0, "epsilon": 0.0}, base=base), x)
    _close(_merge("karcher", [x], base=base), x)
    assert torch.equal(_merge("passthrough", [x]), x)


@settings(max_examples=30, deadline=None)
@given(_points(min_n=2))
def test_breadcrumbs_ties_without_a_band_is_ties(g: dict[str, Any]) -> None:
    a = _merge("breadcrumbs_ties", g["xs"], {"density": 1.0, "gamma": 0.0}, weights=g["w"])
    b = _merge("ties", g["xs"], {"density": 1.0}, weights=g["w"])
    assert torch.equal(a, b)


def test_float64_dots_over_chunks() -> None:
    from mwakit.methods import sphere

    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(600_000, generator=g), torch.randn(600_000, generator=g)
    want = float(a.double() @ b.double())
    assert sphere.dot64(a, b) == pytest.approx(want, rel=1e-12)
    assert sphere.norm64(a) == pytest.approx(float(a.double().norm()), rel=1e-12)
    # Nearly parallel float32 vectors keep their cosine's digits (1 − cos ≈ 1e-9).
    c = a + 3e-5 * b
    cos = sphere.dot64(a, c) / (sphere.norm64(a) * sphere.norm64(c))
    want_cos = float(a.double() @ c.double()) / float(a.double().norm() * c.double().norm())
    assert 1 - cos == pytest.approx(1 - want_cos, rel=1e-6)
