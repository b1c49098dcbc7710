"""Metrics over scored sequences: loss, perplexity, exact match, accuracy, and plug-ins.

Every built-in metric is the mean of per-row scores (`EvalResult.per_row`), so the paired
standard error of a difference between two candidates on the same rows is the standard error
of the mean of the per-row differences:

- ``loss``: mean token NLL over every scored token of the data (token-weighted). Its per-row
  score is the row's summed NLL × rows / tokens: the token counts are the same for every
  candidate, so the loss is exactly the mean of these and differences pair row by row.
  Scored rows: completion, text and messages rows, and the right choice of a choice row.
- ``perplexity``: ``exp(loss)``. Per-row: its first-order (delta-method) linearisation
  ``ppl · (1 + loss_row − loss)``, whose mean is the perplexity.
- ``exact_match``: 1 when the greedy answer equals the completion (completion rows; messages
  rows: the last assistant turn) after `normalize`. When the gold answer ends with an EOS
  token, greedy decoding reproduces it exactly iff the argmax at every gold position is the
  gold token, so that is computed from the teacher-forced pass, without generating (greedy
  text that reaches the same normalised answer through other tokens counts as a miss there).
  Otherwise the answer is generated greedily, up to EOS or 16 tokens past the gold length.
- ``accuracy``: multiple choice, the choice with the highest summed log-likelihood (lm-eval's
  ``acc``; ties go to the first).
- ``module:function``: a plug-in called as ``function(model, tokenizer, rows)``, returning a
  dict of floats (a list of floats is a per-row score; its mean is the metric). Set a
  ``directions`` dict attribute on the function (``{"rouge": 1, "wer": -1}``) to orient its keys.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

from mwakit.errors import MetricError

BUILTIN = ("loss", "perplexity", "exact_match", "accuracy")
_DIRECTIONS: dict[str, int] = {"loss": -1, "perplexity": -1, "exact_match": 1, "accuracy": 1}
_LOWER_IS_BETTER = re.compile(r"(loss|nll|perplexity|ppl|error|wer|cer)$")
#: New tokens a generated answer may run past the gold answer's length.
GEN_SLACK = 16

Plugin = Callable[[Any, Any, list[Any]], dict[str, Any]]


def normalize(text: str) -> str:
    """The exact-match normalisation: Unicode NFKC, whitespace runs to one space, stripped.

    Case and punctuation are kept: they are part of an answer.
    """
    return " ".join(unicodedata.normalize("NFKC", text).split())


def metric_direction(name: str) -> int:
    """+1 when higher is better, -1 when lower is.

    Built-ins: ``loss`` and ``perplexity`` -1, ``exact_match`` and ``accuracy`` +1. A plug-in's
    keys: its ``directions`` attribute once loaded, else -1 for names ending in loss, nll,
    perplexity, ppl, error, wer or cer, and +1 otherwise.
    """
    if name in _DIRECTIONS:
        return _DIRECTIONS[name]
    return -1 if _LOWER_IS_BETTER.search(name.lower()) else 1


def parse_metrics(names: Sequence[str] | str) -> list[str]:
    """Check metric names (a comma-separated string or a list), loading plug-ins early.

    Raises:
        MetricError: An unknown name, or a plug-in that cannot be imported.
    """
    if isinstance(names, str):
        names = [n for n in (x.strip() for x in names.split(",")) if n]
    out: list[str] = []
    for n in names:
        if ":" in n:
            load_plugin(n)
        elif n not in BUILTIN:
            raise MetricError(
                f"unknown metric {n!r}",
                where="metrics",
                fix=f"use {', '.join(BUILTIN)}, or module:function for a plug-in",
            )
        if n not in out:
            out.append(n)
    if not out:
        fix = f"use one of {', '.join(BUILTIN)}"
        raise MetricError("no metric given", where="metrics", fix=fix)
    return out


def load_plugin(spec: str) -> Plugin:
    """Import ``module:function`` (the current folder is searched too).

    Raises:
        MetricError: The module or function is missing, or not callable.
    """
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise MetricError(
            f"bad plug-in metric {spec!r}", where="metrics", fix="write it as module:function"
        )
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())  # `mymetrics:f` next to the data, as the user expects
    try:
        module = importlib.import_module(mod_name)
    except ImportError as err:
        raise MetricError(
            f"cannot import plug-in module {mod_name!r}: {err}",
            where=spec,
            fix="put the module on PYTHONPATH or in the current folder",
        ) from err
    finally:
        if added:
            sys.path.remove(os.getcwd())
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise MetricError(
            f"{mod_name} has no function {fn_name!r}",
            where=spec,
            fix="name a function taking (model, tokenizer, rows)",
        )
    for key, d in (getattr(fn, "directions", None) or {}).items():
        _DIRECTIONS[str(key)] = 1 if d > 0 else -1
    return fn


def run_plugin(spec: str, model: Any, tokenizer: Any, rows: list[Any]) -> dict[str, Any]:
    """Call a plug-in and check what it returns.

    Returns:
        ``{key: float}`` and, for per-row values, ``{key: list[float]}``.

    Raises:
        MetricError: It returned no dict, or values that are not (lists of) finite numbers.
    """
    got = load_plugin(spec)(model, tokenizer, rows)
    if not isinstance(got, dict) or not got:
        raise MetricError(
            f"the plug-in returned {type(got).__name__}, not a dict of floats",
            where=spec,
            fix="return {name: float} (or {name: [float per row]})",
        )
    out: dict[str, Any] = {}
    for k, v in got.items():
        vals = v if isinstance(v, list) else [v]
        try:
            nums = [float(x) for x in vals]
        except (TypeError, ValueError):
            nums = [math.nan]
        if not nums or not all(math.isfinite(x) for x in nums):
            raise MetricError(
                f"the plug-in's {k!r} is not a finite number (or list of them)",
                where=spec,
                fix="return finite floats",
            )
        out[str(k)] = nums if isinstance(v, list) else nums[0]
    return out


def loss_scores(nll_sums: Sequence[float], counts: Sequence[int]) -> tuple[float, list[float]]:
    """Token-weighted mean NLL and its per-row scores (whose mean it is exactly)."""
    total = sum(counts)
    n = len(nll_sums)
    loss = sum(nll_sums) / total
    return loss, [s * n / total for s in nll_sums]


def perplexity_scores(loss: float, per_row_loss: Sequence[float]) -> tuple[float, list[float]]:
    """``exp(loss)`` and its delta-method per-row scores (whose mean it is exactly)."""
    ppl = math.exp(loss)
    return ppl, [ppl * (1.0 + x - loss) for x in per_row_loss]


def mean(xs: Sequence[float]) -> float:
    """The arithmetic mean (of a non-empty list)."""
    return sum(xs) / len(xs)
