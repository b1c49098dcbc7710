"""The row-blocked W + s·B·A equals PEFT's ``weight.data += (B @ A) * s`` bit for bit, at the
shapes of a real model (TinyLlama's MLP and attention), for folded and unfolded scalings."""

from __future__ import annotations

import math

import pytest
import torch

from mwakit.bake.adapter import ModuleDelta
from mwakit.bake.delta import bake_weight


@pytest.mark.parametrize("scaling", [2.0, 1.0, 16 / math.sqrt(8), 0.5])
@pytest.mark.parametrize(
    ("out", "inner", "dtype"),
    [
        (5632, 2048, torch.bfloat16),  # gate/up
        (2048, 5632, torch.bfloat16),  # down
        (256, 2048, torch.float32),  # k/v (GQA)
        (17, 64, torch.float32),  # a short tail joins the block before it
    ],
)
def test_blocked_equals_peft(scaling: float, out: int, inner: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(out + inner)
    w = (0.02 * torch.randn(out, inner, generator=g)).to(dtype)
    a = 0.01 * torch.randn(16, inner, generator=g)
    b = 0.01 * torch.randn(out, 16, generator=g)
    ref = w.clone()
    ref.data += (b @ a) * scaling  # PEFT's Linear.merge with a float32 adapter
    got = bake_weight(w, [ModuleDelta("m", "linear", a, b, scaling)])
    assert got.dtype == dtype and torch.equal(got, ref)
    assert not torch.equal(got, w)


@pytest.mark.parametrize("scaling", [2.0, 16 / math.sqrt(8)])
@pytest.mark.parametrize(("out", "inner"), [(5632, 2048), (2048, 5632), (17, 64)])
def test_blocked_dora_equals_peft(scaling: float, out: int, inner: int) -> None:
    g = torch.Generator().manual_seed(out * 3 + inner)
    w = (0.02 * torch.randn(out, inner, generator=g)).to(torch.bfloat16)
    a = 0.01 * torch.randn(16, inner, generator=g)
    b = 0.01 * torch.randn(out, 16, generator=g)
    m = 1.0 + torch.rand(out, generator=g)
    # PEFT's DoraLinearVariant.merge_unsafe, with get_weight_norm(scaling=1).
    delta = (b @ a) * scaling
    weight = w + 1 * delta
    norm = torch.linalg.norm(weight, dim=1).to(weight.dtype)
    ref = ((m / norm).view(-1, 1) * (w.data + delta)).to(w.dtype)
    got = bake_weight(w, [ModuleDelta("m", "linear", a, b, scaling, m)])
    assert torch.equal(got, ref)
