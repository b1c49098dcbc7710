"""The CLI through click's CliRunner: exit codes, one-line messages, nothing half-written."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from safetensors.torch import load_file, save_file

from mwakit.cli import main

from .conftest import MakeAdapter, trainer_state, write_trainer_state

LOSSES = {10: 1.0, 20: 0.8, 30: 0.5}


def _log(step: int, loss: float) -> list[tuple[int, float]]:
    # Loss 2.0 early on, then the checkpoint's loss at every step since the previous save
    # (save_steps 5): the default loss_window, since_save, and loss_window: 1 both read it.
    return [(s, 2.0) for s in range(1, step - 4)] + [(s, loss) for s in range(step - 4, step + 1)]


@pytest.fixture(scope="module")
def run_dir(make_adapter: MakeAdapter, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Trainer-style run: checkpoint-10/20/30 with trainer_state.json (losses 1.0, 0.8, 0.5)."""
    run = tmp_path_factory.mktemp("run") / "run"
    for i, (step, loss) in enumerate(LOSSES.items()):
        st = trainer_state(step, _log(step, loss), evals=[(step, loss + 0.1)])
        make_adapter(run / f"checkpoint-{step}", seed=i, r=4, lora_alpha=8, state=st)
    return run


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _recipe(tmp: Path, run_dir: Path, **kw: Any) -> Path:
    data: dict[str, Any] = {
        "method": "mwa",
        "params": {"metric": "loss", "penalty": 1.0},
        "select": {"run": str(run_dir)},
        "device": "cpu",
        "output": {"path": str(tmp / "out")},
    }
    data.update(kw)
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(data), encoding="utf-8")
    return p


def test_help_lists_commands() -> None:
    res = _invoke("--help")
    assert res.exit_code == 0
    for cmd in ("run", "plan", "validate", "inspect", "methods"):
        assert cmd in res.output


def test_unknown_option_is_usage_error() -> None:
    res = CliRunner().invoke(main, ["run", "--frobnicate", "x.yaml"])
    assert res.exit_code == 2


def test_validate_ok_and_bad(tmp_path: Path, run_dir: Path) -> None:
    good = _recipe(tmp_path, run_dir)
    res = _invoke("validate", str(good))
    assert res.exit_code == 0 and res.output.startswith("ok:")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "method": "mwa",
                "params": {"penalty": -2, "metrc": "loss"},
                "checkpoints": [],
                "output": {},
            }
        ),
        encoding="utf-8",
    )
    res = _invoke("validate", str(bad))
    assert res.exit_code == 1
    assert "problems" in res.output
    for loc in ("params.penalty", "params.metrc", "output.path", "checkpoints"):
        assert f"  {loc}" in res.output, res.output
    assert "Traceback" not in res.output


def test_plan_json_has_checkpoints_with_weights_and_metrics(tmp_path: Path, run_dir: Path) -> None:
    res = _invoke("plan", "--json", str(_recipe(tmp_path, run_dir)))
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    cks = doc["checkpoints"]
    names = [Path(c["path"]).name for c in cks]
    assert names == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    assert [c["weight"] for c in cks] == pytest.approx([4 / 17, 5 / 17, 8 / 17])
    assert [c["metrics"]["loss"] for c in cks] == [1.0, 0.8, 0.5]
    assert cks[2]["metrics"]["eval_loss"] == pytest.approx(0.6)
    assert doc["summary"]["lora_modules"] == 14
    assert not (tmp_path / "out").exists(), "plan must not write anything"


def test_plan_text(tmp_path: Path, run_dir: Path) -> None:
    res = _invoke("plan", str(_recipe(tmp_path, run_dir)))
    assert res.exit_code == 0
    assert "checkpoint-30" in res.output and "0.470588" in res.output
    assert "14 LoRA modules" in res.output


