"""execute.all_finite: the one-pass sum check agrees with isfinite(t).all() on every case."""

from __future__ import annotations

import math

import pytest
import torch

from mwakit.execute import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "values",
    [
        [1.0, -2.0, 3.5],
        [math.nan, 1.0],
        [math.inf, 1.0],
        [-math.inf, 1.0],
        [math.inf, -math.inf],  # the sum is NaN, not a cancellation to 0
        [0.0, -0.0],
    ],
)
def test_agrees_with_isfinite(dtype: torch.dtype, values: list[float]) -> None:
    t = torch.tensor(values * 50, dtype=dtype)
    assert all_finite(t) == bool(torch.isfinite(t).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_sum_that_overflows_is_still_finite(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype).max
    t = torch.full((1000,), big, dtype=dtype)  # every value finite, their sum is not
    assert not math.isfinite(float(t.sum()))
    assert all_finite(t)


def test_integers_and_empty_tensors_are_finite() -> None:
    assert all_finite(torch.arange(10))
    assert all_finite(torch.empty(0))
    assert not all_finite(torch.tensor([1.0, math.nan], dtype=torch.float8_e4m3fn).float())
