"""The streaming executor and the planner on synthetic PEFT-layout adapters of any size."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import mwakit
from mwakit.errors import PlanError
from mwakit.recipe import parse_recipe

from .conftest import trainer_state, write_trainer_state

PREFIX = "base_model.model.model.layers"


def write_adapter(
    folder: Path,
    *,
    modules: int,
    seed: int,
    r: int = 4,
    alpha: float = 8,
    dim: int = 16,
    loss: float | None = None,
    step: int = 10,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """An adapter folder in PEFT's on-disk layout (keys, config), with random factors."""
    g = torch.Generator().manual_seed(seed)
    ts: dict[str, torch.Tensor] = {}
    for i in range(modules):
        kind = "mlp.up_proj" if i % 2 else "self_attn.q_proj"
        m = f"{PREFIX}.{i}.{kind}"
        ts[f"{m}.lora_A.weight"] = torch.randn(r, dim, generator=g).to(dtype)
        ts[f"{m}.lora_B.weight"] = torch.randn(dim, r, generator=g).to(dtype)
    ts["base_model.model.lm_head.weight"] = torch.randn(8, dim, generator=g).to(dtype)
    ts["base_model.model.positions"] = torch.arange(6) + seed  # an integer buffer
    folder.mkdir(parents=True)
    save_file(ts, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": ["q_proj", "up_proj"],
        "base_model_name_or_path": "tiny/base",
        "task_type": "CAUSAL_LM",
        "modules_to_save": ["lm_head"],
        "use_rslora": False,
    }
    (folder / "adapter_config.json").write_text(json.dumps(cfg, sort_keys=True, indent=2))
    if loss is not None:
        write_trainer_state(folder, trainer_state(step, [(step, loss)]))
    return ts


def _recipe(tmp: Path, folders: list[Path], **kw: Any) -> mwakit.recipe.Recipe:
    return parse_recipe(
        {
            "checkpoints": [str(f) for f in folders],
            "output": {"path": str(tmp / "out"), "overwrite": True},
            "device": "cpu",
            **kw,
        }
    )


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("modules", [8, 64])
def test_live_tensor_count_stays_bounded(tmp_path: Path, modules: int) -> None:
    folders = [tmp_path / f"c{i}" for i in range(4)]
    for i, f in enumerate(folders):
        write_adapter(f, modules=modules, seed=i, loss=1.0 + i)
    gc.collect()
    baseline = _live_tensors()
    peak = 0

    def on_task(i: int, task: Any) -> None:
        nonlocal peak
        # A gc walk per task costs ~0.3 s on this heap; every 8th task still sees any growth
        # (a leak would grow the count monotonically across the 66 tasks).
        if i % 8 == 0:
            peak = max(peak, _live_tensors() - baseline)

    # float64: the torch executor (a float32 factor average runs in NumPy, without torch
    # tensors; its bound is `tests/executors/test_factors.py`'s).
    res = mwakit.run(_recipe(tmp_path, folders, dtype="float64"), on_task=on_task)
    assert res.stats.tasks == modules + 2
    # One group is 2 factors × 4 checkpoints plus its outputs, and the reader holds the next
    # group read ahead (8 more); nothing accumulates across groups, so the bound does not grow
    # with the number of modules (8 vs 64).
    assert peak <= 12 + 8, peak
    assert res.stats.max_live_inputs == 8


def test_values_rules_dtypes_and_int_copy(tmp_path: Path) -> None:
    folders = [tmp_path / f"c{i}" for i in range(3)]
    inputs = [
        write_adapter(f, modules=4, seed=i, loss=[1.0, 0.8, 0.5][i]) for i, f in enumerate(folders)
    ]
    recipe = _recipe(
        tmp_path,
        folders,
        method="mwa",
        params={"metric": "loss", "penalty": 1.0},
        rules=[
            {"match": "*.mlp.*", "params": {"penalty": 0.0}},
            {"match": "*.nothing.*", "params": {}},
        ],
        out_dtype="bfloat16",
    )
    res = mwakit.run(recipe)
    out = load_file(res.path / "adapter_model.safetensors")
    w = [4 / 17, 5 / 17, 8 / 17]
    for key, t in out.items():
        if key.endswith("positions"):
            assert t.dtype == torch.int64 and torch.equal(t, inputs[0][key])
            continue
        assert t.dtype == torch.bfloat16
        ww = [1 / 3] * 3 if ".mlp." in key else w
        want = sum(wi * ts[key] for wi, ts in zip(ww, inputs, strict=True))
        assert torch.allclose(t.float(), want, rtol=1e-2, atol=1e-2)
    assert "rule '*.nothing.*' matches no tensor" in res.plan.warnings
    doc = res.plan.to_json()
    mlp = [t for t in doc["tensors"] if t.get("module", "").endswith("mlp.up_proj")]
    assert mlp and all(t["rule"] == "*.mlp.*" for t in mlp)
    assert mlp[0]["weights"] == pytest.approx([1 / 3] * 3)


