"""`merge_in_memory` gives, tensor for tensor and byte for byte, what `mwakit run` writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import mwakit
from mwakit.memory import merge_in_memory
from mwakit.recipe import parse_recipe

from .conftest import MakeAdapter, trainer_state


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _assert_same(mem: dict[str, torch.Tensor], written: dict[str, torch.Tensor]) -> None:
    assert list(mem) == list(written)
    for k, v in written.items():
        assert mem[k].dtype == v.dtype and mem[k].shape == v.shape, k
        assert _bytes(mem[k]) == _bytes(v), k


@pytest.fixture(scope="module")
def run_dir(make_adapter: MakeAdapter, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("mem") / "run"
    for i, step in enumerate((10, 20, 30)):
        st = trainer_state(step, [(s, 2.0 - 0.01 * s + 0.1 * (s % 3)) for s in range(1, step + 1)])
        make_adapter(run / f"checkpoint-{step}", seed=i + 1, state=st, modules_to_save=["lm_head"])
    return run


@pytest.mark.parametrize(
    "extra",
    [
        {"method": "mwa", "params": {"penalty": 2.0}},
        {"method": "ties", "params": {"density": 0.5}, "lora_space": "delta", "delta_rank": 4},
        {"method": "linear", "out_dtype": "bfloat16"},
    ],
    ids=["mwa", "ties-delta", "linear-bf16"],
)
def test_adapter_equals_what_run_writes(run_dir: Path, tmp_path: Path, extra: Any) -> None:
    data = {
        "select": {"run": str(run_dir), "last": 3},
        "output": {"path": str(tmp_path / "out")},
        "device": "cpu",
        **extra,
    }
    recipe = parse_recipe(data)
    mem = merge_in_memory(mwakit.plan(recipe))
    res = mwakit.run(recipe)
    _assert_same(mem.tensors, load_file(res.path / "adapter_model.safetensors"))
    written_cfg = json.loads((res.path / "adapter_config.json").read_text())
    assert json.loads(json.dumps(mem.adapter_config)) == written_cfg
    assert mem.kind == "adapter"
    assert mem.base_model == written_cfg["base_model_name_or_path"]
    # Nothing is written by the in-memory merge: only `run`'s output exists.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_recipe_file_and_config_copy(run_dir: Path, tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text(f"select: {{run: {run_dir}, last: 2}}\noutput: {{path: {tmp_path / 'o'}}}\n")
    plan = mwakit.plan(f)
    mem = merge_in_memory(f)
    assert set(mem.tensors) == {o.key for o in plan.outputs}
    mem.adapter_config["r"] = 999  # the caller's copy: the plan's own config is untouched
    assert mwakit.plan(f).adapter_config["r"] != 999
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "method",
    [
        {"method": "task_arithmetic"},
        # A weighted sum is made straight in the sink's `buffer`, block by block (fused path).
        {"method": "linear", "base_model": None, "out_dtype": "bfloat16"},
    ],
    ids=["task-arithmetic", "linear-fused"],
)
def test_full_models_equal_what_run_writes(
    tiny_base: Path, tmp_path: Path, method: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    from mwakit import execute as ex

    fused: list[str] = []
    real = ex.weighted_sum_into

    def spy(tensors: Any, weights: Any, out: torch.Tensor, **kw: Any) -> torch.Tensor:
        fused.append(str(out.dtype))
        return real(tensors, weights, out, **kw)

    monkeypatch.setattr(ex, "weighted_sum_into", spy)

    folders = []
    for i in range(2):
        torch.manual_seed(i)
        m = AutoModelForCausalLM.from_pretrained(tiny_base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        m.save_pretrained(tmp_path / f"m{i}")
        folders.append(tmp_path / f"m{i}")
    data = {
        "base_model": str(tiny_base),
        "checkpoints": [
            {"path": str(f), "weight": w} for f, w in zip(folders, [0.3, 0.7], strict=True)
        ],
        "output": {"path": str(tmp_path / "out")},
        "device": "cpu",
        **method,
    }
    recipe = parse_recipe({k: v for k, v in data.items() if v is not None})
    mem = merge_in_memory(recipe)
    assert mem.kind == "full" and mem.adapter_config == {}
    in_memory = len(fused)
    assert (in_memory > 0) == (method["method"] == "linear")
    res = mwakit.run(recipe)
    assert len(fused) == 2 * in_memory  # the file writer takes the same path
    _assert_same(mem.tensors, load_file(res.path / "model.safetensors"))


def test_a_cache_reuses_each_modules_qr_across_weights(run_dir: Path, tmp_path: Path) -> None:
    from mwakit.io.cache import InputCache

    def recipe(penalty: float) -> Any:
        return parse_recipe(
            {
                "select": {"run": str(run_dir), "last": 3},
                "method": "mwa",
                "params": {"penalty": penalty},
                "lora_space": "delta",
                "delta_rank": 3,
                "output": {"path": str(tmp_path / "out")},
                "device": "cpu",
            }
        )

    cache = InputCache()
    merge_in_memory(mwakit.plan(recipe(1.0)), cache=cache)
    memo = cache.derived["qr"]
    assert memo.hits == 0
    # Other weights: every module's QR comes from the memo, and the bytes are `run`'s.
    mem = merge_in_memory(mwakit.plan(recipe(4.0)), cache=cache)
    assert memo.hits > 0
    res = mwakit.run(recipe(4.0))
    _assert_same(mem.tensors, load_file(res.path / "adapter_model.safetensors"))
