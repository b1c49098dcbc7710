"""Metrics of a Trainer checkpoint, read from its ``trainer_state.json``. No torch.

Facts (shared/reference/formats.md §3): ``log_history`` holds train entries
``{loss, grad_norm, learning_rate, epoch, step}`` (``loss`` is the mean since the previous log,
so the last one may be older than the checkpoint), eval entries ``{eval_loss, eval_*, epoch,
step}`` and a final summary with ``train_loss``. Within a step the Trainer logs, then
evaluates, then saves, so checkpoint-N already holds the step-N evaluation. A root
``trainer_state.json`` covers the whole run, hence every entry is filtered by step. TRL trainers
add their keys (``rewards/accuracies``, ``eval_rewards/margins``) to the same entries. The JSON
may contain NaN/Infinity; those values are kept here and rejected later by the weighting step,
whose error names the checkpoint.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mwakit.errors import SourceError

#: How many logged train losses make a checkpoint's ``loss``: a count, or ``since_save`` (every
#: loss logged since the previous saved checkpoint).
LossWindow = int | Literal["since_save"]
SINCE_SAVE: Literal["since_save"] = "since_save"

_STATE_FILE = "trainer_state.json"

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_FIX = "restore the file the Trainer wrote, or give the metrics in the recipe (metrics: {...})"


def step_from_name(name: str) -> int | None:
    """Parse the step out of a ``checkpoint-<step>`` folder name.

    Args:
        name: A folder name (not a path), e.g. ``checkpoint-500``.

    Returns:
        The step, or None when the whole name is not ``checkpoint-<digits>``.
    """
    m = _CHECKPOINT.fullmatch(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class CheckpointMetrics:
    """Metrics found for one checkpoint.

    Attributes:
        step: The checkpoint's global step (``global_step``, else the folder name), if known.
        metrics: Metric name → value: ``step``, ``epoch``, ``loss``, the other keys of the last
            train log (``grad_norm``, ``learning_rate``, ``mean_token_accuracy``, …),
            ``eval_*`` and ``train_loss``. Values may be NaN/Inf.
        source: The trainer_state.json used, or None when there was none.
    """

    step: int | None
    metrics: dict[str, float] = field(hash=False)
    source: str | None


def _num(v: Any) -> float | None:
    """The value as a float when it is a JSON number (bools are not metrics), else None."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def _mean(xs: list[float]) -> float:
    # fsum raises on inf + -inf; plain sum gives the NaN the weighting step reports by name.
    if all(math.isfinite(x) for x in xs):
        return math.fsum(xs) / len(xs)
    return sum(xs) / len(xs)


def _load(path: Path) -> dict[str, Any]:
    """Parse trainer_state.json (NaN/Infinity allowed) into its top-level object."""
    try:
        # json.loads accepts NaN/Infinity, which the Trainer writes for diverged runs.
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        # ValueError: invalid JSON, not UTF-8, or a number of thousands of digits.
        raise SourceError(
            f"{_STATE_FILE} is unreadable ({type(err).__name__}: {err})"[:200],
            where=str(path),
            fix=_FIX,
        ) from err
    if not isinstance(state, dict):
        raise SourceError(
            f"{_STATE_FILE} holds a JSON {type(state).__name__}, not an object",
            where=str(path),
            fix=_FIX,
        )
    return state


def _history(state: dict[str, Any], path: Path) -> list[tuple[float, dict[str, Any]]]:
    """Check ``log_history`` and pair each entry with its step."""
    history = state.get("log_history")
    if not isinstance(history, list):
        raise SourceError(f"{_STATE_FILE} has no log_history list", where=str(path), fix=_FIX)
    out: list[tuple[float, dict[str, Any]]] = []
    for i, entry in enumerate(history):
        # Trainer.log always adds "step"; without it an entry cannot be placed in time.
        step = _num(entry.get("step")) if isinstance(entry, dict) else None
        if step is None:
            raise SourceError(
                f"log_history[{i}] is not an object with a numeric step",
                where=str(path),
                fix=_FIX,
            )
        out.append((step, entry))
    return out


def _global_step(state: dict[str, Any], name_step: int | None, path: Path) -> int | None:
    gs = state.get("global_step")
    if gs is None:
        return name_step
    if isinstance(gs, bool) or not isinstance(gs, int) or gs < 0:
        raise SourceError(
            f"global_step is {gs!r}, not a non-negative integer", where=str(path), fix=_FIX
        )
    return gs