def test_plan_reads_headers_only(tmp_path: Path) -> None:
    folders = [tmp_path / f"c{i}" for i in range(2)]
    for i, f in enumerate(folders):
        write_adapter(f, modules=4, seed=i, loss=1.0)
        raw = bytearray((f / "adapter_model.safetensors").read_bytes())
        n = int.from_bytes(raw[:8], "little")
        raw[8 + n :] = b"\xff" * (len(raw) - 8 - n)  # every tensor byte is now NaN garbage
        (f / "adapter_model.safetensors").write_bytes(bytes(raw))
    plan = mwakit.plan(_recipe(tmp_path, folders))
    assert len(plan.tasks) == 6
    # ... while running it meets the garbage and says which tensor.
    with pytest.raises(mwakit.errors.TensorError, match="c0 base_model"):
        mwakit.run(_recipe(tmp_path, folders))
    assert not (tmp_path / "out").exists()


def test_mismatched_key_sets_fail_in_plan(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_adapter(a, modules=4, seed=0)
    write_adapter(b, modules=6, seed=1)
    with pytest.raises(PlanError, match="has 4 tensor\\(s\\) a lacks"):
        mwakit.plan(_recipe(tmp_path, [a, b], method="linear"))


def test_config_rank_disagreeing_with_tensors(tmp_path: Path) -> None:
    a = tmp_path / "a"
    write_adapter(a, modules=2, seed=0, r=4)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["r"] = 8
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PlanError, match="says rank 8 but the tensors have rank 4"):
        mwakit.plan(_recipe(tmp_path, [a], method="linear"))


def test_unsupported_adapter_type(tmp_path: Path) -> None:
    a = tmp_path / "a"
    write_adapter(a, modules=2, seed=0)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["peft_type"] = "LOHA"
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PlanError, match="adapter type LOHA is not supported"):
        mwakit.plan(_recipe(tmp_path, [a], method="linear"))


def test_single_checkpoint_is_identity(tmp_path: Path) -> None:
    a = tmp_path / "a"
    ts = write_adapter(a, modules=3, seed=0, loss=0.3)
    res = mwakit.run(_recipe(tmp_path, [a]))
    out = load_file(res.path / "adapter_model.safetensors")
    assert all(torch.equal(out[k], ts[k]) for k in ts)


def test_cuda_requested_without_cuda(tmp_path: Path) -> None:
    a = tmp_path / "a"
    write_adapter(a, modules=1, seed=0, loss=0.3)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(PlanError, match="CUDA is not available"):
        mwakit.run(_recipe(tmp_path, [a], device="cuda"))
    assert not (tmp_path / "out").exists()


def test_pickle_adapter_only_with_allow_pickle(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    ta = write_adapter(a, modules=2, seed=0, loss=1.0)
    write_adapter(b, modules=2, seed=1, loss=0.5)
    torch.save(ta, a / "adapter_model.bin")
    (a / "adapter_model.safetensors").unlink()
    with pytest.raises(mwakit.errors.SourceError, match="allow_pickle: true"):
        mwakit.plan(_recipe(tmp_path, [a, b]))
    res = mwakit.run(_recipe(tmp_path, [a, b], allow_pickle=True))
    # Same result as merging the safetensors original.
    from safetensors.torch import save_file as save

    save(ta, a / "adapter_model.safetensors", metadata={"format": "pt"})
    (a / "adapter_model.bin").unlink()
    again = mwakit.run(_recipe(tmp_path, [a, b], output={"path": str(tmp_path / "o2")}))
    assert (
        load_file(res.path / "adapter_model.safetensors").keys()
        == load_file(again.path / "adapter_model.safetensors").keys()
    )
    for k, t in load_file(res.path / "adapter_model.safetensors").items():
        assert torch.equal(t, load_file(again.path / "adapter_model.safetensors")[k])


@pytest.mark.parametrize(
    ("transform", "effect"),
    [("power", "gets weight 0"), ("softmax", "still gets a small weight with transform: softmax")],
)
def test_step_zero_adapter_is_warned(tmp_path: Path, transform: str, effect: str) -> None:
    a, b = tmp_path / "checkpoint-0", tmp_path / "checkpoint-10"
    # No trainer_state.json: the step comes from the folder names.
    write_adapter(a, modules=1, seed=0)
    write_adapter(b, modules=1, seed=1)
    plan = mwakit.plan(
        _recipe(
            tmp_path,
            [a, b],
            method="linear",
            weighting={"mwa": {"metric": "step", "penalty": 0.01, "transform": transform}},
        )
    )
    assert [w for w in plan.warnings if "step 0" in w] == [
        f"checkpoint-0: step 0 {effect} (a step-0 LoRA has B = 0)"
    ]
