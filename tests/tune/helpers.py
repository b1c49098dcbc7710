"""Scorers for the pool tests: deterministic without a model, one that crashes its worker.

Importable by spawned processes and Ray actors (``tests.tune.helpers:...``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mwakit.tune.trials import Score


class HashScorer:
    """A score that depends only on the recipe and the split: the same in every process."""

    def __init__(self, data: Mapping[str, str], metric: str, **_: Any) -> None:
        self.data, self.metric = data, metric

    def score(self, recipe: Mapping[str, Any], split: str) -> Score:
        doc = json.dumps(
            {k: v for k, v in recipe.items() if k not in ("name", "output")}, sort_keys=True
        )
        h = hashlib.sha256(f"{split}|{doc}".encode()).digest()
        rows = tuple(1.0 + b / 255 for b in h[:8])
        return Score(sum(rows) / len(rows), rows)


class CrashOnce(HashScorer):
    """Kills its own process the first time it meets a candidate with ``weight`` in it
    (a marker file remembers across processes), as an out-of-memory kill would."""

    def __init__(self, marker: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.marker = Path(marker)

    def score(self, recipe: Mapping[str, Any], split: str) -> Score:
        if recipe["method"] == "linear" and len(recipe["checkpoints"]) == 2:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                os._exit(17)
        return super().score(recipe, split)
