"""Round trips through PEFT: the merged adapter loads and carries exactly the intended update.

The expected update is computed independently, by PEFT itself: each input adapter is loaded with
`PeftModel.from_pretrained` and its per-module ΔW_i taken from `get_delta_weight`; the merged
adapter is loaded the same way. So scaling (α/r, rsLoRA α/√r, rank_pattern, alpha_pattern) is
PEFT's reading, not ours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import mwakit
from mwakit.recipe import parse_recipe

from .conftest import MakeAdapter, trainer_state

pytestmark = pytest.mark.slow


Tensors = dict[str, torch.Tensor]


def _deltas(base_dir: Path, adapter: Path) -> tuple[Tensors, Tensors]:
    """(ΔW per LoRA module, modules_to_save weights) as PEFT computes them."""
    from make_run import load_base
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(load_base(base_dir), adapter)
    deltas = {
        name: m.get_delta_weight("default").detach().double()
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer) and "default" in m.lora_A
    }
    saved = {
        name: p.detach().double()
        for name, p in model.named_parameters()
        if "modules_to_save.default" in name
    }
    return deltas, saved


def _merge(tmp: Path, folders: list[Path], **recipe: Any) -> mwakit.api.RunResult:
    data = {
        "checkpoints": [{"path": str(f)} for f in folders],
        "output": {"path": str(tmp / "merged")},
        "device": "cpu",
        **recipe,
    }
    return mwakit.run(parse_recipe(data))


def _runs(make_adapter: MakeAdapter, tmp: Path, losses: list[float], **kw: Any) -> list[Path]:
    out = []
    for i, loss in enumerate(losses):
        step = 10 * (i + 1)
        # A falling loss, then the checkpoint's loss since the previous save (save_steps 5).
        log = [(s, loss + 0.01 * (step - s) if s <= step - 5 else loss) for s in range(1, step + 1)]
        st = trainer_state(step, log)
        out.append(make_adapter(tmp / f"checkpoint-{step}", seed=i + 1, state=st, **kw))
    return out


def _assert_close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = (got - want).abs().max().item()
    scale = want.abs().max().item() or 1.0
    assert err <= tol * scale, f"max abs error {err:.3g} (scale {scale:.3g})"


def test_delta_concat_is_exact_with_alpha_not_r_and_modules_to_save(
    tiny_base: Path, make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    folders = _runs(
        make_adapter, tmp_path, [1.0, 0.8, 0.5], r=4, lora_alpha=12, modules_to_save=["lm_head"]
    )
    res = _merge(
        tmp_path,
        folders,
        method="mwa",
        params={"metric": "loss", "penalty": 1.0},
        lora_space="delta",
    )
    # METHODS.md §1: losses (1.0, 0.8, 0.5), p = 1 → 4/17, 5/17, 8/17.
    assert res.plan.weights == pytest.approx([4 / 17, 5 / 17, 8 / 17], abs=1e-12)
    inputs = [_deltas(tiny_base, f) for f in folders]
    got, got_saved = _deltas(tiny_base, res.path)
    assert set(got) == set(inputs[0][0]) and len(got) == 14
    w = res.plan.weights
    for name, delta in got.items():
        want = sum(wi * d[0][name] for wi, d in zip(w, inputs, strict=True))
        _assert_close(delta, want, 1e-6)
    for name, p in got_saved.items():
        want = sum(wi * d[1][name] for wi, d in zip(w, inputs, strict=True))
        _assert_close(p, want, 1e-6)
    cfg = json.loads((res.path / "adapter_config.json").read_text())
    assert cfg["r"] == 12 and cfg["lora_alpha"] == 12 and cfg["use_rslora"] is False


def test_delta_concat_mixed_ranks_rslora_and_patterns(
    tiny_base: Path, make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    a = make_adapter(
        tmp_path / "a",
        seed=1,
        r=4,
        lora_alpha=6,
        use_rslora=True,
        rank_pattern={"down_proj": 2},
        alpha_pattern={"q_proj": 3},
    )
    b = make_adapter(tmp_path / "b", seed=2, r=8, lora_alpha=16)
    res = _merge(
        tmp_path,
        [a, b],
        method="linear",
        params={"normalize": True},
        lora_space="delta",
        checkpoints=[{"path": str(a), "weight": 1.0}, {"path": str(b), "weight": 3.0}],
    )
    assert res.plan.weights == pytest.approx([0.25, 0.75])
    da, db = _deltas(tiny_base, a)[0], _deltas(tiny_base, b)[0]
    got = _deltas(tiny_base, res.path)[0]
    for name, delta in got.items():
        _assert_close(delta, 0.25 * da[name] + 0.75 * db[name], 1e-6)
    cfg = json.loads((res.path / "adapter_config.json").read_text())
    # down_proj has rank 2 + 8 = 10, every other module 4 + 8 = 12.
    assert cfg["r"] == 12 and cfg["use_rslora"] is False
    assert set(cfg["rank_pattern"].values()) == {10}


def test_delta_svd_equals_dense_truncation(
    tiny_base: Path, make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    folders = _runs(make_adapter, tmp_path, [1.0, 0.9, 0.7], r=4, lora_alpha=8)
    res = _merge(
        tmp_path,
        folders,
        method="mwa",
        params={"metric": "step", "penalty": 1.0},
        lora_space="delta",
        delta_rank=4,
    )
    assert res.plan.weights == pytest.approx([1 / 6, 1 / 3, 1 / 2])
    inputs = [_deltas(tiny_base, f)[0] for f in folders]
    got = _deltas(tiny_base, res.path)[0]
    for name, delta in got.items():
        full = sum(wi * d[name] for wi, d in zip(res.plan.weights, inputs, strict=True))
        u, s, vh = torch.linalg.svd(full, full_matrices=False)
        want = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
        _assert_close(delta, want, 1e-5)
        rel = (s[4:].square().sum() / s.square().sum()).sqrt().item()
        assert res.stats.rel_errors[name] == pytest.approx(rel, rel=1e-3, abs=1e-6)


def test_factors_average_with_equal_config(
    tiny_base: Path, make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    folders = _runs(make_adapter, tmp_path, [1.0, 0.8, 0.5], r=4, lora_alpha=16, use_rslora=True)
    res = _merge(tmp_path, folders, method="mwa", params={"metric": "loss", "penalty": 2.0})
    assert res.plan.weights == pytest.approx([16 / 105, 25 / 105, 64 / 105])
    tensors = [load_file(f / "adapter_model.safetensors") for f in folders]
    merged = load_file(res.path / "adapter_model.safetensors")
    for key, t in merged.items():
        want = sum(w * ts[key].double() for w, ts in zip(res.plan.weights, tensors, strict=True))
        _assert_close(t.double(), want, 1e-6)
    cfg = json.loads((res.path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16 and cfg["use_rslora"] is True
    # And PEFT reads it with the same scaling: ΔW = (α/√r)·B̄Ā.
    got = _deltas(tiny_base, res.path)[0]
    name = next(iter(got))
    prefix = name
    b, a = merged[prefix + ".lora_B.weight"].double(), merged[prefix + ".lora_A.weight"].double()
    _assert_close(got[name], (16 / 2) * b @ a, 1e-6)