def test_run_writes_folder_then_refuses_to_overwrite(tmp_path: Path, run_dir: Path) -> None:
    recipe = _recipe(tmp_path, run_dir)
    res = _invoke("run", str(recipe))
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        ".mwakit-manifest.json",  # what mwakit wrote: lets --force recognise its own output
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "mwakit.yaml",
        "weights.png",
    ]
    before = (out / "adapter_model.safetensors").read_bytes()
    res = _invoke("run", str(recipe))
    assert res.exit_code == 1
    assert "already exists" in res.output and "--force" in res.output
    assert (out / "adapter_model.safetensors").read_bytes() == before
    res = _invoke("run", "--force", "--quiet", str(recipe))
    assert res.exit_code == 0 and res.output == ""
    # The resolved recipe alone re-runs the merge to the same bytes.
    res = _invoke("run", "-q", str(out / "mwakit.yaml"), "-o", str(tmp_path / "again"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == before


def test_card_front_matter_and_table(tmp_path: Path, run_dir: Path) -> None:
    _invoke("run", "-q", str(_recipe(tmp_path, run_dir)))
    card = (tmp_path / "out" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft"
    assert {"mwakit", "merge", "lora", "mwa"} <= set(front["tags"])
    assert front["pipeline_tag"] == "text-generation"
    # The tiny base is a local path: the Hub takes only repo ids, so the body names it.
    assert "base_model" not in front and "- Base model: `/" in card
    assert "transform: power" in card and "0.470588" in card
    assert "```yaml" in card


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        ("nan_loss", "checkpoint-20"),
        ("negative_loss", "transform: rank"),
        ("missing_weights", "no adapter_model.safetensors"),
        ("nan_tensor", "holds NaN or Inf"),
        ("rank_mismatch", "use lora_space: delta"),
        ("bad_config_json", "not valid JSON"),
    ],
)
def test_bad_inputs_fail_cleanly_and_write_nothing(
    tmp_path: Path, run_dir: Path, make_adapter: MakeAdapter, mutate: str, needle: str
) -> None:
    run = _copy_run(run_dir, tmp_path / "run")
    ck = run / "checkpoint-20"
    if mutate in ("nan_loss", "negative_loss"):
        value = math.nan if mutate == "nan_loss" else -0.5
        write_trainer_state(ck, trainer_state(20, [(20, value)]))
    elif mutate == "missing_weights":
        (ck / "adapter_model.safetensors").unlink()
    elif mutate == "nan_tensor":
        t = load_file(ck / "adapter_model.safetensors")
        key = sorted(k for k in t if "lora_B" in k)[3]
        t[key][0, 0] = math.inf
        save_file(t, ck / "adapter_model.safetensors", metadata={"format": "pt"})
    elif mutate == "rank_mismatch":
        import shutil

        shutil.rmtree(ck)
        make_adapter(ck, seed=5, r=8, lora_alpha=16, state=trainer_state(20, [(20, 0.8)]))
    elif mutate == "bad_config_json":
        (ck / "adapter_config.json").write_text("{not json", encoding="utf-8")
    res = _invoke("run", str(_recipe(tmp_path, run)))
    assert res.exit_code == 1, res.output
    assert needle in res.output, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "mwakit-tmp" in p.name]


def test_debug_shows_traceback(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["--debug", "plan", str(tmp_path / "missing.yaml")])
    assert res.exit_code != 0 and res.exception is not None


def test_inspect_checkpoint_and_run(run_dir: Path) -> None:
    res = _invoke("inspect", str(run_dir / "checkpoint-10"))
    assert res.exit_code == 0
    assert "LORA adapter, r=4, lora_alpha=8" in res.output and "loss=1" in res.output
    res = _invoke("inspect", "--json", str(run_dir))
    doc = json.loads(res.output)
    assert doc["kind"] == "run" and [c["step"] for c in doc["checkpoints"]] == [10, 20, 30]
    assert doc["checkpoints"][0]["lora_modules"] == 14
    assert doc["checkpoints"][0]["ranks"] == {"4": 14}


def test_inspect_not_a_checkpoint(tmp_path: Path) -> None:
    res = _invoke("inspect", str(tmp_path))
    assert res.exit_code == 1 and "not a checkpoint" in res.output


def test_methods_lists_params() -> None:
    res = _invoke("methods", "--json")
    docs = {d["name"]: d for d in json.loads(res.output)}
    assert {"mwa", "linear"} <= set(docs)
    assert set(docs["mwa"]["params"]) == {"metric", "penalty", "transform", "higher_is_better"}
    assert docs["mwa"]["params"]["transform"]["choices"] == ["power", "softmax", "rank"]
    res = _invoke("methods")
    assert "penalty" in res.output and res.exit_code == 0
