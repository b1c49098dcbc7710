"""Metrics of a Trainer checkpoint, read from its ``trainer_state.json``. No torch.

Facts (shared/reference/formats.md §3): ``log_history`` holds train entries
``{loss, grad_norm, learning_rate, epoch, step}`` (``loss`` is the mean since the previous log),
eval entries ``{eval_loss, eval_*, epoch, step}`` and a final summary with ``train_loss``. Within
a step the Trainer logs, then evaluates, then saves, so checkpoint-N already holds the step-N
evaluation. A root ``trainer_state.json`` covers the whole run, hence the filter by step. The
JSON may contain NaN/Infinity; those values are kept and rejected later with the checkpoint name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mwakit.errors import SourceError

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def step_from_name(name: str) -> int | None:
    """The step in a ``checkpoint-<step>`` folder name, else None."""
    m = _CHECKPOINT.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class CheckpointMetrics:
    """Metrics found for one checkpoint.

    Attributes:
        step: The checkpoint's global step, if known.
        metrics: Metric name → value (``step``, ``loss``, ``eval_*``, other logged keys).
        source: The trainer_state.json used, or None.
    """

    step: int | None
    metrics: dict[str, float] = field(hash=False)
    source: str | None


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def read_metrics(checkpoint_dir: Path, *, loss_window: int = 1) -> CheckpointMetrics:
    """Read a checkpoint's metrics from its ``trainer_state.json``.

    Args:
        checkpoint_dir: The ``checkpoint-<step>/`` folder.
        loss_window: Average the last n logged training losses at or before the step.

    Raises:
        SourceError: trainer_state.json exists but is malformed.
    """
    name_step = step_from_name(checkpoint_dir.name)
    path = checkpoint_dir / "trainer_state.json"
    if not path.is_file():
        found = {} if name_step is None else {"step": float(name_step)}
        return CheckpointMetrics(step=name_step, metrics=found, source=None)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SourceError(
            f"trainer_state.json is unreadable ({err})",
            where=str(path),
            fix="restore the file the Trainer wrote, or give metrics in the recipe",
        ) from err
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
        raise SourceError(
            "trainer_state.json has no log_history list",
            where=str(path),
            fix="restore the file the Trainer wrote, or give metrics in the recipe",
        )
    gs = state.get("global_step")
    step = int(gs) if isinstance(gs, int) and not isinstance(gs, bool) else name_step
    limit = step if step is not None else math.inf
    entries = [e for e in history if (_num(e.get("step")) or 0) <= limit]

    metrics: dict[str, float] = {}
    if step is not None:
        metrics["step"] = float(step)
    epoch = _num(state.get("epoch"))
    if epoch is not None:
        metrics["epoch"] = epoch
    train = [e for e in entries if _num(e.get("loss")) is not None]
    if train:
        last = train[-1]
        for k, v in last.items():
            if k not in ("step", "epoch", "loss") and (x := _num(v)) is not None:
                metrics[k] = x
        window = [float(e["loss"]) for e in train[-loss_window:]]
        metrics["loss"] = math.fsum(window) / len(window)
    evals = [e for e in entries if any(k.startswith("eval_") for k in e)]
    if evals:
        at_step = [e for e in evals if _num(e.get("step")) == step]
        chosen = at_step[-1] if at_step else evals[-1]
        for k, v in chosen.items():
            if k.startswith("eval_") and (x := _num(v)) is not None:
                metrics[k] = x
    for e in entries:
        if (x := _num(e.get("train_loss"))) is not None:
            metrics["train_loss"] = x
    return CheckpointMetrics(step=step, metrics=metrics, source=str(path))
