"""The searches: which candidates to score, given the scores so far.

Every search gets an ``evaluate`` function that scores a batch of candidates on VAL and
returns their *goodness* (the metric oriented so that higher is better); batches let a pool of
workers score them in parallel, and the memo makes a repeated candidate free. Each search
returns every (candidate, goodness) it tried.

- `baselines`: the last checkpoint, every single checkpoint (for the best single one and the
  greedy order) and the uniform average.
- `penalty_search`: MWA penalty, transform and loss window on a coarse log grid scaled to the
  metric's spread, then a golden-section refinement inside the best grid point's bracket.
- `last_search`: the uniform average of the last k checkpoints.
- `greedy_search`: Wortsman et al. 2022's greedy soup: in order of single-checkpoint score,
  add a checkpoint to the soup when that improves VAL (skip it otherwise).
- `weights_search`: free weights on the simplex (softmax of an unconstrained vector) by CMA-ES
  (the ``cmaes`` library), started from the best MWA solution, as in arXiv 2412.04144.
- `groups_search`: separate MWA penalties for attention and MLP modules (``rules:``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from mwakit.errors import MetricError
from mwakit.tune.candidates import Candidate, Space, mwa, round_sig, single, uniform, weighted
from mwakit.weights import Transform

#: Score a batch of candidates on VAL: their goodness, higher is better.
Evaluate = Callable[[Sequence[Candidate]], list[float]]
Tried = list[tuple[Candidate, float]]

SEARCHES = ("penalty", "last", "greedy", "weights", "groups")
#: The coarse grid, in units of 1/spread of the metric (log-metric for ``power``): from nearly
#: uniform (0.3) to nearly the best checkpoint alone (27).
GRID = (1 / 3, 1.0, 3.0, 9.0, 27.0)
RANK_GRID = (0.2, 0.4, 0.6, 0.8)
_GOLD = (math.sqrt(5) - 1) / 2
#: Module groups for `groups_search` (Llama/Mistral/Qwen names; other models: no rule matches
#: and the search is skipped).
GROUPS = (("*self_attn*", "attention"), ("*mlp*", "mlp"))


def _tried(cands: Sequence[Candidate], evaluate: Evaluate) -> Tried:
    return list(zip(cands, evaluate(cands), strict=True))


def best(tried: Tried) -> tuple[Candidate, float]:
    """The highest-scoring (candidate, goodness); the first one wins a tie."""
    return max(tried, key=lambda cg: cg[1])


def baselines(space: Space, evaluate: Evaluate) -> dict[str, tuple[Candidate, float]]:
    """Score the baselines: ``last``, ``best_single`` (every single checkpoint is scored) and
    ``uniform``; the single checkpoints are returned too, under ``single:<i>``."""
    singles = [single(space, i) for i in range(space.n)]
    scored = _tried([*singles, uniform(space, name="uniform")], evaluate)
    out = {f"single:{i}": cg for i, cg in enumerate(scored[:-1])}
    c, g = scored[space.n - 1]
    out["last"] = (single(space, space.n - 1, kind="last"), g)
    c, g = best(scored[:-1])
    out["best_single"] = (single(space, c.members[0], kind="best_single"), g)
    out["uniform"] = scored[-1]
    return out


def _spread(values: Sequence[float], transform: Transform) -> float | None:
    """The spread the grid is scaled by; None when the transform cannot use these values."""
    if transform == "power":
        if any(v <= 0 for v in values):
            return None
        values = [math.log(v) for v in values]
    mean = math.fsum(values) / len(values)
    s = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
    return s if s > 0 and math.isfinite(s) else None


def penalty_variants(space: Space) -> list[tuple[Transform, int | str]]:
    """(transform, loss window) pairs worth a grid, most promising first: power with every
    loss window the space knows, then softmax and rank with the recipe's window."""
    out: list[tuple[Transform, int | str]] = [("power", w) for w in space.metrics]
    out += [("softmax", space.window), ("rank", space.window)]
    return out


