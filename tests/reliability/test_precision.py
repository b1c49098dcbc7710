"""Precision: sums accumulate in float32 whatever the compute dtype, SLERP and Model Stock take
norms and dot products in float64. Parity against a float64 reference computed here.

With bfloat16 inputs, ``dtype: bfloat16`` and a bfloat16 output, the merged tensor must be the
correctly rounded float64 result in at least 99.8 % of elements and within 1 ulp everywhere
(inputs whose sums do not cancel to nearly 0; where they do, an ulp of the result is far below
the rounding of the terms). Before this, bf16 accumulation left 25-50 % of elements off by
up to thousands of ulps near zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import mwakit
from mwakit.execute import execute
from mwakit.planner import Plan
from mwakit.recipe import parse_recipe

from .inputs import adapter, full_model

SHAPE = (256, 256)
F64 = torch.float64


def _ordered(t: torch.Tensor) -> torch.Tensor:
    # bfloat16 bit patterns as integers that count ulps across zero.
    bits = t.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def _assert_rounded(out: torch.Tensor, ref: torch.Tensor, terms: list[torch.Tensor]) -> float:
    """Share of elements equal to the correctly rounded reference (≥ 99.8 %); every element
    within 1 ulp, unless the terms cancel: there the error is that of float32 sums of the
    terms (|error| ≤ 2^-21 Σ|terms|), which no working precision short of exact avoids."""
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    rounded = ref.to(torch.bfloat16)
    ulps = (_ordered(out) - _ordered(rounded)).abs()
    exact = float((ulps == 0).double().mean())
    assert exact >= 0.998, exact
    scale = sum((t.abs() for t in terms), torch.zeros_like(ref))
    cancel = (out.to(F64) - ref).abs() <= 2.0**-21 * scale
    assert bool(((ulps <= 1) | cancel).all()), int(ulps[~cancel].max())
    assert float(cancel[ulps > 1].double().sum()) <= 1e-3 * ulps.numel()
    return exact


def _merge(tmp: Path, data: dict[str, Any]) -> tuple[dict[str, torch.Tensor], Plan]:
    r = parse_recipe({"output": str(tmp / "out"), "device": "cpu", **data})
    plan = mwakit.plan(r)
    out = tmp / "written"
    out.mkdir()
    name = "model.safetensors" if plan.kind == "full" else "adapter_model.safetensors"
    execute(plan, out)
    return load_file(out / name), plan


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A bf16 base and three fine-tunes sharing a direction (so Model Stock's t is not 0)."""
    root = tmp_path_factory.mktemp("bf16")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(SHAPE, generator=g, dtype=F64)
    shared = 0.3 * torch.randn(SHAPE, generator=g, dtype=F64)
    xs = [base + shared + 0.3 * torch.randn(SHAPE, generator=g, dtype=F64) for _ in range(3)]
    folders = [full_model(root / f"m{i}", {"w": x.to(torch.bfloat16)}) for i, x in enumerate(xs)]
    return full_model(root / "base", {"w": base.to(torch.bfloat16)}), folders


def _weights(p: Plan) -> list[float]:
    return list(p.weights)


def _linear(xs: list[torch.Tensor], b: torch.Tensor, p: Plan) -> torch.Tensor:
    return sum((w * x for w, x in zip(_weights(p), xs, strict=True)), torch.zeros_like(b))


def _task_arithmetic(xs: list[torch.Tensor], b: torch.Tensor, p: Plan) -> torch.Tensor:
    return b + sum((w * (x - b) for w, x in zip(_weights(p), xs, strict=True)), torch.zeros_like(b))


def _slerp(xs: list[torch.Tensor], b: torch.Tensor, p: Plan, t: float = 0.3) -> torch.Tensor:
    x, y = xs[0].reshape(-1), xs[1].reshape(-1)
    omega = math.acos(float(x @ y / (x.norm() * y.norm())))
    return (math.sin((1 - t) * omega) * xs[0] + math.sin(t * omega) * xs[1]) / math.sin(omega)


def _model_stock(xs: list[torch.Tensor], b: torch.Tensor, p: Plan) -> torch.Tensor:
    ds = [(x - b).reshape(-1) for x in xs]
    cos = [float(ds[i] @ ds[j] / (ds[i].norm() * ds[j].norm())) for i in range(3) for j in range(i)]
    c = sum(cos) / len(cos)
    assert 0 < c < 1
    t = 3 * c / (1 + 2 * c)
    return b + t * _linear([x - b for x in xs], b, p)


