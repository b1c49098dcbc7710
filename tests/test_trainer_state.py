"""Reading metrics from trainer_state.json files laid out as `transformers.TrainerState` does.

The fixtures mirror a real run: sorted keys, indent 2, train/eval entries interleaved in
log_history (log → evaluate → save within a step) and, for a root state, the end-of-training
summary entry.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from mwakit.errors import SourceError
from mwakit.trainer_state import CheckpointMetrics, read_metrics, step_from_name

MAX_STEPS = 40
STEPS_PER_EPOCH = 20


def _epoch(step: int) -> float:
    return round(step / STEPS_PER_EPOCH, 4)


def _train(step: int, loss: float, **extra: float) -> dict[str, Any]:
    return {
        "epoch": _epoch(step),
        "grad_norm": 1.0 / step,
        "learning_rate": 2e-4 * (1 - step / MAX_STEPS),
        "loss": loss,
        "step": step,
        **extra,
    }


def _eval(step: int, eval_loss: float, **extra: float) -> dict[str, Any]:
    return {
        "epoch": _epoch(step),
        "eval_loss": eval_loss,
        "eval_runtime": 0.8123,
        "eval_samples_per_second": 78.79,
        "eval_steps_per_second": 9.85,
        "step": step,
        **extra,
    }


def _summary(step: int, train_loss: float) -> dict[str, Any]:
    return {
        "epoch": _epoch(step),
        "step": step,
        "total_flos": 1.2345e14,
        "train_loss": train_loss,
        "train_runtime": 61.2,
        "train_samples_per_second": 5.23,
        "train_steps_per_second": 0.654,
    }


def _state(global_step: int, log_history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "best_global_step": None,
        "best_metric": None,
        "best_model_checkpoint": None,
        "epoch": _epoch(global_step),
        "eval_steps": 10,
        "global_step": global_step,
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "log_history": list(log_history),
        "logging_steps": 4,
        "max_steps": MAX_STEPS,
        "num_input_tokens_seen": 0,
        "num_train_epochs": 2,
        "save_steps": 10,
        "stateful_callbacks": {
            "TrainerControl": {
                "args": {
                    "should_epoch_stop": False,
                    "should_evaluate": False,
                    "should_log": False,
                    "should_save": True,
                    "should_training_stop": False,
                },
                "attributes": {},
            }
        },
        "total_flos": 1.2345e14,
        "train_batch_size": 8,
        "trial_name": None,
        "trial_params": None,
    }


def _write(folder: Path, state: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    # The Trainer writes json.dumps(asdict(state), indent=2, sort_keys=True) + "\n"; NaN/inf
    # come out as NaN/Infinity, as in a diverged run.
    (folder / "trainer_state.json").write_text(
        json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return folder


# A 40-step run logging every 4 steps, evaluating and saving every 10.
RUN = [
    _train(4, 2.1),
    _train(8, 1.8),
    _eval(10, 1.75),
    _train(12, 1.5),
    _train(16, 1.3),
    _train(20, 1.2),  # within a step the Trainer logs, then evaluates, then saves
    _eval(20, 1.25),
    _train(24, 1.1),
    _train(28, 1.0),
    _eval(30, 1.05),
    _train(32, 0.9),
    _train(36, 0.85),
    _train(40, 0.8),
    _eval(40, 0.95),
    _summary(40, 1.29),
]


def _checkpoint(tmp: Path, step: int, history: Sequence[dict[str, Any]] | None = None) -> Path:
    """checkpoint-<step> as the Trainer saves it: the log up to and including that step."""
    entries = [e for e in (RUN if history is None else history) if e["step"] <= step]
    return _write(tmp / f"checkpoint-{step}", _state(step, entries))


def test_step_from_name() -> None:
    assert step_from_name("checkpoint-500") == 500
    assert step_from_name("checkpoint-0") == 0
    assert step_from_name("checkpoint-500-old") is None
    assert step_from_name("old-checkpoint-500") is None
    assert step_from_name("checkpoint-") is None
    assert step_from_name("adapter") is None


def test_checkpoint_metrics_are_read(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path, 20)
    m = read_metrics(d)
    assert m == CheckpointMetrics(
        step=20,
        metrics={
            "step": 20.0,
            "epoch": 1.0,
            # The default loss_window, since_save: the losses logged at steps 12, 16 and 20,
            # after checkpoint-10 (save_steps 10).
            "loss": pytest.approx((1.5 + 1.3 + 1.2) / 3),
            "grad_norm": 1 / 20,
            "learning_rate": 2e-4 * 0.5,
            "eval_loss": 1.25,
            "eval_runtime": 0.8123,
            "eval_samples_per_second": 78.79,
            "eval_steps_per_second": 9.85,
        },
        source=str(d / "trainer_state.json"),
    )


def test_loss_is_last_logged_before_global_step(tmp_path: Path) -> None:
    # Logged every 4 steps: checkpoint-10's last train log is at step 8 (older than 10), and the
    # other train keys come from that same entry.
    m = read_metrics(_checkpoint(tmp_path, 10), loss_window=1).metrics
    assert m["step"] == 10.0 and m["epoch"] == 0.5
    assert m["loss"] == 1.8
    assert m["grad_norm"] == 1 / 8
    assert m["learning_rate"] == pytest.approx(2e-4 * (1 - 8 / 40))


def test_loss_window_means_the_last_n(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path, 30)  # train losses ≤ 30: 2.1, 1.8, 1.5, 1.3, 1.2, 1.1, 1.0
    assert read_metrics(d, loss_window=1).metrics["loss"] == 1.0
    assert read_metrics(d, loss_window=3).metrics["loss"] == pytest.approx((1.2 + 1.1 + 1.0) / 3)
    # A window longer than the log averages everything there is.
    everything = (2.1 + 1.8 + 1.5 + 1.3 + 1.2 + 1.1 + 1.0) / 7
    assert read_metrics(d, loss_window=100).metrics["loss"] == pytest.approx(everything)
    with pytest.raises(ValueError, match="loss_window"):
        read_metrics(d, loss_window=0)


def test_since_save_means_the_losses_after_the_previous_save(tmp_path: Path) -> None:
    # save_steps 10: checkpoint-30 averages the losses logged at 24 and 28 (after step 20).
    d = _checkpoint(tmp_path, 30)
    assert read_metrics(d).metrics["loss"] == pytest.approx((1.1 + 1.0) / 2)
    assert read_metrics(d, loss_window="since_save").metrics == read_metrics(d).metrics
    # The first checkpoint averages everything logged before it.
    assert read_metrics(_checkpoint(tmp_path, 10)).metrics["loss"] == pytest.approx(1.95)


def test_since_save_takes_a_later_sibling_checkpoint(tmp_path: Path) -> None:
    # Saving by epoch leaves save_steps at an unused value (500 here): checkpoint-25 beside
    # checkpoint-40 is the previous save, so the window is steps 28 … 40.
    state = _state(40, [e for e in RUN if e["step"] <= 40])
    state["save_steps"] = 500
    d = _write(tmp_path / "checkpoint-40", state)
    _write(tmp_path / "checkpoint-25", _state(25, [e for e in RUN if e["step"] <= 25]))
    (tmp_path / "checkpoint-60").mkdir()  # a later one never counts
    assert read_metrics(d).metrics["loss"] == pytest.approx((1.0 + 0.9 + 0.85 + 0.8) / 4)


def test_since_save_with_nothing_logged_since_keeps_the_last_loss(tmp_path: Path) -> None:
    # Logging every 8 steps, saving every 2: checkpoint-10 saw no log since checkpoint-8…
    history = [_train(8, 1.6)]
    state = _state(10, history)
    state["save_steps"] = 2
    assert read_metrics(_write(tmp_path / "checkpoint-10", state)).metrics["loss"] == 1.6
    # … and a state with no step at all (no global_step, no checkpoint-<N> name) too.
    state = _state(10, [_train(4, 2.0), _train(8, 1.6)])
    del state["global_step"]
    assert read_metrics(_write(tmp_path / "adapter", state)).metrics["loss"] == 1.6


def test_eval_at_exact_step_vs_latest_before(tmp_path: Path) -> None:
    # eval_steps divides 30: the step-30 evaluation is already in checkpoint-30.
    assert read_metrics(_checkpoint(tmp_path, 30)).metrics["eval_loss"] == 1.05
    # A checkpoint at step 36 (save_steps not a multiple of eval_steps): latest eval, step 30.
    m = read_metrics(_checkpoint(tmp_path, 36), loss_window=1).metrics
    assert m["eval_loss"] == 1.05 and m["loss"] == 0.85


def test_eval_entries_of_a_dict_eval_dataset_are_merged(tmp_path: Path) -> None:
    # eval_dataset={"gsm8k": …, "mmlu": …} logs one entry per dataset at the same step.
    history = [
        _train(10, 1.4),
        {"epoch": 0.5, "eval_gsm8k_loss": 1.1, "eval_gsm8k_runtime": 0.3, "step": 10},
        {"epoch": 0.5, "eval_mmlu_loss": 2.2, "eval_mmlu_runtime": 0.4, "step": 10},
    ]
    m = read_metrics(_checkpoint(tmp_path, 10, history)).metrics
    assert m["eval_gsm8k_loss"] == 1.1 and m["eval_mmlu_loss"] == 2.2
    assert "eval_loss" not in m  # some evaluators never log it


def test_root_state_is_filtered_by_step(tmp_path: Path) -> None:
    # A whole-run trainer_state.json (trainer.save_state()) copied into checkpoint-20: later
    # logs, later evals and the end-of-training summary must not leak in.
    d = _write(tmp_path / "checkpoint-20", _state(40, RUN))
    state = json.loads((d / "trainer_state.json").read_text())
    state["global_step"] = 20
    state["epoch"] = 1.0
    _write(d, state)
    m = read_metrics(d, loss_window=1).metrics
    assert m["loss"] == 1.2 and m["eval_loss"] == 1.25 and "train_loss" not in m


def test_root_state_of_the_finished_run(tmp_path: Path) -> None:
    # The run folder itself: no step in the name, global_step 40, summary included.
    d = _write(tmp_path / "run", _state(40, RUN))
    m = read_metrics(d, loss_window=1)
    assert m.step == 40
    assert m.metrics["train_loss"] == 1.29
    assert m.metrics["loss"] == 0.8 and m.metrics["eval_loss"] == 0.95
    assert "total_flos" not in m.metrics and "train_runtime" not in m.metrics


def test_step_falls_back_to_the_folder_name(tmp_path: Path) -> None:
    state = _state(20, RUN)  # a whole-run log: the folder's step must filter it
    del state["global_step"]
    m = read_metrics(_write(tmp_path / "checkpoint-20", state), loss_window=1)
    assert m.step == 20 and m.metrics["loss"] == 1.2 and m.metrics["eval_loss"] == 1.25


def test_nan_and_inf_are_kept(tmp_path: Path) -> None:
    history = [_train(4, 1.0), _train(8, math.nan, grad_norm=math.inf), _eval(8, math.inf)]
    d = _checkpoint(tmp_path, 8, history)
    text = (d / "trainer_state.json").read_text()
    assert "NaN" in text and "Infinity" in text
    m = read_metrics(d).metrics
    assert math.isnan(m["loss"]) and m["grad_norm"] == math.inf and m["eval_loss"] == math.inf
    # A window that mixes inf and -inf gives NaN (the weighting step reports it by name).
    history = [_train(4, math.inf), _train(8, -math.inf)]
    mixed = read_metrics(_checkpoint(tmp_path / "b", 8, history), loss_window=2)
    assert math.isnan(mixed.metrics["loss"])


def test_trl_keys(tmp_path: Path) -> None:
    # DPOTrainer logs its buffered metrics in the same entries as loss / eval_loss.
    history = [
        _train(
            8,
            0.6931,
            **{"rewards/accuracies": 0.75, "rewards/margins": 0.12, "logps/chosen": -80.5},
        ),
        _eval(8, 0.65, **{"eval_rewards/accuracies": 0.8, "eval_rewards/margins": 0.3}),
    ]
    m = read_metrics(_checkpoint(tmp_path, 8, history)).metrics
    assert m["rewards/accuracies"] == 0.75 and m["logps/chosen"] == -80.5
    assert m["eval_rewards/margins"] == 0.3 and m["eval_rewards/accuracies"] == 0.8


def test_non_numeric_values_are_skipped(tmp_path: Path) -> None:
    history = [{**_train(4, 1.0), "note": "warmup", "flag": True, "hist": [1, 2]}]
    m = read_metrics(_checkpoint(tmp_path, 4, history)).metrics
    assert m["loss"] == 1.0 and not {"note", "flag", "hist"} & set(m)


def test_no_trainer_state_uses_the_folder_name(tmp_path: Path) -> None:
    d = tmp_path / "checkpoint-40"
    d.mkdir()
    assert read_metrics(d) == CheckpointMetrics(step=40, metrics={"step": 40.0}, source=None)
    other = tmp_path / "my-adapter"
    other.mkdir()
    assert read_metrics(other) == CheckpointMetrics(step=None, metrics={}, source=None)


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("{not json", "unreadable"),
        ("[]", "JSON list, not an object"),
        ('{"global_step": 3}', "no log_history list"),
        ('{"global_step": 3, "log_history": {}}', "no log_history list"),
        ('{"global_step": 3, "log_history": [1]}', "log_history[0]"),
        ('{"global_step": 3, "log_history": [{"loss": 1.0}]}', "log_history[0]"),
        ('{"global_step": 3, "log_history": [{"loss": 1.0, "step": "3"}]}', "numeric step"),
        ('{"global_step": "3", "log_history": []}', "global_step is '3'"),
        ('{"global_step": true, "log_history": []}', "global_step is True"),
    ],
)
def test_malformed_state_is_a_source_error(tmp_path: Path, text: str, what: str) -> None:
    d = tmp_path / "checkpoint-3"
    d.mkdir()
    (d / "trainer_state.json").write_text(text)
    with pytest.raises(SourceError) as exc:
        read_metrics(d)
    assert exc.value.where == str(d / "trainer_state.json")
    assert what in exc.value.what
    assert "metrics" in (exc.value.fix or "")


def test_real_trainer_run(tmp_path: Path) -> None:
    """The state written by a real Trainer run (examples/make_run.py) reads as expected."""
    from make_run import make_run

    run = make_run(tmp_path / "run", steps=10, save_steps=5, eval_steps=5)
    m5, m10 = (read_metrics(run / f"checkpoint-{s}").metrics for s in (5, 10))
    assert m5["step"] == 5 and m10["step"] == 10
    assert {"loss", "eval_loss", "learning_rate", "grad_norm", "epoch"} <= set(m10)
    assert m5["loss"] != m10["loss"]
