"""`mwakit convert`: mergekit configs (written from mergekit's documented formats) into
recipes — the translations, what is reported as untranslatable, the CLI, and merges of a
converted recipe checked against mergekit's formulas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

import mwakit
from mwakit.cli import main
from mwakit.convert import convert
from mwakit.errors import ConvertError
from mwakit.recipe import parse_recipe
from tests.methods.test_new_methods import mk_breadcrumbs_ties, mk_slerp

SLERP = """
slices:
  - sources:
      - model: OpenPipe/mistral-ft-optimized-1218
        layer_range: [0, 32]
      - model: mlabonne/NeuralHermes-2.5-Mistral-7B
        layer_range: [0, 32]
merge_method: slerp
base_model: OpenPipe/mistral-ft-optimized-1218
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""

TIES = """
models:
  - model: mistralai/Mistral-7B-v0.1
    # no parameters necessary for base model
  - model: OpenPipe/mistral-ft-optimized-1218
    parameters:
      density: 0.5
      weight: 0.5
  - model: mlabonne/NeuralHermes-2.5-Mistral-7B
    parameters:
      density: 0.5
      weight: 0.3
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  normalize: true
dtype: float16
"""

PASSTHROUGH = """
slices:
  - sources:
    - model: ./models/a
      layer_range: [0, 24]
  - sources:
    - model: ./models/b
      layer_range: [8, 32]
merge_method: passthrough
base_model: ./models/b
dtype: bfloat16
"""


def _conv(text: str) -> Any:
    return convert(yaml.safe_load(text), name="x")


def test_slerp_gradients_and_filters_become_rules() -> None:
    c = _conv(SLERP)
    assert c.recipe == {
        "name": "x",
        "method": "slerp",
        "params": {"t": 0.5},
        "rules": [
            {"match": "*self_attn*", "params": {"t": [0, 0.5, 0.3, 0.7, 1]}},
            {"match": "*mlp*", "params": {"t": [1, 0.5, 0.7, 0.3, 0]}},
        ],
        "checkpoints": [
            {"path": "hf://OpenPipe/mistral-ft-optimized-1218"},  # base_model: the t = 0 end
            {"path": "hf://mlabonne/NeuralHermes-2.5-Mistral-7B"},
        ],
        "out_dtype": "bfloat16",
        "output": {"path": "out/x"},
    }
    assert not c.untranslated
    assert any("layer_range [0, 32] is taken to cover the whole model" in n for n in c.notes)


def test_ties_keeps_mergekit_semantics() -> None:
    c = _conv(TIES)
    assert c.recipe["method"] == "ties"
    assert c.recipe["params"] == {"density": 0.5}
    assert c.recipe["base_model"] == "hf://mistralai/Mistral-7B-v0.1"
    assert c.recipe["checkpoints"] == [
        {"path": "hf://OpenPipe/mistral-ft-optimized-1218", "weight": 0.5},
        {"path": "hf://mlabonne/NeuralHermes-2.5-Mistral-7B", "weight": 0.3},
    ]
    assert not c.untranslated
    # mergekit's TIES default density is 1.0 (no trim), mwakit's 0.2: it is written out.
    no_density = TIES.replace("      density: 0.5\n", "")
    assert _conv(no_density).recipe["params"] == {"density": 1.0}


def test_passthrough_slices() -> None:
    c = _conv(PASSTHROUGH)
    assert c.recipe["checkpoints"] == [{"path": "./models/a"}, {"path": "./models/b"}]
    assert c.recipe["slices"] == [
        {"checkpoint": 0, "layers": [0, 24]},
        {"checkpoint": 1, "layers": [8, 32]},
    ]
    assert c.recipe["params"] == {"rest_from": 1}  # base_model: the other tensors


@pytest.mark.parametrize(
    ("method", "params", "want"),
    [
        ("dare_ties", {"density": 0.3}, {"drop_rate": 0.7}),
        (
            "dare_linear",
            {"density": [0.2, 0.6], "normalize": True},
            {"drop_rate": [0.8, 0.4], "normalize": True},
        ),
        ("breadcrumbs", {"density": 0.9, "gamma": 0.01}, {"density": 0.91, "gamma": 0.01}),
        ("breadcrumbs_ties", {"density": 1.0}, {"density": 1.0, "gamma": 0.0}),
        (
            "della",
            {"density": 0.5, "epsilon": 0.1, "lambda": 1.2},
            {"lambda": 1.2, "density": 0.5, "epsilon": 0.1},
        ),
        ("della_linear", {}, {"density": 1.0, "epsilon": 0.0}),
        ("sce", {"select_topk": 0.25}, {"select_topk": 0.25}),
        (
            "nuslerp",
            {"nuslerp_flatten": False, "nuslerp_row_wise": True},
            {"flatten": False, "row_wise": True},
        ),
        (
            "multislerp",
            {"normalize_weights": False, "eps": 1e-7},
            {"normalize_weights": False, "eps": 1e-7},
        ),
        ("model_stock", {"filter_wise": True}, {"filter_wise": True}),
        (
            "task_arithmetic",
            {"lambda": 0.7, "normalize": False},
            {"normalize": False, "lambda": 0.7},
        ),
    ],
)
def test_parameters_are_translated(
    method: str, params: dict[str, Any], want: dict[str, Any]
) -> None:
    doc = {
        "merge_method": method,
        "base_model": "org/base",
        "models": [{"model": "org/a", "parameters": {"weight": 1.0}}, {"model": "org/b"}],
        "parameters": params,
    }
    c = convert(doc)
    assert c.recipe.get("params", {}) == want
    assert c.recipe["base_model"] == "hf://org/base"
    assert [ck["path"] for ck in c.recipe["checkpoints"]] == ["hf://org/a", "hf://org/b"]
    assert not c.untranslated, c.untranslated


