"""Candidates: ways to merge a tune's fixed checkpoints, each a plain recipe.

A `Space` is what every candidate shares: the recipe's checkpoints (resolved once, in step
order) and its other settings (LoRA space, dtypes, output). A `Candidate` says how to weigh
those checkpoints: a subset averaged uniformly, explicit weights, or MWA params. Its
`Candidate.recipe` is the recipe data `mwakit run` would take, so a candidate is merged by the
normal planner and methods, and the same data is what `best.yaml` holds; its `key` (a hash of
that recipe and the tune's context) memoises its score. No torch import here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mwakit.weights import Transform, mwa_weights

#: Simplicity tiers for the honest-selection rule: uniform-style averages < MWA < greedy soup
#: < free weights < per-group penalties.
TIER = {
    "last": 0,
    "best_single": 0,
    "single": 0,
    "uniform": 0,
    "last_k": 0,
    "mwa": 1,
    "greedy": 2,
    "weights": 3,
    "groups": 4,
}

#: Recipe keys a candidate sets itself; the recipe's own values are replaced.
_OWNED = ("method", "params", "weighting", "rules", "loss_window", "select", "checkpoints")


def round_sig(x: float, digits: int = 6) -> float:
    """``x`` rounded to ``digits`` significant digits (readable recipes, stable hashes)."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - math.floor(math.log10(abs(x))))


