"""Score a candidate recipe: merge it in memory, swap it into the loaded base, evaluate.

A `Scorer` is built once per process (the driver, a local worker, a Ray actor) from a
picklable `ScorerSpec`, so every worker loads the base model and the data once and then takes
candidates. `ModelScorer` is the real one (`mwakit.memory.merge_in_memory` +
`mwakit.evaluate.Evaluator`); a spec may name any other factory (a test's synthetic scorer).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mwakit.errors import UsageError
from mwakit.io.header import HeaderMemo, remembered_headers
from mwakit.tune.trials import Score

DEFAULT_FACTORY = "mwakit.tune.scoring:ModelScorer"


class Scorer(Protocol):
    """Scores candidate recipes on a split (``val`` or ``test``)."""

    def score(self, recipe: Mapping[str, Any], split: str) -> Score:
        """Merge ``recipe`` and score it on ``split``."""
        ...


@dataclass(frozen=True)
class ScorerSpec:
    """How to build a scorer in any process: ``factory`` (``module:callable``) and its kwargs.

    Everything in it must pickle (paths as strings), since workers receive it.
    """

    factory: str = DEFAULT_FACTORY
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def build(self) -> Scorer:
        """Import the factory and call it with the kwargs.

        Raises:
            UsageError: The factory cannot be imported.
        """
        mod, _, attr = self.factory.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError, ValueError) as err:
            raise UsageError(
                f"cannot import the scorer {self.factory!r} ({err})",
                where="tune",
                fix="give module:callable of an importable module",
            ) from err
        scorer: Scorer = fn(**dict(self.kwargs))
        return scorer


class ModelScorer:
    """The real scorer: one loaded base model, rows per split, candidates swapped in.

    Args:
        base: The base model folder (or ``hf://`` ref) the adapters were trained on.
        data: Split name → JSONL data file.
        metric: The metric to score by.
        tokenizer: The tokenizer folder (default: the base's).
        device: Where to evaluate.
        cache_memory: Bytes of checkpoint tensors kept in memory across candidates (default:
            `mwakit.io.cache.default_budget`, a quarter of the RAM; 0: none), so candidates
            after the first read nothing from disk; what does not fit is read each time.
    """

    def __init__(
        self,
        base: str,
        data: Mapping[str, str],
        *,
        metric: str = "loss",
        tokenizer: str | None = None,
        device: str = "cpu",
        cache_memory: int | None = None,
    ) -> None:
        from mwakit.evaluate import Evaluator, load_rows
        from mwakit.io.cache import InputCache

        self.metric = metric
        self.cache = None if cache_memory == 0 else InputCache(cache_memory)
        self.headers: HeaderMemo = {}  # every candidate plans over the same checkpoint files
        self.rows = {split: load_rows(Path(p)) for split, p in data.items()}
        self.evaluator = Evaluator(base, tokenizer=tokenizer, metrics=(metric,), device=device)

    def score(self, recipe: Mapping[str, Any], split: str) -> Score:
        """Plan the recipe as `mwakit run` would, merge it in memory, evaluate it.

        Raises:
            MwakitError: The recipe cannot be planned or merged (as `mwakit run` says).
        """
        from mwakit.memory import merge_in_memory
        from mwakit.recipe import parse_recipe
        from mwakit.validate import checked_plan

        t0 = time.perf_counter()
        with remembered_headers(self.headers):
            plan = checked_plan(parse_recipe(dict(recipe)))
        merged = merge_in_memory(plan, cache=self.cache)
        t1 = time.perf_counter()
        res = self.evaluator.score(self.rows[split], merged)
        per_row = tuple(float(x) for x in res.per_row.get(self.metric, ()))
        # merge_seconds: what tuning adds to an evaluation (the merge, and the swap into the
        # loaded model), to compare with the evaluation itself.
        overhead = t1 - t0 + res.swap_seconds
        return Score(float(res.metrics[self.metric]), per_row, time.perf_counter() - t0, overhead)