def _previous_save(state: dict[str, Any], step: int, folder: Path) -> float:
    """The step of the checkpoint saved before ``step`` (−inf when none is known).

    ``save_steps`` in the state is the Trainer's absolute save interval (a ratio already turned
    into steps); a ``checkpoint-<N>`` folder beside this one with N < step also counts (saving
    by epoch leaves ``save_steps`` at its unused default). The later of the two wins.
    """
    found = [-math.inf]
    every = state.get("save_steps")
    if isinstance(every, int) and not isinstance(every, bool) and every > 0:
        found.append(step - every)
    if step_from_name(folder.name) is not None:
        try:
            siblings = [step_from_name(p.name) for p in folder.parent.iterdir()]
        except OSError:  # an unlistable parent: save_steps alone decides
            siblings = []
        found += [s for s in siblings if s is not None and s < step]
    return max(found)


def _window(
    train: list[tuple[float, dict[str, Any]]],
    loss_window: LossWindow,
    state: dict[str, Any],
    step: int | None,
    folder: Path,
) -> list[float]:
    """The logged train losses that make the checkpoint's ``loss`` (at least the last one)."""
    losses = [float(e["loss"]) for _, e in train]
    if loss_window != SINCE_SAVE:
        return losses[-int(loss_window) :]
    if step is None:
        return losses[-1:]
    prev = _previous_save(state, step, folder)
    since = [float(e["loss"]) for s, e in train if s > prev]
    # Logging less often than saving can leave no loss in the interval: the last one stands.
    return since or losses[-1:]


def read_metrics(
    checkpoint_dir: Path, *, loss_window: LossWindow = SINCE_SAVE
) -> CheckpointMetrics:
    """Read a checkpoint's metrics from its ``trainer_state.json``.

    The step is ``global_step``, else the ``checkpoint-<step>`` folder name. Log entries after
    the step are ignored (a root trainer_state.json covers the whole run). ``loss`` is the last
    of the train losses logged since the previous saved checkpoint (``loss_window:
    since_save``, the default: one logged batch is a noisy measure), or of the last
    ``loss_window`` ones (``1``: the last logged loss alone); the other numeric keys of the
    last train entry keep their names. The previous save is ``save_steps`` before the step,
    or a ``checkpoint-<N>`` folder beside this one if that is later. ``eval_*`` keys come from the
    evaluation at the step, else from the latest one before it; every entry logged at that
    evaluation step is merged, since a dict ``eval_dataset`` logs one entry per dataset.
    ``train_loss`` comes from the end-of-training summary. Non-numeric values are skipped;
    NaN/Inf values are kept.

    Args:
        checkpoint_dir: The ``checkpoint-<step>/`` folder (or any folder holding a
            trainer_state.json).
        loss_window: ``since_save``, or how many of the last logged training losses to
            average (≥ 1).

    Returns:
        The step, the metrics and the file they came from. Without trainer_state.json the
        metrics hold only ``step`` (when the folder name gives one) and the source is None.

    Raises:
        SourceError: trainer_state.json exists but is not valid JSON, or its fields have the
            wrong types.
        ValueError: ``loss_window`` is below 1 (the recipe validates it first).
    """
    if loss_window != SINCE_SAVE and (not isinstance(loss_window, int) or loss_window < 1):
        raise ValueError(f"loss_window must be since_save or ≥ 1, got {loss_window!r}")
    name_step = step_from_name(checkpoint_dir.name)
    path = checkpoint_dir / _STATE_FILE
    if not path.is_file():
        found = {} if name_step is None else {"step": float(name_step)}
        return CheckpointMetrics(step=name_step, metrics=found, source=None)

    state = _load(path)
    history = _history(state, path)
    step = _global_step(state, name_step, path)
    limit = math.inf if step is None else step
    entries = [(s, e) for s, e in history if s <= limit]

    metrics: dict[str, float] = {}
    if step is not None:
        metrics["step"] = float(step)
    epoch = _num(state.get("epoch"))
    if epoch is not None:
        metrics["epoch"] = epoch

    train = [(s, e) for s, e in entries if _num(e.get("loss")) is not None]
    if train:
        for k, v in train[-1][1].items():
            # step/epoch describe the log, not the checkpoint; loss is windowed below.
            if k not in ("step", "epoch", "loss") and (x := _num(v)) is not None:
                metrics[k] = x
        metrics["loss"] = _mean(_window(train, loss_window, state, step, checkpoint_dir))

    evals = [(s, e) for s, e in entries if any(k.startswith("eval_") for k in e)]
    if evals:
        at = step if any(s == step for s, _ in evals) else max(s for s, _ in evals)
        for s, e in evals:
            if s == at:
                for k, v in e.items():
                    if k.startswith("eval_") and (x := _num(v)) is not None:
                        metrics[k] = x

    for _, e in entries:
        if (x := _num(e.get("train_loss"))) is not None:
            metrics["train_loss"] = x
    return CheckpointMetrics(step=step, metrics=metrics, source=str(path))