def test_karcher_and_nearswap_bases() -> None:
    k = convert(
        {
            "merge_method": "karcher",
            "base_model": "org/a",
            "models": [{"model": "org/a"}, {"model": "org/b"}],
        }
    )
    assert "base_model" not in k.recipe
    assert [c["path"] for c in k.recipe["checkpoints"]] == ["hf://org/a", "hf://org/b"]
    assert any("not used by karcher" in n for n in k.notes)
    n = convert(
        {
            "merge_method": "nearswap",
            "base_model": "org/base",
            "models": [{"model": "org/other"}, {"model": "org/base"}],
            "parameters": {"t": 0.0001},
        }
    )
    assert [c["path"] for c in n.recipe["checkpoints"]] == ["hf://org/base", "hf://org/other"]
    assert n.recipe["params"] == {"t": 0.0001}


def test_untranslatable_parts_are_named_one_line_each() -> None:
    doc = {
        "merge_method": "ties",
        "base_model": "org/base",
        "models": [
            {"model": "org/a+org/lora", "parameters": {"weight": 1}},
            {
                "model": "org/b",
                "parameters": {"density": 0.3, "weight": [{"filter": "mlp", "value": 2}]},
            },
            {"model": "org/c", "parameters": {"density": 0.6}},
        ],
        "parameters": {"normalize": False, "frobnicate": 1, "int8_mask": True},
        "tokenizer_source": "union",
        "chat_template": "chatml",
        "random_key": 3,
        "dtype": "int4",
    }
    c = convert(doc)
    text = "\n".join(c.untranslated)
    for needle in (
        "bakes a LoRA into its base",
        "filtered weights",
        "per-model density differs",
        "parameters.frobnicate",
        "normalize: false",
        "tokenizer_source: union",
        "chat_template",
        "random_key",
        "dtype: 'int4'",
    ):
        assert needle in text, needle
    assert "int8_mask" not in text  # a speed option: dropped silently
    assert all("\n" not in line for line in c.untranslated)
    assert c.recipe["params"]["density"] == 0.3  # the first model's, as reported
    yaml_text = c.to_yaml("mk.yaml")
    assert "# not translated: chat_template" in yaml_text
    parse_recipe(yaml.safe_load(yaml_text))


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        (["a"], "YAML mapping"),
        ({"merge_method": "arcee_fusion", "models": [{"model": "a/b"}]}, "no mwakit counterpart"),
        ({"merge_method": "linear"}, "no model could be translated"),
        (
            {"merge_method": "linear", "models": [{"model": "a/b+c/d"}]},
            "no model could be translated",
        ),
    ],
)
def test_nothing_usable_is_an_error(doc: Any, needle: str) -> None:
    with pytest.raises(ConvertError, match=needle):
        convert(doc)


def test_multi_slice_merges_are_reported() -> None:
    doc = {
        "merge_method": "slerp",
        "base_model": "a/x",
        "slices": [
            {
                "sources": [
                    {"model": "a/x", "layer_range": [0, 8]},
                    {"model": "a/y", "layer_range": [0, 8]},
                ]
            },
            {
                "sources": [
                    {"model": "a/x", "layer_range": [8, 16]},
                    {"model": "a/y", "layer_range": [8, 16]},
                ]
            },
        ],
        "parameters": {"t": 0.5},
    }
    with pytest.raises(ConvertError):
        convert(doc)


