"""Reading metrics from real-shaped trainer_state.json files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mwakit.errors import SourceError
from mwakit.trainer_state import read_metrics, step_from_name

from .conftest import trainer_state, write_trainer_state


def _ck(tmp: Path, step: int) -> Path:
    d = tmp / f"checkpoint-{step}"
    d.mkdir()
    return d


def test_step_from_name() -> None:
    assert step_from_name("checkpoint-500") == 500
    assert step_from_name("checkpoint-500-old") is None
    assert step_from_name("adapter") is None


def test_loss_is_last_logged_at_or_before_global_step(tmp_path: Path) -> None:
    # Logged every 4 steps; checkpoint at 10 → the step-8 loss (windowed, older than 10).
    d = _ck(tmp_path, 10)
    write_trainer_state(d, trainer_state(10, [(4, 2.0), (8, 1.5)], evals=[(5, 1.9), (10, 1.4)]))
    m = read_metrics(d)
    assert m.step == 10 and m.source == str(d / "trainer_state.json")
    assert m.metrics["loss"] == 1.5 and m.metrics["step"] == 10
    assert m.metrics["eval_loss"] == 1.4  # the eval at exactly step 10
    assert m.metrics["grad_norm"] == pytest.approx(1 / 8)


def test_loss_window_means_the_last_n(tmp_path: Path) -> None:
    d = _ck(tmp_path, 6)
    write_trainer_state(d, trainer_state(6, [(s, float(s)) for s in range(1, 7)]))
    assert read_metrics(d, loss_window=3).metrics["loss"] == pytest.approx(5.0)
    assert read_metrics(d, loss_window=100).metrics["loss"] == pytest.approx(3.5)


def test_eval_falls_back_to_latest_before(tmp_path: Path) -> None:
    d = _ck(tmp_path, 12)
    write_trainer_state(d, trainer_state(12, [(12, 1.0)], evals=[(5, 2.0), (10, 1.7)]))
    assert read_metrics(d).metrics["eval_loss"] == 1.7


def test_root_state_is_filtered_by_step(tmp_path: Path) -> None:
    # A whole-run trainer_state.json copied into an early checkpoint: later logs are ignored.
    d = _ck(tmp_path, 20)
    st = trainer_state(20, [(10, 2.0), (20, 1.0), (30, 0.5)], evals=[(20, 1.1), (30, 0.6)])
    st["log_history"].append({"epoch": 1.0, "step": 30, "train_loss": 1.2, "train_runtime": 3.0})
    write_trainer_state(d, st)
    m = read_metrics(d).metrics
    assert m["loss"] == 1.0 and m["eval_loss"] == 1.1 and "train_loss" not in m


def test_nan_values_are_kept_for_a_later_named_error(tmp_path: Path) -> None:
    d = _ck(tmp_path, 5)
    write_trainer_state(d, trainer_state(5, [(5, math.nan)]))
    assert "NaN" in (d / "trainer_state.json").read_text()
    assert math.isnan(read_metrics(d).metrics["loss"])


def test_trl_keys(tmp_path: Path) -> None:
    d = _ck(tmp_path, 8)
    st = trainer_state(8, [(8, 0.69)], extra_train={"rewards/accuracies": 0.75})
    st["log_history"].append({"eval_loss": 0.6, "eval_rewards/margins": 0.3, "step": 8})
    write_trainer_state(d, st)
    m = read_metrics(d).metrics
    assert m["rewards/accuracies"] == 0.75 and m["eval_rewards/margins"] == 0.3


def test_no_trainer_state_uses_folder_name(tmp_path: Path) -> None:
    m = read_metrics(_ck(tmp_path, 40))
    assert m.step == 40 and m.metrics == {"step": 40.0} and m.source is None
    other = tmp_path / "adapter"
    other.mkdir()
    assert read_metrics(other).metrics == {}


@pytest.mark.parametrize("text", ["{not json", '{"global_step": 3}', "[]"])
def test_malformed_state_is_a_source_error(tmp_path: Path, text: str) -> None:
    d = _ck(tmp_path, 3)
    (d / "trainer_state.json").write_text(text)
    with pytest.raises(SourceError) as exc:
        read_metrics(d)
    assert exc.value.where == str(d / "trainer_state.json")


def test_real_trainer_run(tmp_path: Path) -> None:
    """The state written by a real Trainer run (examples/make_run.py) reads as expected."""
    from make_run import make_run

    run = make_run(tmp_path / "run", steps=10, save_steps=5, eval_steps=5)
    m5, m10 = (read_metrics(run / f"checkpoint-{s}").metrics for s in (5, 10))
    assert m5["step"] == 5 and m10["step"] == 10
    assert {"loss", "eval_loss", "learning_rate", "grad_norm", "epoch"} <= set(m10)
    assert m5["loss"] != m10["loss"]