def _grid(space: Space, transform: Transform, window: int | str) -> list[float]:
    values = space.values(window)
    if values is None:
        return []
    if transform == "rank":
        return list(RANK_GRID) if len(set(values)) > 1 else []
    s = _spread(values, transform)
    return [] if s is None else [round_sig(c / s, 4) for c in GRID]


def penalty_search(space: Space, evaluate: Evaluate, budget: int) -> Tried:
    """MWA params: a coarse grid per variant, then a golden-section refinement of the best.

    About a third of the budget (at most 6) is kept for the refinement; variants are dropped
    from the end when the grids would not fit.
    """
    refine = min(6, budget // 3)
    left = budget - refine
    tried: Tried = []
    for transform, window in penalty_variants(space):
        grid = _grid(space, transform, window)
        if not grid or len(grid) > left:
            continue
        left -= len(grid)
        tried += _tried([mwa(space, p, transform, window) for p in grid], evaluate)
    if not tried:
        return tried
    left += refine
    top, _ = best(tried)
    assert top.penalty is not None
    same = sorted(
        (c.penalty, g)
        for c, g in tried
        if c.transform == top.transform and c.loss_window == top.loss_window
        if c.penalty is not None
    )
    ps = [p for p, _ in same]
    k = ps.index(top.penalty)
    # The bracket: the grid neighbours (past an edge: one more grid step, or 0 for rank).
    ratio = ps[1] / ps[0] if len(ps) > 1 and ps[0] > 0 else 3.0
    lo = ps[k - 1] if k > 0 else (ps[0] / ratio if top.transform != "rank" else 0.0)
    hi = ps[k + 1] if k + 1 < len(ps) else ps[-1] * ratio
    if top.transform == "rank":
        hi = min(hi, 1.0)
    tried += _golden(
        lambda p: mwa(space, p, top.transform, top.loss_window),
        lo,
        hi,
        evaluate,
        left,
        log=top.transform != "rank" and lo > 0,
    )
    return tried


def _golden(
    make: Callable[[float], Candidate],
    lo: float,
    hi: float,
    evaluate: Evaluate,
    n: int,
    *,
    log: bool,
) -> Tried:
    """Golden-section search for a maximum on [lo, hi] (in log space with ``log``), n scores."""
    f = math.log if log else float
    g = math.exp if log else float
    a, b = f(lo), f(hi)
    tried: Tried = []

    def score(x: float) -> float:
        cg = _tried([make(g(x))], evaluate)[0]
        tried.append(cg)
        return cg[1]

    if n < 2:
        return tried
    c, d = b - _GOLD * (b - a), a + _GOLD * (b - a)
    fc, fd = score(c), score(d)
    for _ in range(n - 2):
        if fc >= fd:
            b, d, fd = d, c, fc
            c = b - _GOLD * (b - a)
            fc = score(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLD * (b - a)
            fd = score(d)
    return tried


def last_search(space: Space, evaluate: Evaluate, budget: int) -> Tried:
    """The uniform average of the last k checkpoints, 2 ≤ k < n (k spaced evenly in log k
    when the budget cannot take them all)."""
    ks = list(range(2, space.n))
    if budget <= 0:
        return []
    if len(ks) > budget:
        top = (space.n - 1) / 2
        ks = sorted({round(2 * top ** (i / max(1, budget - 1))) for i in range(budget)})
    cands = [
        uniform(space, range(space.n - k, space.n), name=f"last {k}", kind="last_k", search="last")
        for k in ks
    ]
    return _tried(cands, evaluate)


def greedy_search(
    space: Space, evaluate: Evaluate, budget: int, single_scores: Sequence[float]
) -> Tried:
    """Greedy soup: start from the best single checkpoint, then try each next-best one and
    keep it when the soup's VAL improves (Wortsman et al. 2022, Recipe 1)."""
    order = sorted(range(space.n), key=lambda i: -single_scores[i])
    soup, score = [order[0]], single_scores[order[0]]
    tried: Tried = []
    for i in order[1 : budget + 1]:
        members = sorted([*soup, i])
        c = uniform(space, members, name=f"greedy soup ({len(members)})", kind="greedy",
                    search="greedy")  # fmt: skip
        g = _tried([c], evaluate)[0][1]
        tried.append((c, g))
        if g > score:
            soup, score = members, g
    # The soup as found is the search's answer even when nothing joined the best single one.
    final = uniform(space, soup, name=f"greedy soup ({len(soup)})", kind="greedy",
                    search="greedy")  # fmt: skip
    if not any(c.members == final.members for c, _ in tried):
        tried.append((final, score))
    return tried


def weights_search(
    space: Space,
    evaluate: Evaluate,
    budget: int,
    start: Sequence[float] | None = None,
    *,
    seed: int = 0,
    sigma: float = 0.5,
) -> Tried:
    """Free per-checkpoint weights by CMA-ES (``cmaes.CMA``) over z with w = softmax(z).

    Args:
        space: The checkpoints.
        evaluate: The batch scorer.
        budget: Candidates to score (whole generations; at least one).
        start: Weights to start from (the best MWA solution); default uniform.
        seed: CMA-ES's seed: the same seed and scores give the same candidates.
        sigma: Initial step size in z (0.5: a weight moves by about ×1.6).
    """
    import numpy as np
    from cmaes import CMA

    w0 = np.full(space.n, 1.0 / space.n) if start is None else np.asarray(start, dtype=float)
    z0 = np.log(np.maximum(w0, 1e-4))
    z0 -= z0.mean()
    bounds = np.tile([-12.0, 12.0], (space.n, 1))
    opt = CMA(mean=z0, sigma=sigma, bounds=bounds, seed=seed)
    tried: Tried = []
    for _ in range(max(1, budget // opt.population_size)):
        zs = [opt.ask() for _ in range(opt.population_size)]
        cands = [weighted(space, _softmax(z)) for z in zs]
        scores = evaluate(cands)
        tried += list(zip(cands, scores, strict=True))
        opt.tell([(z, -g) for z, g in zip(zs, scores, strict=True)])  # cmaes minimises
    return tried


def _softmax(z: Sequence[float]) -> list[float]:
    m = max(z)
    e = [math.exp(x - m) for x in z]
    t = math.fsum(e)
    return [x / t for x in e]


def groups_search(space: Space, evaluate: Evaluate, budget: int, top: Candidate) -> Tried:
    """Separate penalties for attention and MLP modules around the best MWA candidate:
    each group's penalty on the grid ×(1/3, 1, 3) of the top one, the others fixed."""
    if top.penalty is None:
        return []
    factors = (1 / 3, 1.0, 3.0)
    cands = []
    for fa in factors:
        for fm in factors:
            if fa == fm == 1.0:
                continue
            pa, pm = round_sig(top.penalty * fa, 4), round_sig(top.penalty * fm, 4)
            if top.transform == "rank" and max(pa, pm) > 1:
                continue
            cands.append(
                Candidate(
                    f"{top.name} attn={pa:g} mlp={pm:g}",
                    "groups",
                    "groups",
                    top.members,
                    None,
                    top.penalty,
                    top.transform,
                    top.loss_window,
                    ((GROUPS[0][0], pa), (GROUPS[1][0], pm)),
                )
            )
    return _tried(cands[:budget], evaluate)


def start_weights(space: Space, tried: Tried) -> list[float] | None:
    """The weight vector of the best MWA candidate tried, for CMA-ES's start."""
    mwas = [(c, g) for c, g in tried if c.kind == "mwa"]
    if not mwas:
        return None
    try:
        return best(mwas)[0].weight_vector(space)
    except (MetricError, ValueError):
        return None
