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


@pytest.mark.parametrize("src", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("out_dt", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("threads", [1, 2])
def test_blocked_into_same_bits_as_whole_tensor_sum_then_cast(
    src: torch.dtype, dtype: torch.dtype, out_dt: torch.dtype, threads: int
) -> None:
    # Several blocks and a ragged last one (odd numel), signed zeros, extremes near the
    # output dtype's limits: every byte of weighted_sum(...).to(out) by blocks.
    from mwakit.methods.linear import BLOCK, weighted_sum_into

    g = torch.Generator().manual_seed(1)
    n = 2 * BLOCK + 12_345
    ts = [(torch.randn(n, generator=g) * 3).to(src) for _ in range(5)]
    ts[0][:4] = torch.tensor([0.0, -0.0, -0.0, 60000.0]).to(src)
    ts[2][:4] = torch.tensor([-0.0, -0.0, 0.0, 60000.0]).to(src)
    ws = [0.22, 0.21, -0.0, 0.19, 1e-3]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        want = weighted_sum(ts, ws, dtype=dtype).to(out_dt)
        out = torch.full((n,), 7.0, dtype=out_dt)
        got = weighted_sum_into(ts, ws, out, dtype=dtype)
    finally:
        torch.set_num_threads(before)
    assert got is out
    assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))


def test_blocked_into_all_zero_weights_and_tiny_shapes() -> None:
    from mwakit.methods.linear import weighted_sum_into

    ts = [torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(2, 3, dtype=torch.bfloat16)]
    out = torch.full((2, 3), 5.0, dtype=torch.bfloat16)
    weighted_sum_into(ts, [0.0, 0.0], out)
    assert torch.equal(out, torch.zeros(2, 3, dtype=torch.bfloat16))
    empty = torch.empty(0, 4)
    assert weighted_sum_into([empty], [1.0], torch.empty(0, 4)).shape == (0, 4)
