"""The example recipes of the new methods run as written, on the layout `examples/make_run.py`
writes (``run/checkpoint-<N>`` adapters, ``full/checkpoint-<N>`` with ``--full``), rebuilt here
from real PEFT adapters so no training is needed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mwakit
from mwakit.recipe import load_recipe

from .conftest import MakeAdapter, trainer_state

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"
NEW = (
    "karcher",
    "multislerp",
    "nuslerp",
    "sce",
    "della_linear",
    "breadcrumbs_ties",
    "nearswap",
    "passthrough",
    "per-layer",
)


@pytest.fixture(scope="module")
def tiny(
    make_adapter: MakeAdapter, tiny_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """``examples/runs/tiny`` as make_run.py lays it out, with ``--full 2``."""
    from make_run import bake_full_model

    root = tmp_path_factory.mktemp("examples")
    tiny = root / "examples" / "runs" / "tiny"
    for i, step in enumerate((15, 20, 25, 30)):
        state = trainer_state(step, [(step, 1.0 - 0.1 * i)])
        make_adapter(tiny / "run" / f"checkpoint-{step}", seed=20 + i, state=state)
    for step in (25, 30):
        bake_full_model(
            tiny / "run" / f"checkpoint-{step}", tiny_base, tiny / "full" / f"checkpoint-{step}"
        )
    return root


def test_bake_full_model_is_base_plus_delta(tiny: Path, tiny_base: Path) -> None:
    ckpt = tiny / "examples/runs/tiny/run/checkpoint-30"
    full = load_file(tiny / "examples/runs/tiny/full/checkpoint-30/model.safetensors")
    base = load_file(tiny_base / "model.safetensors")
    ad = load_file(ckpt / "adapter_model.safetensors")
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    mod = "model.layers.1.mlp.down_proj"
    a, b = ad[f"base_model.model.{mod}.lora_A.weight"], ad[f"base_model.model.{mod}.lora_B.weight"]
    want = base[f"{mod}.weight"] + cfg["lora_alpha"] / cfg["r"] * b @ a
    torch.testing.assert_close(full[f"{mod}.weight"], want, rtol=1e-5, atol=1e-6)
    assert torch.equal(full["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


#: Run whole (the others are planned: their maths is tested in tests/methods, a run costs ~1 s).
RUN = ("karcher", "sce", "nearswap", "passthrough", "per-layer")


@pytest.mark.parametrize("name", NEW)
def test_example_plans(name: str, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tiny)
    recipe = load_recipe(EXAMPLES / f"{name}.yaml")
    assert recipe.method == (name if name != "per-layer" else "slerp")
    plan = mwakit.plan(recipe)
    assert plan.tasks and not [w for w in plan.warnings if "matches no tensor" in w]


@pytest.mark.parametrize("name", RUN)
def test_example_runs(name: str, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tiny)
    res = mwakit.run(load_recipe(EXAMPLES / f"{name}.yaml"))
    assert (res.path / "README.md").is_file() and (res.path / "mwakit.yaml").is_file()
    assert all(math.isfinite(e) for e in res.stats.rel_errors.values())
    files = sorted(p.name for p in res.path.iterdir())
    if res.plan.kind == "full":
        assert "model.safetensors" in files and "config.json" in files
    else:
        assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    if name == "passthrough":
        cfg = json.loads((res.path / "config.json").read_text())
        assert cfg["num_hidden_layers"] == 3
        out = load_file(res.path / "model.safetensors")
        src = load_file(tiny / "examples/runs/tiny/full/checkpoint-30/model.safetensors")
        key = "self_attn.o_proj.weight"
        assert torch.equal(out[f"model.layers.2.{key}"], 0.5 * src[f"model.layers.1.{key}"])
    # The resolved recipe re-validates (per-layer lists and slices included).
    load_recipe(res.path / "mwakit.yaml")