Reference = Callable[[list[torch.Tensor], torch.Tensor, Plan], torch.Tensor]
CASES: dict[str, tuple[dict[str, Any], Reference, int]] = {
    "linear": ({"method": "linear", "weights": (0.2, 0.3, 0.5)}, _linear, 3),
    "mwa": ({"method": "mwa", "params": {"penalty": 1.0}, "losses": (0.9, 0.7, 0.4)}, _linear, 3),
    "task_arithmetic": (
        {"method": "task_arithmetic", "params": {"lambda": 0.7}, "base": True},
        _task_arithmetic,
        3,
    ),
    "slerp": ({"method": "slerp", "params": {"t": 0.3}}, _slerp, 2),
    "model_stock": ({"method": "model_stock", "base": True}, _model_stock, 3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bf16_full_models_round_like_float64(
    case: str, models: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    spec, reference, n = CASES[case]
    base, folders = models
    spec = dict(spec)
    weights, losses = spec.pop("weights", None), spec.pop("losses", None)
    cks: list[Any] = [str(f) for f in folders[:n]]
    if weights:
        cks = [{"path": c, "weight": w} for c, w in zip(cks, weights, strict=True)]
    if losses:
        cks = [{"path": c, "metrics": {"loss": m}} for c, m in zip(cks, losses, strict=True)]
    data = {**spec, "checkpoints": cks, "dtype": "bfloat16"}
    if data.pop("base", False):
        data["base_model"] = str(base)
    out, plan = _merge(tmp_path, data)
    xs = [load_file(f / "model.safetensors")["w"].to(F64) for f in folders[:n]]
    b = load_file(base / "model.safetensors")["w"].to(F64)
    _assert_rounded(out["w"], reference(xs, b, plan), [*xs, b])


@pytest.mark.parametrize("space", ["factors", "concat"])
def test_bf16_adapters_round_like_float64(space: str, tmp_path: Path) -> None:
    alphas = (8, 4, 16)  # different scalings: factor averaging folds s_i / s_out into B
    folders = [
        adapter(tmp_path / f"a{i}", seed=i, dim=512, dtype=torch.bfloat16, config={"lora_alpha": a})
        for i, a in enumerate(alphas)
    ]
    data: dict[str, Any] = {
        "method": "linear",
        # Weights without a common factor: with 1, 2, 4 every sum is an integer over 7, whose
        # bits put ~8 % of the bf16 results 2^-56 from a rounding tie, which only exact
        # arithmetic rounds as float64 does.
        "checkpoints": [
            {"path": str(f), "weight": w} for f, w in zip(folders, (1.3, 2.9, 4.1), strict=True)
        ],
        "dtype": "bfloat16",
    }
    if space == "concat":
        data.update(lora_space="delta", delta_rank="concat")
    out, plan = _merge(tmp_path, data)
    ins = [load_file(f / "adapter_model.safetensors") for f in folders]
    s = [a / 4 for a in alphas]
    w = _weights(plan)
    for key in (k for k in ins[0] if "lora_" in k):
        xs = [t[key].to(F64) for t in ins]
        if space == "factors":
            coeff = w if "lora_A" in key else [wi * si / s[0] for wi, si in zip(w, s, strict=True)]
            ref = sum((c * x for c, x in zip(coeff, xs, strict=True)), torch.zeros_like(xs[0]))
        elif "lora_A" in key:
            ref = torch.cat(xs, dim=0)
        else:  # B* = [w_i s_i B_i]: one product per element
            ref = torch.cat([wi * si * x for wi, si, x in zip(w, s, xs, strict=True)], dim=1)
        _assert_rounded(out[key], ref, [4 * x for x in xs] if space == "factors" else [ref])


def test_float32_slerp_takes_its_angle_in_float64(tmp_path: Path) -> None:
    # 2^20 elements: a float32 vector_norm is ~1e-5 off there, which put SLERP 5e-6 from exact.
    g = torch.Generator().manual_seed(1)
    common = torch.randn(1 << 20, generator=g) + 0.5
    xs = [common + 0.05 * torch.randn(1 << 20, generator=g) for _ in range(2)]
    folders = [full_model(tmp_path / f"m{i}", {"w": x}) for i, x in enumerate(xs)]
    out, plan = _merge(
        tmp_path,
        {"method": "slerp", "params": {"t": 0.3}, "checkpoints": [str(f) for f in folders]},
    )
    ref = _slerp([x.to(F64) for x in xs], xs[0].to(F64), plan)
    rel = float((out["w"].to(F64) - ref).norm() / ref.norm())
    assert rel < 1e-7, rel  # float32 rounding of the combination only


def test_model_stock_cosines_in_float64() -> None:
    from mwakit.methods.model_stock import mean_pairwise_cosine

    g = torch.Generator().manual_seed(2)
    common = torch.randn(3, 1 << 19, generator=g) + 0.2
    rows = [common + 0.5 * torch.randn(3, 1 << 19, generator=g) for _ in range(3)]
    got = mean_pairwise_cosine(rows)
    r64 = [x.to(F64) for x in rows]
    cos = [
        (r64[i] * r64[j]).sum(1) / (r64[i].norm(dim=1) * r64[j].norm(dim=1))
        for i, j in ((0, 1), (0, 2), (1, 2))
    ]
    want = sum(cos) / 3
    assert got.dtype == F64
    assert float((got - want).abs().max()) < 1e-12


def test_bf16_compute_with_a_truncated_svd(tmp_path: Path) -> None:
    # No QR/SVD kernel exists for bfloat16: the factorisation runs in float32 (it crashed).
    folders = [adapter(tmp_path / f"a{i}", seed=i, dtype=torch.bfloat16) for i in range(2)]
    data = {
        "method": "ties",
        "params": {"density": 0.5},
        "checkpoints": [str(f) for f in folders],
        "lora_space": "delta",
        "delta_rank": 4,
        "dtype": "bfloat16",
    }
    out, _ = _merge(tmp_path, data)
    a = out["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert a.dtype == torch.bfloat16 and a.shape == (4, 16) and bool(torch.isfinite(a).all())
