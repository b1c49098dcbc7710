"""passthrough with slices: layer stacking of full models — renumbered tensors, config.json's
layer count, the tensors outside the stack from a chosen checkpoint, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

import mwakit
from mwakit.cli import main
from mwakit.errors import PlanError, RecipeError
from mwakit.recipe import parse_recipe

from .conftest import MakeAdapter

SHAPE = {"hidden": 16, "intermediate": 32, "vocab": 32, "heads": 2, "kv_heads": 1}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two 4-layer tiny Llamas (seeds 0, 1); m1's config marks odd layers sliding-window."""
    from make_run import make_tiny_llama

    root = tmp_path_factory.mktemp("stack")
    out = []
    for i in range(2):
        folder = make_tiny_llama(root / f"m{i}", seed=i, layers=4, **SHAPE)  # type: ignore[arg-type]
        cfg = json.loads((folder / "config.json").read_text())
        kinds = ["full_attention", "sliding_attention"] if i else ["full_attention"] * 2
        cfg["layer_types"] = [kinds[j % 2] for j in range(4)]
        (folder / "config.json").write_text(json.dumps(cfg))
        out.append(folder)
    return out


def _state(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _data(tmp: Path, models: list[Path], slices: list[Any], **kw: Any) -> dict[str, Any]:
    return {
        "method": "passthrough",
        "checkpoints": [str(m) for m in models],
        "slices": slices,
        "device": "cpu",
        "output": {"path": str(tmp / "out"), "overwrite": True},
        **kw,
    }


def test_frankenmerge_renumbers_layers_and_updates_the_config(
    tmp_path: Path, models: list[Path]
) -> None:
    slices = [{"checkpoint": 0, "layers": [0, 3]}, {"checkpoint": str(models[1]), "layers": [1, 4]}]
    recipe = parse_recipe(
        _data(
            tmp_path,
            models,
            slices,
            rules=[{"match": "model.layers.4.mlp.*", "params": {"scale": 0.5}}],
            out_dtype="bfloat16",
        )
    )
    assert recipe.slices is not None and recipe.slices[1].checkpoint == 1  # path → index
    res = mwakit.run(recipe)
    out, s0, s1 = _state(res.path), _state(models[0]), _state(models[1])
    sources = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (1, 3)]  # output layer j ← (ckpt, i)
    for j, (c, i) in enumerate(sources):
        src = (s0, s1)[c]
        for key in [k for k in src if k.startswith(f"model.layers.{i}.")]:
            out_key = key.replace(f"model.layers.{i}.", f"model.layers.{j}.", 1)
            scale = 0.5 if j == 4 and ".mlp." in key else 1.0
            assert torch.equal(out[out_key], (src[key] * scale).bfloat16()), out_key
    # 6 layers of 9 tensors + embeddings, final norm, lm_head, from the first slice's model.
    assert len(out) == 6 * 9 + 3
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(out[key], s0[key].bfloat16())
    cfg = json.loads((res.path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    full, sliding = "full_attention", "sliding_attention"
    assert cfg["layer_types"] == [full, full, full, sliding, full, sliding]
    assert cfg["torch_dtype"] == "bfloat16"
    doc = res.plan.to_json()
    assert doc["slices"][3] == {"layer": 3, "checkpoint": "m1", "source_layer": 1}
    assert doc["config_updates"]["num_hidden_layers"] == 6


def test_the_result_loads_and_repeats_a_layer(tmp_path: Path, models: list[Path]) -> None:
    from transformers import AutoModelForCausalLM

    # Layer 1 twice (the "layer repetition" frankenmerge), the rest from checkpoint 1.
    slices = [{"checkpoint": 0, "layers": [0, 2]}, {"checkpoint": 0, "layers": [1, 2]}]
    res = mwakit.run(parse_recipe(_data(tmp_path, models, slices, params={"rest_from": 1})))
    out, s0, s1 = _state(res.path), _state(models[0]), _state(models[1])
    key = "self_attn.q_proj.weight"
    assert torch.equal(out[f"model.layers.2.{key}"], s0[f"model.layers.1.{key}"])
    assert torch.equal(out["lm_head.weight"], s1["lm_head.weight"])
    model = AutoModelForCausalLM.from_pretrained(res.path)
    assert len(model.model.layers) == 3
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 32) and torch.isfinite(logits).all()


def test_plan_text_shows_the_slices(tmp_path: Path, models: list[Path]) -> None:
    data = _data(
        tmp_path, models, [{"checkpoint": 1, "layers": [0, 4]}, {"checkpoint": 0, "layers": [2, 4]}]
    )
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(main, ["plan", str(f)])
    assert res.exit_code == 0, res.output
    assert "slices: 6 output layers" in res.output
    assert "layers 0–3 ← m1 layers 0–3" in res.output
    assert "layers 4–5 ← m0 layers 2–3" in res.output


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"method": "linear"}, "slices stack layers taken unchanged"),
        ({"slices": []}, "`slices:` is empty"),
        ({"slices": [{"checkpoint": 5, "layers": [0, 2]}]}, "slices.0.checkpoint: checkpoint 5"),
        ({"slices": [{"checkpoint": "nope", "layers": [0, 2]}]}, "'nope' is not a path listed"),
        ({"slices": [{"checkpoint": 0, "layers": [2, 2]}]}, "slices.0.layers"),
        ({"slices": [{"checkpoint": 0, "layers": [0, 2], "model": "x"}]}, "slices.0.model"),
    ],
)
def test_bad_slices_are_recipe_problems(
    tmp_path: Path, models: list[Path], change: dict[str, Any], needle: str
) -> None:
    data = _data(tmp_path, models, [{"checkpoint": 0, "layers": [0, 2]}])
    data.update(change)
    with pytest.raises(RecipeError) as exc:
        parse_recipe(data)
    assert any(needle in str(p) for p in exc.value.problems), exc.value.problems


