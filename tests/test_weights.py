"""MWA weights: METHODS.md §1 golden numbers, hand-computed transforms, errors and invariants."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mwakit.errors import MetricError
from mwakit.weights import (
    Transform,
    metric_direction,
    mwa_weights,
    normalize,
    step_zero_warnings,
)

LOSSES = [1.0, 0.8, 0.5]
STEPS = [100.0, 200.0, 300.0]
NAMES = ["checkpoint-100", "checkpoint-200", "checkpoint-300"]
TRANSFORMS: tuple[Transform, ...] = ("power", "softmax", "rank")


def _w(
    values: Sequence[float], p: float, higher: bool, transform: Transform = "power"
) -> list[float]:
    return mwa_weights(
        values,
        penalty=p,
        transform=transform,
        higher_is_better=higher,
        names=[f"checkpoint-{i}" for i in range(len(values))],
    )


# --- golden numbers ----------------------------------------------------------------------------


# METHODS.md §1 worked example, every row, for loss (lower is better) and step (higher is better).
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
    assert _w(LOSSES, p, False) == pytest.approx(loss_w, abs=1e-6)
    assert _w(STEPS, p, True) == pytest.approx(step_w, abs=1e-6)


@pytest.mark.parametrize(
    ("p", "loss_w", "step_w"),
    [
        (0.0, [1 / 3, 1 / 3, 1 / 3], [1 / 3, 1 / 3, 1 / 3]),
        # q = 1/m = (1, 1.25, 2) → ×4: (4, 5, 8)/17; q = m: (1, 2, 3)/6.
        (1.0, [4 / 17, 5 / 17, 8 / 17], [1 / 6, 2 / 6, 3 / 6]),
        # q² = (1, 1.5625, 4) → ×16: (16, 25, 64)/105; m²: (1, 4, 9)/14.
        (2.0, [16 / 105, 25 / 105, 64 / 105], [1 / 14, 4 / 14, 9 / 14]),
    ],
)
def test_methods_md_exact_fractions(p: float, loss_w: list[float], step_w: list[float]) -> None:
    assert _w(LOSSES, p, False) == pytest.approx(loss_w, rel=0, abs=1e-14)
    assert _w(STEPS, p, True) == pytest.approx(step_w, rel=0, abs=1e-14)


def test_merged_scalar() -> None:
    # θ = (1, 2, 3), p = 1: (4 + 10 + 24)/17 = 38/17 by loss; (1 + 4 + 9)/6 = 14/6 by step.
    theta = [1.0, 2.0, 3.0]
    by_loss = math.fsum(w * t for w, t in zip(_w(LOSSES, 1, False), theta, strict=True))
    by_step = math.fsum(w * t for w, t in zip(_w(STEPS, 1, True), theta, strict=True))
    assert by_loss == pytest.approx(2.235294, abs=1e-6)
    assert by_step == pytest.approx(2.333333, abs=1e-6)
    assert by_loss == pytest.approx(38 / 17, abs=1e-14)
    assert by_step == pytest.approx(14 / 6, abs=1e-14)


def test_softmax_transform_by_hand() -> None:
    # Losses (1.0, 0.8, 0.5), p = 1: w ∝ exp(−m) = (0.36787944, 0.44932896, 0.60653066),
    # Σ = 1.42373907 → (0.25838965, 0.31559783, 0.42601251).
    assert _w(LOSSES, 1, False, "softmax") == pytest.approx(
        [0.25838965, 0.31559783, 0.42601251], abs=1e-8
    )
    # p = 2: exp(−2m) = (0.13533528, 0.20189652, 0.36787944), Σ = 0.70511124
    # → (0.19193466, 0.28633286, 0.52173249).
    assert _w(LOSSES, 2, False, "softmax") == pytest.approx(
        [0.19193466, 0.28633286, 0.52173249], abs=1e-8
    )
    # Steps (100, 200, 300), higher is better, p = 0.01: w ∝ exp(0.01·m) = (e, e², e³), i.e.
    # (1, e, e²)/(1 + e + e²) = (0.09003057, 0.24472847, 0.66524096).
    assert _w(STEPS, 0.01, True, "softmax") == pytest.approx(
        [0.09003057, 0.24472847, 0.66524096], abs=1e-8
    )
    # Unlike power, softmax takes metrics ≤ 0 (e.g. rewards): (−1, 0, 1), p = ln 2 → (1, 2, 4)/7.
    assert _w([-1.0, 0.0, 1.0], math.log(2), True, "softmax") == pytest.approx(
        [1 / 7, 2 / 7, 4 / 7], abs=1e-14
    )


def test_rank_transform_by_hand() -> None:
    # Ranks of losses (1.0, 0.8, 0.5) are (2, 1, 0); p = 0.5 → (0.25, 0.5, 1)/1.75 = (1, 2, 4)/7.
    assert _w(LOSSES, 0.5, False, "rank") == pytest.approx([1 / 7, 2 / 7, 4 / 7], abs=1e-14)
    # Same ranks for steps, higher is better: (2, 1, 0) reversed → (4, 2, 1)/7 read backwards.
    assert _w(STEPS, 0.5, True, "rank") == pytest.approx([1 / 7, 2 / 7, 4 / 7], abs=1e-14)
    # Competition ranking: (0.5, 0.5, 1.0) → ranks (0, 0, 2); p = 0.5 → (1, 1, 0.25)/2.25.
    assert _w([0.5, 0.5, 1.0], 0.5, False, "rank") == pytest.approx(
        [4 / 9, 4 / 9, 1 / 9], abs=1e-14
    )
    # p = 0 keeps only the best (0^0 = 1); rank takes negative metrics (rewards).
    assert _w([-1.0, -3.0, 2.0], 0.0, True, "rank") == [0.0, 0.0, 1.0]
    # p = 1 is uniform.
    assert _w(LOSSES, 1.0, False, "rank") == pytest.approx([1 / 3] * 3, abs=1e-14)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_equal_metrics_are_uniform(transform: Transform) -> None:
    assert _w([0.7] * 4, 0.5, False, transform) == [0.25] * 4


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_single_checkpoint_gets_everything(transform: Transform) -> None:
    assert _w([0.42], 0.5, False, transform) == [1.0]


# --- step 0 ------------------------------------------------------------------------------------


def test_step_zero_gets_weight_zero_with_power() -> None:
    # METHODS.md §1: q = m = 0 for step 0, so q^p = 0 for p > 0; p = 0 is still uniform (0^0 = 1).
    assert _w([0.0, 100.0, 200.0], 1.0, True) == pytest.approx([0.0, 1 / 3, 2 / 3], abs=1e-14)
    assert _w([0.0, 100.0, 200.0], 0.0, True) == pytest.approx([1 / 3] * 3, abs=1e-14)


def test_all_steps_zero_is_an_error() -> None:
    with pytest.raises(MetricError, match="every checkpoint has metric 0") as exc:
        mwa_weights([0.0, 0.0], penalty=1, higher_is_better=True, names=["a", "b"])
    assert "transform: rank" in (exc.value.fix or "")


def test_step_zero_warnings() -> None:
    warnings = step_zero_warnings(["checkpoint-0", "checkpoint-10"], [0.0, 10.0], 1.0)
    assert warnings == ["checkpoint-0: step 0 gets weight 0 (a step-0 LoRA has B = 0)"]
    assert step_zero_warnings(["checkpoint-0"], [0.0], 0.0) == []
    assert step_zero_warnings(["checkpoint-5"], [5.0], 1.0) == []
    soft = step_zero_warnings(["checkpoint-0"], [0.0], 1.0, transform="softmax")
    assert len(soft) == 1 and "small weight" in soft[0] and "B = 0" in soft[0]


# --- directions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "higher"),
    [
        ("loss", False),
        ("train_loss", False),
        ("eval_loss", False),
        ("eval_gsm8k_loss", False),
        ("aux_loss", False),
        ("step", True),
    ],
)
def test_known_directions(metric: str, higher: bool) -> None:
    assert metric_direction(metric, None) is higher


def test_explicit_direction_wins() -> None:
    assert metric_direction("eval_accuracy", True) is True
    assert metric_direction("loss", True) is True
    assert metric_direction("step", False) is False


def test_unknown_direction_is_an_error() -> None:
    with pytest.raises(MetricError, match="'eval_accuracy' has no known direction") as exc:
        metric_direction("eval_accuracy", None)
    assert exc.value.fix == "set higher_is_better: true|false in params"


# --- errors name the checkpoint ----------------------------------------------------------------


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_metric_names_checkpoint(bad: float, transform: Transform) -> None:
    with pytest.raises(MetricError) as exc:
        mwa_weights(
            [1.0, bad, 0.5], penalty=1, transform=transform, higher_is_better=False, names=NAMES
        )
    assert exc.value.where == "checkpoint-200"
    assert "checkpoint-200" in str(exc.value) and "not a finite number" in str(exc.value)


def test_non_finite_metric_of_a_single_checkpoint_is_still_an_error() -> None:
    with pytest.raises(MetricError, match="checkpoint-100"):
        mwa_weights([math.nan], penalty=1, higher_is_better=False, names=NAMES[:1])


@pytest.mark.parametrize(("value", "higher"), [(0.0, False), (-0.5, False), (-2.0, True)])
def test_non_positive_metric_with_power_suggests_rank(value: float, higher: bool) -> None:
    with pytest.raises(MetricError) as exc:
        mwa_weights([1.0, value, 0.5], penalty=1, higher_is_better=higher, names=NAMES)
    assert exc.value.where == "checkpoint-200" and "checkpoint-200" in str(exc.value)
    assert "transform: rank" in (exc.value.fix or "")


@pytest.mark.parametrize("penalty", [-0.1, math.nan, math.inf])
def test_bad_penalty(penalty: float) -> None:
    with pytest.raises(MetricError, match="penalty must be a finite number") as exc:
        mwa_weights(LOSSES, penalty=penalty, higher_is_better=False, names=NAMES)
    assert exc.value.where == "params.penalty"


def test_rank_penalty_above_one() -> None:
    # p > 1 would favour the worst checkpoint; the decay per rank must be in [0, 1].
    with pytest.raises(MetricError, match=r"must be in \[0, 1\]"):
        mwa_weights(LOSSES, penalty=2, transform="rank", higher_is_better=False, names=NAMES)


def test_no_values_and_mismatched_names() -> None:
    with pytest.raises(MetricError, match="no checkpoints"):
        mwa_weights([], penalty=1, higher_is_better=False, names=[])
    with pytest.raises(ValueError, match="names"):
        mwa_weights(LOSSES, penalty=1, higher_is_better=False, names=NAMES[:2])


def test_normalize() -> None:
    assert normalize([1.0, 2.0, 3.0], NAMES) == pytest.approx([1 / 6, 2 / 6, 3 / 6], abs=1e-15)
    assert normalize([2.0, -1.0, 1.0], NAMES) == pytest.approx([1.0, -0.5, 0.5], abs=1e-15)
    with pytest.raises(MetricError, match="sum to 0") as exc:
        normalize([1.0, -1.0, 0.0], NAMES)
    assert "normalize: false" in (exc.value.fix or "")
    with pytest.raises(MetricError, match="sum to inf"):
        normalize([1e308, 1e308, 0.0], NAMES)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_normalize_non_finite_names_checkpoint(bad: float) -> None:
    with pytest.raises(MetricError) as exc:
        normalize([1.0, bad, 0.0], NAMES)
    assert exc.value.where == "checkpoint-200" and "checkpoint-200" in str(exc.value)


# --- properties --------------------------------------------------------------------------------

metrics = st.lists(st.floats(0.01, 100.0), min_size=1, max_size=12)
penalties = st.floats(0.0, 20.0)
transforms = st.sampled_from(TRANSFORMS)


def _p(p: float, transform: Transform) -> float:
    # rank takes a decay in [0, 1]; map the drawn penalty into it.
    return p / 20.0 if transform == "rank" else p


@settings(max_examples=200, deadline=None)
@given(metrics, penalties, transforms, st.booleans())
def test_weights_are_a_distribution(
    values: list[float], p: float, transform: Transform, higher: bool
) -> None:
    w = _w(values, _p(p, transform), higher, transform)
    assert len(w) == len(values)
    assert all(x >= 0 for x in w)
    assert abs(math.fsum(w) - 1.0) <= 1e-12


@settings(max_examples=100, deadline=None)
@given(metrics, st.sampled_from(["power", "softmax"]), st.booleans())
def test_p_zero_is_uniform(values: list[float], transform: Transform, higher: bool) -> None:
    assert _w(values, 0.0, higher, transform) == pytest.approx(
        [1 / len(values)] * len(values), abs=1e-15
    )


@settings(max_examples=200, deadline=None)
@given(metrics, penalties, transforms, st.booleans())
def test_monotone_in_the_metric(
    values: list[float], p: float, transform: Transform, higher: bool
) -> None:
    w = _w(values, _p(p, transform), higher, transform)
    for i in range(len(values)):
        for j in range(len(values)):
            better = values[i] > values[j] if higher else values[i] < values[j]
            if better:
                assert w[i] >= w[j]
            if values[i] == values[j]:
                assert w[i] == w[j]


@settings(max_examples=100, deadline=None)
@given(metrics, penalties, transforms, st.booleans(), st.randoms(use_true_random=False))
def test_permutation_invariant(
    values: list[float], p: float, transform: Transform, higher: bool, rnd: random.Random
) -> None:
    perm = list(range(len(values)))
    rnd.shuffle(perm)
    w = _w(values, _p(p, transform), higher, transform)
    wp = _w([values[i] for i in perm], _p(p, transform), higher, transform)
    assert wp == pytest.approx([w[i] for i in perm], abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.floats(-100.0, 100.0), penalties, transforms, st.booleans())
def test_single_checkpoint_is_identity(
    v: float, p: float, transform: Transform, higher: bool
) -> None:
    assert _w([v], _p(p, transform), higher, transform) == [1.0]


@settings(max_examples=100, deadline=None)
@given(metrics, penalties, st.floats(0.01, 100.0), st.booleans())
def test_power_is_scale_invariant(values: list[float], p: float, c: float, higher: bool) -> None:
    # q^p / Σ q^p: a common factor c^p (or c^-p) cancels.
    a = _w(values, p, higher)
    b = _w([c * v for v in values], p, higher)
    assert b == pytest.approx(a, abs=1e-9)


@pytest.mark.parametrize("p", [1e6, 1e300])
@pytest.mark.parametrize("transform", ["power", "softmax"])
def test_huge_penalty_selects_best_without_overflow(p: float, transform: Transform) -> None:
    assert _w(LOSSES, p, False, transform) == [0.0, 0.0, 1.0]
    assert _w(STEPS, p, True, transform) == [0.0, 0.0, 1.0]
    # Ties for the best share the weight.
    assert _w([0.5, 0.9, 0.5], p, False, transform) == [0.5, 0.0, 0.5]


@settings(max_examples=100, deadline=None)
@given(
    # Metrics on a grid so the best beats the runner-up by a margin p = 1e6 can resolve.
    st.lists(st.integers(1, 100).map(float), min_size=1, max_size=12),
    st.sampled_from(["power", "softmax"]),
    st.booleans(),
)
def test_huge_penalty_selects_best_property(
    values: list[float], transform: Transform, higher: bool
) -> None:
    w = _w(values, 1e6, higher, transform)
    best = max(values) if higher else min(values)
    assert all(math.isfinite(x) for x in w)
    assert math.fsum(x for x, v in zip(w, values, strict=True) if v == best) == pytest.approx(1.0)