@dataclass(frozen=True)
class Space:
    """The checkpoints a tune merges and the recipe settings every candidate keeps.

    Attributes:
        base: The recipe as data (``Recipe.to_yaml_dict``); method, params, weighting, rules,
            loss_window and the checkpoint source are replaced by each candidate.
        specs: One checkpoint entry per checkpoint, in step order (``path`` and any
            ``metrics`` the recipe gave).
        names: Short checkpoint names (folder names), for tables and plots.
        metric: The metric MWA candidates weigh by (the recipe's ``params.metric``).
        higher_is_better: That metric's direction.
        metrics: ``loss_window`` → each checkpoint's metrics read with it (the first key is
            the recipe's own window). Only windows that change the metric are kept.
    """

    base: dict[str, Any]
    specs: tuple[dict[str, Any], ...]
    names: tuple[str, ...]
    metric: str = "loss"
    higher_is_better: bool = False
    metrics: Mapping[int | str, tuple[dict[str, float], ...]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """The number of checkpoints."""
        return len(self.specs)

    @property
    def window(self) -> int | str:
        """The recipe's own ``loss_window``."""
        return next(iter(self.metrics), "since_save")

    def values(self, window: int | str | None = None) -> list[float] | None:
        """The MWA metric of every checkpoint read with ``window``, or None if one lacks it."""
        rows = self.metrics.get(self.window if window is None else window)
        if rows is None or any(self.metric not in m for m in rows):
            return None
        return [m[self.metric] for m in rows]


@dataclass(frozen=True)
class Candidate:
    """One way to merge the space's checkpoints.

    Attributes:
        name: A short human label (``mwa power p=2.1``, ``last 5``, ``greedy soup (4)``).
        kind: A `TIER` key: what sort of merge this is.
        search: The search (or ``baseline``) that proposed it.
        members: Indices of the checkpoints merged (the others get weight 0 and are left out
            of the recipe).
        weights: Explicit relative weights, one per member (``linear``); None: all equal.
        penalty: MWA penalty; None for a linear merge.
        transform: MWA transform.
        loss_window: MWA loss window (None: the recipe's).
        group_penalties: Per-module-group MWA penalties (glob, penalty), as ``rules:``.
    """

    name: str
    kind: str
    search: str
    members: tuple[int, ...]
    weights: tuple[float, ...] | None = None
    penalty: float | None = None
    transform: Transform = "power"
    loss_window: int | str | None = None
    group_penalties: tuple[tuple[str, float], ...] = ()

    @property
    def tier(self) -> int:
        """The simplicity tier (lower is simpler)."""
        return TIER[self.kind]

    def recipe(self, space: Space) -> dict[str, Any]:
        """The recipe data that merges this candidate (what ``best.yaml`` holds).

        Checkpoints outside ``members`` are left out; MWA candidates keep every member and
        set ``method: mwa``; the others are ``method: linear`` with explicit weights (none
        when uniform, linear's default).
        """
        data = {k: copy.deepcopy(v) for k, v in space.base.items() if k not in _OWNED}
        cks = []
        for j, i in enumerate(self.members):
            entry = dict(space.specs[i])
            if self.penalty is None and self.weights is not None:
                entry["weight"] = self.weights[j]
            cks.append(entry)
        if self.penalty is None:
            head: dict[str, Any] = {"method": "linear", "params": {}}
        else:
            params: dict[str, Any] = {
                "metric": space.metric,
                "penalty": self.penalty,
                "transform": self.transform,
                "higher_is_better": space.higher_is_better,
            }
            head = {"method": "mwa", "params": params}
            head["loss_window"] = self.loss_window or space.window
            if self.group_penalties:
                head["rules"] = [
                    {"match": glob, "params": {"penalty": p}} for glob, p in self.group_penalties
                ]
        # Schema order: name first, then the method, then checkpoints, then the rest.
        out: dict[str, Any] = {"name": data.pop("name")} if "name" in data else {}
        out.update(head)
        out["checkpoints"] = cks
        out.update(data)
        return out

    def weight_vector(self, space: Space) -> list[float]:
        """The effective weight of every checkpoint (0 outside ``members``), summing to 1.

        For MWA candidates this is MWA's formula on the space's metrics (the top-level
        penalty; group penalties are per tensor and not shown here).

        Raises:
            MetricError: The MWA metric cannot take this transform.
            ValueError: The space has no values of its MWA metric.
        """
        out = [0.0] * space.n
        if self.penalty is None:
            raw = list(self.weights) if self.weights is not None else [1.0] * len(self.members)
            total = math.fsum(raw)
            for i, w in zip(self.members, raw, strict=True):
                out[i] = w / total
            return out
        values = space.values(self.loss_window)
        if values is None:
            raise ValueError(f"no {space.metric!r} for every checkpoint")
        sub = [values[i] for i in self.members]
        ws = mwa_weights(
            sub,
            penalty=self.penalty,
            transform=self.transform,
            higher_is_better=space.higher_is_better,
            names=[space.names[i] for i in self.members],
        )
        for i, w in zip(self.members, ws, strict=True):
            out[i] = w
        return out


def recipe_key(recipe: Mapping[str, Any], context: Mapping[str, Any]) -> str:
    """The memo key of a candidate: a hash of what is merged and what it is scored on.

    The recipe's ``name`` and ``output`` do not change the merged tensors and are left out,
    so the same merge reached by two searches is scored once.
    """
    merged = {k: v for k, v in recipe.items() if k not in ("name", "output", "tuning")}
    doc = json.dumps({"recipe": merged, "context": context}, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode("utf-8")).hexdigest()[:16]


def single(space: Space, i: int, *, kind: str = "single", search: str = "baseline") -> Candidate:
    """Checkpoint ``i`` alone."""
    return Candidate(space.names[i], kind, search, (i,))


def uniform(space: Space, members: Sequence[int] | None = None, **kw: Any) -> Candidate:
    """The uniform average of ``members`` (default: every checkpoint)."""
    m = tuple(range(space.n)) if members is None else tuple(sorted(members))
    kw.setdefault("kind", "uniform")
    kw.setdefault("search", "baseline")
    return Candidate(kw.pop("name", f"uniform ({len(m)})"), members=m, **kw)


def mwa(
    space: Space,
    penalty: float,
    transform: Transform = "power",
    loss_window: int | str | None = None,
    *,
    search: str = "penalty",
) -> Candidate:
    """MWA over every checkpoint with these params."""
    p = round_sig(penalty, 4)
    win = space.window if loss_window is None else loss_window
    label = f"mwa {transform} p={p:g}"
    if len(space.metrics) > 1 or win != space.window:
        label += f" window={win}"
    return Candidate(label, "mwa", search, tuple(range(space.n)), None, p, transform, win)


def weighted(space: Space, weights: Sequence[float], *, search: str = "weights") -> Candidate:
    """Free weights over every checkpoint (rounded to 6 significant digits)."""
    ws = tuple(round_sig(float(w)) for w in weights)
    return Candidate("weights (cma-es)", "weights", search, tuple(range(space.n)), ws)
