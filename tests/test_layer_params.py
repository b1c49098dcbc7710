"""Per-layer parameters: lists interpolated over depth, validated element by element, resolved
per tensor with rules, shown by `mwakit plan`, merged exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import mwakit
from mwakit import layer_params as lp
from mwakit.card import resolved_recipe
from mwakit.cli import main
from mwakit.errors import RecipeError
from mwakit.methods import get_method
from mwakit.recipe import parse_recipe

from .conftest import MakeAdapter

LAYERS = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three tiny random 4-layer Llamas (save_pretrained) of one shape."""
    from make_run import make_tiny_llama

    root = tmp_path_factory.mktemp("deep")
    shape = {"hidden": 16, "layers": LAYERS, "intermediate": 32, "vocab": 32, "heads": 2}
    return [make_tiny_llama(root / f"m{i}", seed=i, kv_heads=1, **shape) for i in range(3)]


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _recipe(tmp: Path, **kw: Any) -> Any:
    data = {"output": {"path": str(tmp / "out"), "overwrite": True}, "device": "cpu", **kw}
    return parse_recipe(data)


def _problems(data: dict[str, Any]) -> list[str]:
    base = {"checkpoints": ["a", "b"], "output": "o", **data}
    with pytest.raises(RecipeError) as exc:
        parse_recipe(base)
    return [str(p) for p in exc.value.problems]


# ---------------------------------------------------------------------------------------------
# Interpolation and layer names


def test_interpolation_goldens() -> None:
    # t = layer/(n − 1): 5 layers over [0, 0.5, 1] give 0, .25, .5, .75, 1.
    got = [lp.interpolate([0, 0.5, 1], lp.depth(i, 5)) for i in range(5)]
    assert got == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [lp.interpolate([0, 1, 0], lp.depth(i, 3)) for i in range(3)] == [0.0, 1.0, 0.0]
    assert lp.interpolate([0.2, 0.8], 0.25) == pytest.approx(0.35)
    assert lp.interpolate([7.0], 0.6) == 7.0
    assert lp.depth(None, 32) == 0.0 and lp.depth(0, 1) == 0.0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=12))
def test_a_list_of_n_values_gives_layer_i_its_own_value_and_matches_numpy(v: list[float]) -> None:
    n = len(v)
    assert [lp.interpolate(v, lp.depth(i, n)) for i in range(n)] == v
    # mergekit's gradients are numpy's interp over evenly spaced knots.
    for t in np.linspace(0, 1, 17):
        want = float(np.interp(t, np.linspace(0, 1, n), v))
        assert lp.interpolate(v, float(t)) == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("model.layers.12.mlp.up_proj.weight", ("model.layers", 12)),
        ("base_model.model.model.layers.3.self_attn.q_proj", ("base_model.model.model.layers", 3)),
        ("transformer.h.11.attn.c_attn.weight", ("transformer.h", 11)),
        ("encoder.block.2.layer.0.SelfAttention.q.weight", ("encoder.block", 2)),
        ("model.embed_tokens.weight", None),
        ("lm_head.weight", None),
        ("model.layers_norm.weight", None),
    ],
)
def test_layer_of(name: str, want: tuple[str, int] | None) -> None:
    assert lp.layer_of(name) == want


def test_layer_count_from_config_or_names(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"num_hidden_layers": 7}))
    assert lp.layer_count(cfg, []) == (7, "config.json num_hidden_layers")
    cfg.write_text(json.dumps({"text_config": {"num_hidden_layers": 5}}))
    assert lp.layer_count(cfg, [])[0] == 5
    # Fallback: the largest index + 1 of the stack with the most layers.
    names = ["model.layers.0.a", "model.layers.9.a", "vision.blocks.3.a", "lm_head.weight"]
    assert lp.layer_count(None, names) == (10, "largest model.layers.<i> index + 1")
    assert lp.main_stack(names) == ("model.layers", 9)
    assert lp.layer_count(None, ["lm_head.weight"])[0] == 1


# ---------------------------------------------------------------------------------------------
# Validation, with locations


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"method": "ties", "params": {"density": [0.2, 1.5]}}, "params.density.1: Input should"),
        ({"method": "ties", "params": {"density": [0.2, "x"]}}, "params.density.1: not a finite"),
        ({"method": "ties", "params": {"density": []}}, "params.density: a per-layer list needs"),
        (
            {"method": "della", "params": {"density": [0.5, 0.9], "epsilon": 0.15}},
            "(at layer depth t = 1)",
        ),
        ({"method": "dare_ties", "params": {"seed": [1, 2]}}, "params.seed: takes one value"),
        (
            {"method": "ties", "params": {"density": [0.2, 0.5], "trim_scope": "model"}},
            "trim_scope: model takes one density",
        ),
        (
            {"method": "ties", "rules": [{"match": "*mlp*", "params": {"density": [0.5, 0]}}]},
            "rules.0.params.density.1: Input should be greater than 0",
        ),
        ({"method": "mwa", "params": {"penalty": [0.5, -1]}}, "params.penalty.1: Input should"),
        (
            {"method": "ties", "weighting": {"mwa": {"penalty": [1, -2]}}},
            "weighting.mwa: penalty.1: Input should be greater than or equal to 0",
        ),
        ({"checkpoints": [{"path": "a", "weight": []}]}, "checkpoints.0.weight"),
    ],
)
def test_bad_lists_are_reported_where_they_are(data: dict[str, Any], needle: str) -> None:
    probs = _problems(data)
    assert any(needle in p for p in probs), probs


