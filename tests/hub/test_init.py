"""`mwakit init` prints a recipe that validate/plan/run accept as is; `plan --plot`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from mwakit.cli import main

from .conftest import REPO, SHA


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _init(tmp: Path, *args: str) -> Path:
    res = _invoke("init", *args, "--output", str(tmp / "out"))
    assert res.exit_code == 0, res.output
    recipe = tmp / "recipe.yaml"
    recipe.write_text(res.output, encoding="utf-8")
    return recipe


def test_init_round_trip_validate_plan_run(tmp_path: Path, hub_run: Path) -> None:
    recipe = _init(tmp_path, str(hub_run), "--last", "2", "--penalty", "1.0")
    text = recipe.read_text()
    assert "# loss=0.8, step=20" in text and "# loss=0.5, step=30" in text
    assert "checkpoint-10" not in text.split("checkpoints:")[1].split("# select")[0]
    assert _invoke("validate", str(recipe)).exit_code == 0
    res = _invoke("plan", "--json", str(recipe))
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert [c["step"] for c in doc["checkpoints"]] == [20, 30]
    assert [c["weight"] for c in doc["checkpoints"]] == pytest.approx([5 / 13, 8 / 13])
    res = _invoke("run", "-q", str(recipe))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("method", ["linear", "ties", "task_arithmetic"])
def test_init_other_methods_plan(tmp_path: Path, hub_run: Path, method: str) -> None:
    recipe = _init(tmp_path, str(hub_run), "--method", method, "--metric", "eval_loss")
    data = yaml.safe_load(recipe.read_text())
    assert data["weighting"] == {"mwa": {"metric": "eval_loss", "penalty": 0.7}}
    # No eval in this run: the comments say so before anything runs.
    assert "NO `eval_loss`" in recipe.read_text()
    assert _invoke("validate", "--schema-only", str(recipe)).exit_code == 0
    # The metric really is missing: validate (which reads the checkpoints) says so, as plan does.
    for cmd in ("validate", "plan"):
        res = _invoke(cmd, str(recipe))
        assert res.exit_code == 1 and "eval_loss" in res.output, res.output
    recipe.write_text(recipe.read_text().replace('"eval_loss"', '"loss"'), encoding="utf-8")
    res = _invoke("plan", str(recipe))
    assert res.exit_code == 0, res.output


def test_init_from_hub_pins_the_commit(tmp_path: Path, hub_cache: Path) -> None:
    recipe = _init(tmp_path, f"hf://{REPO}@main", "--last", "2")
    data = yaml.safe_load(recipe.read_text())
    assert data["checkpoints"] == [f"hf://{REPO}@{SHA}/checkpoint-{s}" for s in (20, 30)]
    assert f"{REPO} at commit {SHA}" in recipe.read_text()
    res = _invoke("run", "-q", str(recipe))
    assert res.exit_code == 0, res.output


def test_init_errors(tmp_path: Path, hub_run: Path) -> None:
    res = _invoke("init", str(tmp_path))
    assert res.exit_code == 1 and "no checkpoint-<step>/ folders" in res.output
    res = _invoke("init", str(hub_run), "--method", "nope")
    assert res.exit_code == 2 and "unknown method" in res.output
    res = _invoke("init", "hf://just-a-name")
    assert res.exit_code == 2 and "expected hf://org/repo" in res.output
    assert "internal error" not in res.output


def test_plan_plot_draws_the_card_plot(tmp_path: Path, hub_run: Path) -> None:
    recipe = _init(tmp_path, str(hub_run))
    png = tmp_path / "w.png"
    res = _invoke("plan", str(recipe), "--plot", str(png))
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "out").exists()
    _invoke("run", "-q", str(recipe))
    assert (tmp_path / "out" / "weights.png").read_bytes() == png.read_bytes()
