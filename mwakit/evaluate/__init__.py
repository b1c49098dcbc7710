"""Score merges on held-out data: loss, perplexity, exact match, accuracy, plug-ins.

The API `mwakit eval` and `mwakit tune` use::

    rows = load_rows("val.jsonl")
    ev = Evaluator("base-folder", metrics=["loss", "exact_match"])
    res = ev.score(rows, merge_in_memory(plan))   # swapped into one loaded model
    res.metrics["loss"], res.per_row["loss"]      # per-row scores pair across candidates

This package imports torch, transformers and peft only when an Evaluator is built, so
``import mwakit`` stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mwakit.evaluate.data import Row, load_rows, parse_row
from mwakit.evaluate.metrics import BUILTIN, metric_direction, normalize, parse_metrics

if TYPE_CHECKING:
    from mwakit.evaluate.evaluator import EvalResult, Evaluator

__all__ = [
    "BUILTIN",
    "EvalResult",
    "Evaluator",
    "Row",
    "evaluate",
    "load_rows",
    "metric_direction",
    "normalize",
    "parse_metrics",
    "parse_row",
]


def __getattr__(name: str) -> object:
    # The Evaluator pulls in torch: import it on first use, not with the package.
    if name in ("Evaluator", "EvalResult"):
        from mwakit.evaluate import evaluator

        return getattr(evaluator, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def evaluate(
    target: str | Path,
    *,
    base: str | Path | None = None,
    data: str | Path,
    metrics: Sequence[str] | str = ("loss",),
    tokenizer: str | Path | None = None,
    device: str = "cpu",
    batch_tokens: int = 2048,
) -> EvalResult:
    """Score one target on a JSONL data file (what `mwakit eval` runs).

    Args:
        target: An adapter folder (a checkpoint), a model folder, an ``hf://`` reference to
            either, or a recipe file (merged in memory, nothing written).
        base: The base model; default: the adapters' ``base_model_name_or_path`` when that is a
            local folder or an ``hf://`` reference.
        data: The JSONL rows (see `load_rows`).
        metrics: Metric names, or one comma-separated string.
        tokenizer: The tokenizer folder (default: the base's, else the adapter folder's).
        device: ``cpu``, ``cuda[:N]`` or ``auto``.
        batch_tokens: Padded tokens per forward pass.

    Raises:
        DataError: A bad data file or row (naming ``file:line``).
        MetricError: An unknown metric, or a failing plug-in.
        UsageError: No base given and none found.
        MwakitError: Any source, recipe, plan or tensor problem.
    """
    from mwakit.evaluate.evaluator import Evaluator
    from mwakit.evaluate.target import resolve_target

    names = parse_metrics(metrics)  # a typo fails before any model loads
    rows = load_rows(data)
    t = resolve_target(target, base)
    ev = Evaluator(
        t.base,
        tokenizer=tokenizer,
        metrics=names,
        device=device,
        batch_tokens=batch_tokens,
        tokenizer_fallback=t.tokenizer,
    )
    return ev.score(rows, t.adapter)