def test_good_lists_validate_and_resolve() -> None:
    r = parse_recipe(
        {
            "method": "della",
            "params": {"density": [0.3, 0.7], "epsilon": [0.1, 0.2]},
            "checkpoints": [{"path": "a", "weight": [1, 0]}, "b"],
            "output": "o",
        }
    )
    assert r.per_layer
    p = r.method_params(t=0.5)
    assert p.density == pytest.approx(0.5) and p.epsilon == pytest.approx(0.15)  # type: ignore[attr-defined]
    assert r.method_params().density == 0.3  # type: ignore[attr-defined]
    assert not parse_recipe({"checkpoints": ["a"], "output": "o"}).per_layer


# ---------------------------------------------------------------------------------------------
# Planning and merging


def test_per_layer_weights_merge_exactly(tmp_path: Path, models: list[Path]) -> None:
    # weight [1, 0] and [0, 1]: layer i is (1 − t) θ_0 + t θ_1 with t = i/3 (normalised);
    # tensors outside the stack take t = 0, so they are θ_0.
    recipe = _recipe(
        tmp_path,
        method="linear",
        checkpoints=[
            {"path": str(models[0]), "weight": [1, 0]},
            {"path": str(models[1]), "weight": [0, 1]},
        ],
    )
    res = mwakit.run(recipe)
    out, s0, s1 = _state(res.path), _state(models[0]), _state(models[1])
    for key, got in out.items():
        hit = lp.layer_of(key)
        t = 0.0 if hit is None else hit[1] / (LAYERS - 1)
        torch.testing.assert_close(got, (1 - t) * s0[key] + t * s1[key], rtol=1e-6, atol=1e-6)
    rows = res.plan.layers["per_layer"]  # type: ignore[index]
    assert [r["weights"] for r in rows] == [[1.0 - i / 3, i / 3] for i in range(LAYERS)]
    # The resolved recipe keeps the lists (re-running it merges the same).
    assert [c.weight for c in resolved_recipe(res.plan).checkpoints or []] == [[1, 0], [0, 1]]


def test_lists_combine_with_rules_first_match_wins(tmp_path: Path, models: list[Path]) -> None:
    recipe = _recipe(
        tmp_path,
        method="ties",
        params={"density": [0.2, 1.0], "lambda": 1.0},
        rules=[
            {"match": "*.mlp.*", "params": {"density": 0.6}},
            {"match": "*.self_attn.o_proj.*", "params": {"density": [1.0, 0.4]}},
        ],
        base_model=str(models[0]),
        checkpoints=[str(models[1]), str(models[2])],
    )
    plan = mwakit.plan(recipe)
    dens = {t.name: t.params.density for t in plan.tasks}  # type: ignore[attr-defined]
    for i in range(LAYERS):
        t = i / 3
        pre = f"model.layers.{i}."
        assert dens[pre + "self_attn.q_proj.weight"] == pytest.approx(0.2 + 0.8 * t)
        assert dens[pre + "mlp.up_proj.weight"] == 0.6
        assert dens[pre + "self_attn.o_proj.weight"] == pytest.approx(1.0 - 0.6 * t)
    assert dens["model.embed_tokens.weight"] == 0.2  # outside the stack: t = 0
    assert dens["lm_head.weight"] == 0.2
    doc = plan.to_json()
    assert doc["layers"]["count"] == LAYERS
    assert doc["layers"]["source"] == "config.json num_hidden_layers"
    row = doc["layers"]["per_layer"][1]
    assert row["params"]["density"] == pytest.approx(0.2 + 0.8 / 3)
    assert row["rules"]["*.self_attn.o_proj.*"]["density"] == pytest.approx(0.8)
    tensor = next(t for t in doc["tensors"] if t["key"] == "model.layers.3.mlp.up_proj.weight")
    assert tensor["layer"] == 3 and tensor["params"]["density"] == 0.6


