"""Every registered method leaves its inputs bit for bit as they were.

Tune keeps the checkpoints' tensors in memory across candidates (`mwakit.io.cache`) and hands
the same tensors to every merge: one method writing into an input would corrupt every later
candidate. So, for every method in the registry, with and without a base, in bfloat16 and
float32, and with the side inputs (Fishers, thresholds) the executor passes: the inputs'
bytes after the merge equal a copy taken before (compared as bytes: ``torch.equal`` takes
−0.0 for 0.0 and NaN for nothing). The executor paths are checked end to end in
tests/test_execute_inputs_unchanged.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import mwakit.methods  # noqa: F401  (registers every method)
from mwakit.methods.registry import _REGISTRY, MergeMethod

SHAPE = (12, 10)
#: Params variants beyond the defaults that take other code paths (and, for every method
#: with a ``trim_scope``, whole-model thresholds).
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "fisher": [{"normalize_fisher": True}],
    "linear": [{"normalize": False}],
}


def _variants(m: MergeMethod) -> list[dict[str, Any]]:
    extra = [{"trim_scope": "model"}] if "trim_scope" in m.params.model_fields else []
    return [{}, *VARIANTS.get(m.name, []), *extra]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8).clone()


def _tensor(seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(SHAPE, generator=g)
    t[0, :3] = torch.tensor([0.0, -0.0, 1e-30])  # signed zeros and a denormal-ish value
    return t.to(dtype)


def _cases() -> list[Any]:
    out = []
    for name, m in _REGISTRY.items():
        lo, hi = m.inputs
        counts = sorted({lo, max(lo, min(3, hi if hi is not None else 3))})  # 1: fast paths
        for n in counts:
            for params in _variants(m):
                for dtype in (torch.float32, torch.bfloat16):
                    for with_base in (False, True):
                        tag = f"{name}-n{n}-{params or 'defaults'}-{str(dtype)[6:]}"
                        tag += "-base" if with_base else ""
                        out.append(pytest.param(m, n, params, dtype, with_base, id=tag))
    return out


def _params(m: MergeMethod, raw: dict[str, Any]) -> Any:
    try:
        return m.params(**raw)
    except Exception:  # a variant this method's params do not take
        pytest.skip(f"{m.name} has no params {raw}")


@pytest.mark.parametrize(("method", "n", "raw", "dtype", "with_base"), _cases())
def test_merge_never_writes_into_its_inputs(
    method: MergeMethod, n: int, raw: dict[str, Any], dtype: torch.dtype, with_base: bool
) -> None:
    params = _params(method, raw)
    tensors = [_tensor(i + 1, dtype) for i in range(n)]
    base = _tensor(99, dtype) if with_base else None
    weights = [0.5 + 0.25 * i for i in range(n)]
    extra: dict[str, Any] = {}
    if method.name == "fisher":
        extra["fishers"] = [_tensor(50 + i, dtype).abs() for i in range(n)]
        extra["fisher_norms"] = [2.0 + i for i in range(n)]
    if getattr(params, "trim_scope", "tensor") == "model":
        extra["thresholds"] = [0.3] * n
    inputs = tensors + ([base] if base is not None else []) + list(extra.get("fishers", []))
    before = [_bytes(t) for t in inputs]
    out = method.merge(tensors, weights, params, base=base, dtype=dtype, key="layer.w", **extra)
    assert out.shape == SHAPE
    for i, (t, b) in enumerate(zip(inputs, before, strict=True)):
        assert torch.equal(_bytes(t), b), f"{method.name} wrote into input {i}"
    # The result is memory of its own: writing into it changes no input either.
    out.view(-1)[0:1].fill_(123.0)
    for i, (t, b) in enumerate(zip(inputs, before, strict=True)):
        assert torch.equal(_bytes(t), b), f"{method.name}'s result shares input {i}'s memory"
