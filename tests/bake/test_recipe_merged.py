"""``output.format: merged``: a recipe merges and bakes in one pass, no adapter written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from mwakit import api
from mwakit.bake import bake
from mwakit.cli import main
from mwakit.errors import PlanError
from tests.bake.reference import greedy, load_folder
from tests.conftest import MakeAdapter


@pytest.fixture(scope="module")
def checkpoints(make_adapter: MakeAdapter, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return [make_adapter(root / f"c{i}", seed=10 + i, r=4, lora_alpha=8) for i in range(3)]


def _recipe(tmp: Path, cks: list[Path], out: Path, **kw: Any) -> Path:
    data: dict[str, Any] = {
        "method": "linear",
        "checkpoints": [{"path": str(c), "weight": w} for w, c in enumerate(cks, 1)],
        "device": "cpu",
        "output": {"path": str(out), **kw.pop("output", {})},
        **kw,
    }
    p = tmp / f"{out.name}.yaml"
    p.write_text(yaml.safe_dump(data), encoding="utf-8")
    return p


@pytest.mark.parametrize("space", ["factors", "delta"])
def test_merged_equals_run_then_bake(
    space: str, checkpoints: list[Path], tiny_base: Path, tmp_path: Path
) -> None:
    one = _recipe(tmp_path, checkpoints, tmp_path / "one", output={"format": "merged"},
                  lora_space=space)  # fmt: skip
    res = CliRunner().invoke(main, ["run", str(one)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = tmp_path / "one"
    assert not (out / "adapter_model.safetensors").exists()
    assert not (out / "adapter_config.json").exists()
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    # The same merge written as an adapter, then baked: the same model, byte for byte.
    two = _recipe(tmp_path, checkpoints, tmp_path / "two", lora_space=space)
    api.run(two)
    baked = bake(tmp_path / "two", tiny_base, tmp_path / "three").path
    a, b = load_folder(out), load_folder(baked)
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)
    if space == "delta":
        return  # the rest is the same for both spaces
    assert greedy(out) == greedy(baked)
    card = (out / "README.md").read_text()
    assert "base_model_relation: merge" in card and "baked into the weights" in card
    assert "Merged LoRA adapter" in card  # the run card's body: checkpoints, weights, recipe
    resolved = yaml.safe_load((out / "mwakit.yaml").read_text())
    assert resolved["output"]["format"] == "merged"
    # The resolved recipe re-runs into the same model.
    again = api.run(out / "mwakit.yaml", output=tmp_path / "again")
    c = load_folder(again.path)
    assert all(c[k].equal(a[k]) for k in a)


def test_base_model_overrides_the_adapters_base(
    checkpoints: list[Path], tiny_base: Path, tmp_path: Path
) -> None:
    from make_run import make_tiny_llama

    wide = make_tiny_llama(tmp_path / "wide", hidden=48)
    r = _recipe(tmp_path, checkpoints, tmp_path / "o", output={"format": "merged"},
                base_model=str(wide))  # fmt: skip
    with pytest.raises(PlanError, match=r"the base tensor .* is \[48"):
        api.run(r)
    assert not (tmp_path / "o").exists()


def test_merged_refused_for_full_model_merges(tmp_path: Path) -> None:
    from make_run import make_tiny_llama

    models = [make_tiny_llama(tmp_path / f"m{i}", seed=i) for i in range(2)]
    r = _recipe(tmp_path, models, tmp_path / "f", output={"format": "merged"})
    with pytest.raises(PlanError, match="already writes a full model"):
        api.run(r)
    assert not (tmp_path / "f").exists()


def test_format_is_validated(checkpoints: list[Path], tmp_path: Path) -> None:
    r = _recipe(tmp_path, checkpoints, tmp_path / "x", output={"format": "gguf"})
    res = CliRunner().invoke(main, ["validate", "--schema-only", str(r)])
    assert res.exit_code == 1 and "output.format" in res.output


def test_validate_and_plan_check_the_base(checkpoints: list[Path], tmp_path: Path) -> None:
    import json
    import shutil

    moved = []
    for i, c in enumerate(checkpoints):
        d = tmp_path / f"c{i}"
        shutil.copytree(c, d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(tmp_path / "gone")
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        moved.append(d)
    r = _recipe(tmp_path, moved, tmp_path / "o", output={"format": "merged"})
    for cmd in ("validate", "plan", "run"):
        res = CliRunner().invoke(main, [cmd, str(r)])
        assert res.exit_code == 1, res.output
        assert "base model folder not found" in res.output and "gone" in res.output
        assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_plan_says_the_output_is_baked(checkpoints: list[Path], tmp_path: Path) -> None:
    baked = _recipe(tmp_path, checkpoints, tmp_path / "o", output={"format": "merged"})
    res = CliRunner().invoke(main, ["plan", str(baked)])
    assert res.exit_code == 0, res.output
    assert "output: merged into the base model" in res.output
    plain = _recipe(tmp_path, checkpoints, tmp_path / "p")
    res = CliRunner().invoke(main, ["plan", str(plain)])
    assert res.exit_code == 0 and "merged into the base" not in res.output