def test_a_slice_past_the_last_layer_is_refused(tmp_path: Path, models: list[Path]) -> None:
    recipe = parse_recipe(_data(tmp_path, models, [{"checkpoint": 1, "layers": [2, 5]}]))
    with pytest.raises(PlanError, match=r"reach past the 4 layers of m1") as exc:
        mwakit.plan(recipe)
    assert exc.value.where == "slices.0.layers"


def test_models_of_another_size_are_refused(tmp_path: Path, models: list[Path]) -> None:
    from make_run import make_tiny_llama

    wide = make_tiny_llama(tmp_path / "wide", seed=3, layers=2, **{**SHAPE, "intermediate": 48})  # type: ignore[arg-type]
    recipe = parse_recipe(
        _data(
            tmp_path,
            [models[0], wide],
            [{"checkpoint": 0, "layers": [0, 2]}, {"checkpoint": 1, "layers": [0, 1]}],
        )
    )
    with pytest.raises(PlanError, match="stack layers of models of one size"):
        mwakit.plan(recipe)


def test_slices_of_adapters_are_refused_with_the_reason(
    tmp_path: Path, make_adapter: MakeAdapter
) -> None:
    a = make_adapter(tmp_path / "a", seed=0)
    recipe = parse_recipe(_data(tmp_path, [a], [{"checkpoint": 0, "layers": [0, 1]}]))
    with pytest.raises(PlanError, match="belongs to its base model's layer") as exc:
        mwakit.plan(recipe)
    assert "per-layer weights" in (exc.value.fix or "")


def test_passthrough_without_slices_takes_one_checkpoint(
    tmp_path: Path, models: list[Path], make_adapter: MakeAdapter
) -> None:
    data = _data(tmp_path, models, [])
    data.pop("slices")
    with pytest.raises(RecipeError, match="takes exactly 1 checkpoints"):
        parse_recipe(data)
    # One adapter, scaled: exact in delta space (the scale goes on B), refused as factors.
    a = make_adapter(tmp_path / "a", seed=0)
    one = {**data, "checkpoints": [str(a)], "params": {"scale": 0.5}}
    with pytest.raises(PlanError, match="delta_rank: concat"):
        mwakit.plan(parse_recipe(one))
    res = mwakit.run(parse_recipe({**one, "lora_space": "delta"}))
    got, src = (
        load_file(res.path / "adapter_model.safetensors"),
        load_file(a / "adapter_model.safetensors"),
    )
    # Output scaling 1 (lora_alpha = r = 4): B carries scale · s = 0.5 · (8 / 4), so the
    # loaded update is 0.5 · ΔW.
    for key, t in src.items():
        want = t * 0.5 * (8 / 4) if "lora_B" in key else t
        torch.testing.assert_close(got[key], want)
    assert json.loads((res.path / "adapter_config.json").read_text())["lora_alpha"] == 4


def test_per_layer_scale_follows_the_output_layers(tmp_path: Path, models: list[Path]) -> None:
    slices = [{"checkpoint": 0, "layers": [0, 4]}, {"checkpoint": 1, "layers": [3, 4]}]
    plan = mwakit.plan(parse_recipe(_data(tmp_path, models, slices, params={"scale": [1, 0]})))
    assert plan.layers is not None and plan.layers["count"] == 5
    scale = {t.name: t.weights[0] for t in plan.tasks}
    for j in range(5):
        assert scale[f"model.layers.{j}.mlp.up_proj.weight"] == pytest.approx(1 - j / 4)
    assert scale["lm_head.weight"] == 1.0  # outside the stack: t = 0
