"""`mwakit tune`: score candidate merges of a run's checkpoints on held-out data, pick one.

The recipe fixes the checkpoints; the searches (`mwakit.tune.searches`) propose ways to merge
them, each merged in memory by the normal planner and scored on VAL, and `tune` writes the
chosen one as a plain recipe. See README "Choosing the merge".
"""

from __future__ import annotations

from typing import Any

__all__ = ["TuneResult", "tune"]


def __getattr__(name: str) -> Any:
    # `mwakit.tune.tune` without importing the runner (and its evaluator) for a search test.
    if name in __all__:
        from mwakit.tune import run

        return getattr(run, name)
    raise AttributeError(name)
