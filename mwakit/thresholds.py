"""Whole-model magnitude thresholds for ``trim_scope: model`` (TIES as in the paper).

The paper keeps the top ``density`` fraction of each task vector over the whole model, not per
tensor. The k-th largest |δ_i| over every tensor is found exactly in two streaming passes,
without holding the model or sorting anything: for non-negative float32 values the order of
the values is the order of their bit patterns, so pass 1 counts the top 16 bits of each |δ|
(32,768 buckets, `bincount`) to find the bucket holding the k-th largest, and pass 2 counts the
low 16 bits of the values in that bucket, which pins the exact value.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from mwakit.lowrank import dense_delta
from mwakit.methods.blocks import compute_dtype
from mwakit.methods.sparsify import keep_count
from mwakit.planner import FullTask, LoraTask, Plan

if TYPE_CHECKING:
    from mwakit.execute import _Loader


def _deltas(plan: Plan, ld: _Loader, dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
    """(checkpoint index, |δ| as float32) for every trimmed tensor, one at a time."""
    for task in plan.tasks:
        if isinstance(task, FullTask):
            if task.copy:
                continue
            base = ld.get([task.base])[0].to(dtype) if task.base is not None else None
            for r, t in zip(task.inputs, ld.get(task.inputs), strict=True):
                d = t.to(dtype) - base if base is not None else t.to(dtype)
                yield r.ckpt, d.abs().float().reshape(-1)
        elif task.dense:
            for i, (a, b) in enumerate(zip(ld.get(task.a), ld.get(task.b), strict=True)):
                d = dense_delta(a.to(dtype), b.to(dtype), task.scalings[i])
                yield i, d.abs().float().reshape(-1)


def _kth_bucket(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """(bucket holding the k-th largest, how many larger values lie in higher buckets)."""
    above = torch.flip(torch.cumsum(torch.flip(counts, [0]), 0), [0])  # count in buckets ≥ b
    b = int(torch.nonzero(above >= k).max())
    higher = int(above[b + 1]) if b + 1 < len(above) else 0
    return b, higher


def model_thresholds(plan: Plan, ld: _Loader, dtype: torch.dtype) -> dict[str, list[float]]:
    """Per-checkpoint thresholds: |δ_i| ≥ t_i keeps the top ``density`` of checkpoint i.

    Returns:
        The same per-checkpoint list for every trimmed task name.
    """
    # δ is computed as the trims compute it (half precision is computed in float32), so a
    # threshold equal to an element compares exactly.
    dtype = compute_dtype(dtype)
    density = float(getattr(plan.params, "density", 1.0))
    n = len(plan.checkpoints)
    hi = [torch.zeros(1 << 16, dtype=torch.int64) for _ in range(n)]
    total = [0] * n
    for i, d in _deltas(plan, ld, dtype):
        bits = d.view(torch.int32)
        hi[i] += torch.bincount((bits >> 16).to(torch.int64), minlength=1 << 16)
        total[i] += d.numel()
    ks = [max(1, keep_count(density, t)) for t in total]
    buckets = [_kth_bucket(h, k) for h, k in zip(hi, ks, strict=True)]
    lo = [torch.zeros(1 << 16, dtype=torch.int64) for _ in range(n)]
    for i, d in _deltas(plan, ld, dtype):
        bits = d.view(torch.int32)
        sel = bits[(bits >> 16) == buckets[i][0]]
        lo[i] += torch.bincount((sel & 0xFFFF).to(torch.int64), minlength=1 << 16)
    out = []
    for i in range(n):
        b_hi, higher = buckets[i]
        b_lo, _ = _kth_bucket(lo[i], ks[i] - higher)
        pattern = torch.tensor([(b_hi << 16) | b_lo], dtype=torch.int32)
        out.append(float(pattern.view(torch.float32)))
    trimmed = [
        t.name
        for t in plan.tasks
        if (isinstance(t, FullTask) and not t.copy) or (isinstance(t, LoraTask) and t.dense)
    ]
    return dict.fromkeys(trimmed, out)