def test_cli_convert(tmp_path: Path) -> None:
    src = tmp_path / "mk.yaml"
    src.write_text(SLERP.replace("chat_template", "") + "tokenizer_source: union\n")
    runner = CliRunner()
    res = runner.invoke(main, ["convert", str(src)])
    assert res.exit_code == 0, res.output
    assert "cannot translate: tokenizer_source: union" in res.stderr
    recipe = yaml.safe_load(res.stdout)
    assert recipe["method"] == "slerp" and recipe["rules"][0]["match"] == "*self_attn*"
    out = tmp_path / "recipe.yaml"
    assert runner.invoke(main, ["convert", str(src), "-o", str(out)]).exit_code == 0
    assert yaml.safe_load(out.read_text())["method"] == "slerp"
    again = runner.invoke(main, ["convert", str(src), "-o", str(out)])
    assert again.exit_code == 2 and "--force" in again.stderr
    assert runner.invoke(main, ["convert", str(src), "-o", str(out), "--force"]).exit_code == 0
    res = runner.invoke(main, ["convert", str(src), "-o", str(tmp_path / "no" / "r.yaml")])
    assert res.exit_code == 1 and "cannot write the recipe" in res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: arcee_fusion\nmodels: [{model: a/b}]\n")
    res = runner.invoke(main, ["convert", str(bad)])
    assert res.exit_code == 1
    assert res.stderr.count("\n") == 1 and "no mwakit counterpart" in res.stderr
    assert "Traceback" not in res.output


# ---------------------------------------------------------------------------------------------
# Converted recipes merge as mergekit's formulas say


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from make_run import make_tiny_llama

    root = tmp_path_factory.mktemp("mk")
    shape = {"hidden": 16, "layers": 3, "intermediate": 32, "vocab": 32, "heads": 2}
    return [make_tiny_llama(root / f"m{i}", seed=i, kv_heads=1, **shape) for i in range(3)]


def _run(tmp: Path, doc: dict[str, Any]) -> dict[str, Any]:
    c = convert(doc, name="conv")
    c.recipe["output"] = {"path": str(tmp / "out"), "overwrite": True}
    res = mwakit.run(parse_recipe({**c.recipe, "device": "cpu"}))
    return load_file(res.path / "model.safetensors")


def _np(folder: Path) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in load_file(folder / "model.safetensors").items()}


def test_converted_slerp_gradient_matches_mergekit(tmp_path: Path, models: list[Path]) -> None:
    a, b = str(models[0]), str(models[1])
    doc = {
        "merge_method": "slerp",
        "base_model": a,
        "models": [{"model": a}, {"model": b}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"value": 0.3}]},
    }
    out, sa, sb = _run(tmp_path, doc), _np(models[0]), _np(models[1])
    for key in ("model.layers.1.self_attn.q_proj.weight", "model.layers.2.mlp.up_proj.weight",
                "model.embed_tokens.weight"):  # fmt: skip
        layer = int(key.split(".")[2]) if "layers" in key else 0
        t = float(np.interp(layer / 2, [0, 1], [0.1, 0.9])) if "self_attn" in key else 0.3
        want = mk_slerp(t, sa[key].reshape(-1), sb[key].reshape(-1)).reshape(sa[key].shape)
        np.testing.assert_allclose(out[key].double().numpy(), want, rtol=1e-4, atol=1e-5)


def test_converted_breadcrumbs_ties_matches_mergekit(tmp_path: Path, models: list[Path]) -> None:
    doc = {
        "merge_method": "breadcrumbs_ties",
        "base_model": str(models[0]),
        "models": [{"model": str(models[1])}, {"model": str(models[2])}],
        # Whole counts on 512 elements (top 64 dropped, bottom 192): rounding conventions of
        # fractional counts are not part of the formula.
        "parameters": {"density": 0.5, "gamma": 0.125},
    }
    out = _run(tmp_path, doc)
    s = [_np(m) for m in models]
    key = "model.layers.0.mlp.down_proj.weight"
    x = [s[i][key].reshape(-1).astype(np.float32).astype(np.float64) for i in (1, 2)]
    assert x[0].size == 512
    want = mk_breadcrumbs_ties(x, s[0][key].reshape(-1), density=0.5, gamma=0.125)
    np.testing.assert_allclose(out[key].double().numpy().reshape(-1), want, rtol=1e-5, atol=1e-6)


def test_top_level_weight_is_every_models_default() -> None:
    doc = {
        "merge_method": "linear",
        "models": [{"model": "org/a"}, {"model": "org/b", "parameters": {"weight": 3}}],
        "parameters": {"weight": [1, 2]},
    }
    c = convert(doc)
    assert [ck.get("weight") for ck in c.recipe["checkpoints"]] == [[1, 2], 3]
    assert "params" not in c.recipe
    dare = convert({**doc, "merge_method": "dare_linear", "base_model": "org/base"})
    assert any("restores each tensor's L1 norm" in n for n in dare.notes)


def test_a_multi_document_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "multi.yaml"
    f.write_text("name: a\nmerge_method: linear\nmodels: [{model: x/a}]\n---\nname: b\n")
    res = CliRunner().invoke(main, ["convert", str(f)])
    assert res.exit_code == 1 and "2 YAML documents" in res.stderr