def test_mwa_penalty_list_gives_per_layer_weights(tmp_path: Path, models: list[Path]) -> None:
    losses = [1.0, 0.5]
    cks = [{"path": str(m), "metrics": {"loss": x}} for m, x in zip(models, losses, strict=False)]
    for kw in (
        {"method": "mwa", "params": {"metric": "loss", "penalty": [0.0, 2.0]}},
        {
            "method": "task_arithmetic",
            "weighting": {"mwa": {"metric": "loss", "penalty": [0.0, 2.0]}},
            "base_model": str(models[2]),
        },
    ):
        plan = mwakit.plan(_recipe(tmp_path, checkpoints=cks, **kw))
        ws = {t.name: t.weights for t in plan.tasks}
        # p = 0: uniform; p = 2 at the last layer: (1/1)² : (1/0.5)² = 1 : 4.
        assert ws["model.layers.0.mlp.up_proj.weight"] == pytest.approx((0.5, 0.5))
        assert ws["model.layers.3.mlp.up_proj.weight"] == pytest.approx((0.2, 0.8))
        p = 2 * 2 / 3  # layer 2
        w = np.array([1.0, 2.0**p]) / (1.0 + 2.0**p)
        assert ws["model.layers.2.mlp.up_proj.weight"] == pytest.approx(tuple(w))
        assert ws["model.norm.weight"] == pytest.approx((0.5, 0.5))


def test_adapters_take_the_layer_count_from_their_base(
    tmp_path: Path, make_adapter: MakeAdapter
) -> None:
    a = [make_adapter(tmp_path / f"a{i}", seed=i) for i in range(2)]
    recipe = _recipe(
        tmp_path,
        method="linear",
        checkpoints=[{"path": str(a[0]), "weight": [1, 0]}, {"path": str(a[1]), "weight": [0, 1]}],
        lora_space="delta",
    )
    plan = mwakit.plan(recipe)
    assert plan.layers is not None and plan.layers["source"] == "config.json num_hidden_layers"
    ws = {t.name: t.weights for t in plan.tasks}
    assert ws["base_model.model.model.layers.0.self_attn.q_proj"] == (1.0, 0.0)
    assert ws["base_model.model.model.layers.1.self_attn.q_proj"] == (0.0, 1.0)


def test_plan_text_shows_every_layer(tmp_path: Path, models: list[Path]) -> None:
    data = {
        "method": "ties",
        "params": {"density": [0.2, 1.0]},
        "base_model": str(models[0]),
        "checkpoints": [str(models[1]), str(models[2])],
        "rules": [{"match": "*mlp*", "params": {"density": [1.0, 0.5]}}],
        "output": str(tmp_path / "o"),
    }
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(main, ["plan", str(f)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    head = next(i for i, x in enumerate(lines) if x.startswith("per-layer values: 4 layers"))
    assert lines[head + 1].split() == ["layer", "depth", "density", "density", "[*mlp*]"]
    assert lines[head + 2].split() == ["0", "0.000", "0.2", "1"]
    assert lines[head + 3].split() == ["1", "0.333", "0.466667", "0.833333"]
    assert lines[head + 5].split() == ["3", "1.000", "1", "0.5"]
    as_json = json.loads(CliRunner().invoke(main, ["plan", str(f), "--json"]).output)
    assert len(as_json["layers"]["per_layer"]) == LAYERS


def test_lists_apply_to_any_float_param_of_every_method() -> None:
    # Every float parameter of every registered method accepts a list (and ints do not).
    for name in mwakit.methods.method_names():
        cls = get_method(name).params
        for field, info in cls.model_fields.items():
            key = info.alias or field
            problems = lp.check(cls, {key: [info.default, info.default]})
            if info.annotation is float and isinstance(info.default, float):
                assert not problems, (name, field, problems)
            elif info.annotation in (int, bool, str):
                assert problems, (name, field)


def test_methods_lists_the_new_methods_and_which_params_vary() -> None:
    res = CliRunner().invoke(main, ["methods", "--json"])
    assert res.exit_code == 0
    docs = {d["name"]: d for d in json.loads(res.output)}
    for name in ("karcher", "multislerp", "nuslerp", "sce", "della_linear", "breadcrumbs_ties",
                 "nearswap", "passthrough"):  # fmt: skip
        assert name in docs
    assert docs["ties"]["params"]["density"]["per_layer"]
    assert docs["ties"]["params"]["lambda"]["per_layer"]
    assert not docs["della"]["params"]["seed"]["per_layer"]
    text = CliRunner().invoke(main, ["methods"]).output
    assert "density = 0.2 (or a per-layer list)" in text


def test_card_and_resolved_recipe_keep_a_per_layer_penalty(
    tmp_path: Path, models: list[Path]
) -> None:
    cks = [{"path": str(m), "metrics": {"loss": 1.0 + i}} for i, m in enumerate(models[:2])]
    res = mwakit.run(
        _recipe(tmp_path, method="mwa", params={"penalty": [0.0, 2.0]}, checkpoints=cks)
    )
    card = (res.path / "README.md").read_text()
    assert "penalty p = [0.0, 2.0] over the layers" in card
    again = yaml.safe_load((res.path / "mwakit.yaml").read_text())
    assert again["params"]["penalty"] == [0.0, 2.0]
