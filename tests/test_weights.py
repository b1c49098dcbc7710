"""MWA weights: METHODS.md §1 golden numbers, hand-computed transforms, and invariants."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mwakit.errors import MetricError
from mwakit.weights import metric_direction, mwa_weights, normalize

LOSSES = [1.0, 0.8, 0.5]
STEPS = [100.0, 200.0, 300.0]
NAMES = ["c1", "c2", "c3"]


def _w(values: list[float], p: float, higher: bool, transform: str = "power") -> list[float]:
    return mwa_weights(
        values,
        penalty=p,
        transform=transform,  # type: ignore[arg-type]
        higher_is_better=higher,
        names=[f"c{i}" for i in range(len(values))],
    )


# METHODS.md §1 worked example, every row.
@pytest.mark.parametrize(
    ("p", "loss_w", "step_w"),
    [
        (0.0, [1 / 3, 1 / 3, 1 / 3], [1 / 3, 1 / 3, 1 / 3]),
        (0.5, [0.283106, 0.316522, 0.400372], [0.241181, 0.341081, 0.417738]),
        (1.0, [4 / 17, 5 / 17, 8 / 17], [1 / 6, 1 / 3, 1 / 2]),
        (2.0, [16 / 105, 25 / 105, 64 / 105], [1 / 14, 4 / 14, 9 / 14]),
    ],
)
def test_methods_md_table(p: float, loss_w: list[float], step_w: list[float]) -> None:
    tol = 1e-6 if p == 0.5 else 1e-12
    assert _w(LOSSES, p, False) == pytest.approx(loss_w, abs=tol)
    assert _w(STEPS, p, True) == pytest.approx(step_w, abs=tol)


def test_merged_scalar() -> None:
    theta = [1.0, 2.0, 3.0]
    by_loss = sum(w * t for w, t in zip(_w(LOSSES, 1, False), theta, strict=True))
    by_step = sum(w * t for w, t in zip(_w(STEPS, 1, True), theta, strict=True))
    assert by_loss == pytest.approx(2.235294, abs=1e-6)
    assert by_step == pytest.approx(2.333333, abs=1e-6)


def test_softmax_transform_by_hand() -> None:
    # w ∝ exp(−p·m) for losses: p = 1 → exp(-1), exp(-0.8), exp(-0.5) normalised.
    e = [math.exp(-1.0), math.exp(-0.8), math.exp(-0.5)]
    assert _w(LOSSES, 1, False, "softmax") == pytest.approx([x / sum(e) for x in e], abs=1e-12)
    # Higher-is-better: w ∝ exp(p·m); p = 0.01 on steps → exp(1), exp(2), exp(3).
    e = [math.exp(1), math.exp(2), math.exp(3)]
    assert _w(STEPS, 0.01, True, "softmax") == pytest.approx([x / sum(e) for x in e], abs=1e-12)


def test_rank_transform_by_hand() -> None:
    # Ranks of losses (1.0, 0.8, 0.5) are (2, 1, 0); p = 0.5 → 0.25, 0.5, 1 over 1.75.
    assert _w(LOSSES, 0.5, False, "rank") == pytest.approx([1 / 7, 2 / 7, 4 / 7], abs=1e-12)
    # Ties share the better rank: (0.5, 0.5, 1.0) → ranks (0, 0, 2); p = 0.5 → 1, 1, 0.25.
    assert _w([0.5, 0.5, 1.0], 0.5, False, "rank") == pytest.approx([4 / 9, 4 / 9, 1 / 9])
    # p = 0 keeps only the best (0^0 = 1); rank works with negative metrics (rewards).
    assert _w([-1.0, -3.0, 2.0], 0.0, True, "rank") == [0.0, 0.0, 1.0]


def test_directions() -> None:
    assert metric_direction("loss", None) is False
    assert metric_direction("eval_loss", None) is False
    assert metric_direction("eval_gsm8k_loss", None) is False
    assert metric_direction("step", None) is True
    assert metric_direction("eval_accuracy", True) is True
    with pytest.raises(MetricError, match="higher_is_better"):
        metric_direction("eval_accuracy", None)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_metric_names_checkpoint(bad: float) -> None:
    with pytest.raises(MetricError) as exc:
        mwa_weights([1.0, bad, 0.5], penalty=1, higher_is_better=False, names=NAMES)
    assert exc.value.where == "c2"


def test_non_positive_metric_with_power_suggests_rank() -> None:
    with pytest.raises(MetricError) as exc:
        mwa_weights([1.0, 0.0, 0.5], penalty=1, higher_is_better=False, names=NAMES)
    assert exc.value.where == "c2" and "transform: rank" in (exc.value.fix or "")


def test_negative_penalty_and_rank_above_one() -> None:
    with pytest.raises(MetricError, match="penalty"):
        mwa_weights(LOSSES, penalty=-0.1, higher_is_better=False, names=NAMES)
    with pytest.raises(MetricError, match=r"must be in \[0, 1\]"):
        mwa_weights(LOSSES, penalty=2, transform="rank", higher_is_better=False, names=NAMES)


def test_normalize() -> None:
    assert normalize([1, 2, 3], NAMES) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    with pytest.raises(MetricError, match="sum to 0"):
        normalize([1, -1, 0], NAMES)
    with pytest.raises(MetricError) as exc:
        normalize([1, math.nan, 0], NAMES)
    assert exc.value.where == "c2"


metrics = st.lists(st.floats(0.01, 100.0), min_size=1, max_size=12)
penalties = st.floats(0.0, 20.0)
transforms = st.sampled_from(["power", "softmax", "rank"])


def _p(p: float, transform: str) -> float:
    # rank takes a decay in [0, 1]; map the drawn penalty into it.
    return p / 20.0 if transform == "rank" else p


@settings(max_examples=200, deadline=None)
@given(metrics, penalties, transforms, st.booleans())
def test_weights_are_a_distribution(
    values: list[float], p: float, transform: str, higher: bool
) -> None:
    w = _w(values, _p(p, transform), higher, transform)
    assert all(x >= 0 for x in w)
    assert math.fsum(w) == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(metrics, st.sampled_from(["power", "softmax"]), st.booleans())
def test_p_zero_is_uniform(values: list[float], transform: str, higher: bool) -> None:
    assert _w(values, 0.0, higher, transform) == pytest.approx([1 / len(values)] * len(values))


@settings(max_examples=200, deadline=None)
@given(metrics, penalties, transforms, st.booleans())
def test_monotone_in_the_metric(
    values: list[float], p: float, transform: str, higher: bool
) -> None:
    w = _w(values, _p(p, transform), higher, transform)
    for i in range(len(values)):
        for j in range(len(values)):
            better = values[i] > values[j] if higher else values[i] < values[j]
            if better:
                assert w[i] >= w[j] - 1e-15


@settings(max_examples=100, deadline=None)
@given(metrics, penalties, transforms, st.randoms(use_true_random=False))
def test_permutation_invariant(values: list[float], p: float, transform: str, rnd) -> None:  # type: ignore[no-untyped-def]
    perm = list(range(len(values)))
    rnd.shuffle(perm)
    w = _w(values, _p(p, transform), False, transform)
    wp = _w([values[i] for i in perm], _p(p, transform), False, transform)
    assert wp == pytest.approx([w[i] for i in perm], abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.floats(0.01, 100), penalties, transforms)
def test_single_checkpoint_is_identity(v: float, p: float, transform: str) -> None:
    assert _w([v], _p(p, transform), False, transform) == [1.0]


@settings(max_examples=100, deadline=None)
@given(metrics, penalties, st.floats(0.01, 100.0))
def test_power_is_scale_invariant(values: list[float], p: float, c: float) -> None:
    a = _w(values, p, False)
    b = _w([c * v for v in values], p, False)
    assert b == pytest.approx(a, abs=1e-9)


def test_huge_penalty_selects_best_without_overflow() -> None:
    assert _w(LOSSES, 1e6, False) == pytest.approx([0.0, 0.0, 1.0])
    assert _w(STEPS, 1e6, True, "softmax") == pytest.approx([0.0, 0.0, 1.0])
