"""The linear kernel widens narrow inputs through a reused buffer: bit for bit what a
mixed-dtype ``add_`` into the float32 (float64) accumulator gives, signed zeros included."""

from __future__ import annotations

import pytest
import torch

from mwakit.methods.linear import weighted_sum


@pytest.mark.parametrize("src", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_same_bits_as_a_promoting_add(src: torch.dtype, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(257, 33, generator=g).to(src) for _ in range(4)]
    ts[1][0, :5] = torch.tensor([0.0, -0.0, 0.0, -0.0, 1.0]).to(src)
    ws = [0.3, -0.7, 0.0, 1.25]
    before = [t.clone() for t in ts]
    acc_dt = torch.float64 if dtype == torch.float64 else torch.float32
    want = torch.zeros(ts[0].shape, dtype=acc_dt)
    for t, w in zip(ts, ws, strict=True):
        if w:
            want.add_(t, alpha=w)
    got = weighted_sum(ts, ws, dtype=dtype)
    assert got.dtype == dtype
    assert torch.equal(got.view(torch.uint8), want.to(dtype).view(torch.uint8))
    # Inputs untouched, bit for bit (torch.equal alone would take -0.0 for 0.0).
    for t, b in zip(ts, before, strict=True):
        assert torch.equal(t.view(torch.uint8), b.view(torch.uint8))
