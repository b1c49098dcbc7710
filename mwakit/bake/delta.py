"""W' for one base tensor, computed the way PEFT's ``merge_and_unload`` computes it.

ΔW is formed from the factors in float32 (float64 for a float64 base), one module at a time:
forming out×in is unavoidable since W itself is dense, but it never outlives its tensor. The
order of operations follows PEFT's (``(B @ A) * s``; an embedding's ΔW rounded to the base
dtype before the add; DoRA's norm of W + ΔW along PEFT's axis), so a float32 bake is the same
bytes as PEFT's merged model and a bf16 one differs by at most one rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mwakit.bake.adapter import AdapterTensor, ModuleDelta, value


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _conv_fn(dim: int) -> Any:
    return {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[dim]


def delta_weight(d: ModuleDelta, like: torch.Tensor) -> torch.Tensor:
    """ΔW = s·B·A of one module, shaped like its base tensor, in float32 (float64).

    Mirrors PEFT's ``get_delta_weight`` of Linear, Embedding and ConvNd (factors cast up
    first, the product, then the scaling).
    """
    acc = _acc(like.dtype)
    a = value(d.a).to(device=like.device, dtype=acc)
    b = value(d.b).to(device=like.device, dtype=acc)
    if d.kind == "embedding":
        return (b @ a).T * d.scaling
    if d.kind == "linear":
        out = (b @ a).mul_(d.scaling)  # in place: (B @ A) * s, without a second out×in
        return out.T if d.fan_in_fan_out else out
    if tuple(like.shape[2:4]) == (1, 1):
        # PEFT's 1×1 path: a plain matrix product of the squeezed factors.
        out = (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        return out * d.scaling
    conv = _conv_fn(like.dim())
    res: torch.Tensor = conv(a.transpose(0, 1), b)
    return res.transpose(0, 1) * d.scaling


def _dora(d: ModuleDelta, w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """m ⊙ (W + ΔW) / ‖W + ΔW‖, the norm along PEFT's axis, not yet rounded."""
    assert d.magnitude is not None
    mag = value(d.magnitude).to(device=w.device, dtype=delta.dtype)
    if d.kind == "linear":
        # Row norms of the (out, in) weight: one per output feature.
        wt = w.T if d.fan_in_fan_out else w
        dt = delta.T if d.fan_in_fan_out else delta
        norm = torch.linalg.norm(wt + dt, dim=1)
        factor = (mag / norm).view(-1, 1)
        return (factor.T if d.fan_in_fan_out else factor) * (w + delta)
    if d.kind == "embedding":
        # PEFT norms the (dim, vocab) transpose by rows: one norm per embedding dimension.
        norm = torch.linalg.norm((w + delta).T, dim=1)
        return (mag / norm).view(1, -1) * (w + delta)
    # Conv: the norm over every dim but the output channel, as (1, out, 1, ...) like PEFT's.
    weight = w + delta
    dims = tuple(range(1, weight.dim()))
    norm = weight.norm(p=2, dim=dims, keepdim=True).transpose(1, 0)
    factor = (mag / norm).view((-1,) + (1,) * (weight.dim() - 1))
    return factor * (w + delta)


_BLOCK_BYTES = 4 << 20  # a float32 block of ΔW rows that stays in cache
_MIN_ROWS = 16  # a one-row product is a matrix-vector call, rounded otherwise: never that


def _linear_blocked(w: torch.Tensor, d: ModuleDelta) -> torch.Tensor:
    """W + s·B·A of a linear LoRA (DoRA: m ⊙ (W + ΔW) / ‖W + ΔW‖), rows at a time, rounded to
    W's dtype.

    The same values as PEFT's ``W + (B @ A) * s``: each row of B @ A is the same dot products
    whatever the rows around it (blocks keep at least `_MIN_ROWS` rows), and a power-of-two
    s ≥ 1 is folded into A exactly. A block lives in cache through the add and the rounding,
    so the out×in float32 ΔW never goes to memory.
    """
    acc = _acc(w.dtype)
    a = value(d.a).to(device=w.device, dtype=acc)
    b = value(d.b).to(device=w.device, dtype=acc)
    s = d.scaling
    fold = s >= 1.0 and math.frexp(s)[0] == 0.5  # s = 2^k, k ≥ 0: a·s is exact
    if fold and s != 1.0:
        a = a * s
    n = int(w.shape[0])
    rows = max(_MIN_ROWS, _BLOCK_BYTES // (4 * max(1, int(w.shape[1]))))
    starts = list(range(0, n, rows))
    if len(starts) > 1 and n - starts[-1] < _MIN_ROWS:
        starts.pop()  # a short tail joins the block before it
    # DoRA's norm is per output row: a block of rows holds whole rows, so it normalises here.
    mag = None if d.magnitude is None else value(d.magnitude).to(device=w.device, dtype=acc)
    out = torch.empty_like(w)
    for k, e in zip(starts, [*starts[1:], n], strict=True):
        blk = b[k:e] @ a
        if not fold:
            blk.mul_(s)
        blk.add_(w[k:e])  # W + ΔW, rows k … e − 1
        if mag is not None:
            blk.mul_((mag[k:e] / torch.linalg.norm(blk, dim=1)).view(-1, 1))
        out[k:e].copy_(blk)
    return out


def bake_weight(w: torch.Tensor, deltas: Sequence[ModuleDelta]) -> torch.Tensor:
    """The merged weight W' (in W's dtype): every module's update applied in turn, as PEFT
    applies them (each result rounded to W's dtype before the next)."""
    if len(deltas) == 1 and _plain_linear(deltas[0], w):
        return _linear_blocked(w, deltas[0])
    for d in deltas:
        delta = delta_weight(d, w)
        if d.magnitude is not None:
            w = _dora(d, w, delta).to(w.dtype)
        elif d.kind == "embedding":
            # PEFT rounds an embedding's ΔW to the base dtype before adding it.
            w = w + delta.to(w.dtype)
        else:
            # ΔW + W in place (addition commutes exactly): one float32 out×in, not two.
            w = delta.add_(w).to(w.dtype)
        del delta
    return w


def _plain_linear(d: ModuleDelta, w: torch.Tensor) -> bool:
    return (
        d.kind == "linear"
        and not d.fan_in_fan_out
        and w.dim() == 2
        and int(w.shape[0]) >= _MIN_ROWS
    )


def bake_bias(bias: torch.Tensor, lora_bias: AdapterTensor, scaling: float) -> torch.Tensor:
    """b' = b + s·b_B (``lora_bias``), in b's dtype."""
    acc = _acc(bias.dtype)
    b = value(lora_bias).to(device=bias.device, dtype=acc)
    return (bias.to(acc) + b * scaling).to(bias.dtype)
