"""Honest selection: choose on VAL only, prefer the simpler merge when the gain is noise.

Standard errors are paired: two candidates are scored on the same rows, so the SE of their
difference comes from the per-row differences (much smaller than either score's own SE, since
most of a row's difficulty is shared). TEST never enters here: it is scored for the baselines
and the chosen candidate after the choice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mwakit.tune.candidates import Candidate
from mwakit.tune.trials import Score

#: The simplicity order the rule walks, as said in messages.
TIER_NAMES = ("uniform-style average", "MWA", "greedy soup", "free weights", "group penalties")


def standard_error(xs: Sequence[float]) -> float:
    """The standard error of the mean of ``xs`` (sample SD / √n); NaN below 2 values."""
    n = len(xs)
    if n < 2:
        return math.nan
    mean = math.fsum(xs) / n
    return math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1) / n)


def paired(a: Score, b: Score, direction: int) -> tuple[float, float]:
    """(mean, SE) of a − b in goodness (``direction`` +1 higher-is-better, −1 lower), row by
    row. Without per-row values of equal length the SE is NaN and the mean is the difference
    of the two values."""
    if len(a.per_row) != len(b.per_row) or not a.per_row:
        return direction * (a.value - b.value), math.nan
    d = [direction * (x - y) for x, y in zip(a.per_row, b.per_row, strict=True)]
    return math.fsum(d) / len(d), standard_error(d)


@dataclass(frozen=True)
class Choice:
    """The chosen candidate and why.

    Attributes:
        candidate: The candidate chosen.
        winner: The best candidate on VAL (the chosen one unless a simpler one was preferred).
        margin: The winner's paired VAL gain over the chosen one, in goodness (0 if the same).
        se: The SE of that gain.
        reason: One sentence for the table and the model card.
    """

    candidate: Candidate
    winner: Candidate
    margin: float
    se: float
    reason: str


def choose(scored: Sequence[tuple[Candidate, Score]], direction: int) -> Choice:
    """The best candidate on VAL, or a simpler one within 1 SE of it.

    The winner is the highest VAL goodness (a tie goes to the simpler, then the earlier). Then,
    simplest tier first (uniform-style averages < MWA < greedy soup < free weights < group
    penalties), the best candidate of each simpler tier is compared with the winner: the first
    whose paired VAL deficit is within one SE is chosen instead.

    Args:
        scored: Every candidate scored on VAL with its score.
        direction: +1 when the metric is higher-is-better, −1 when lower-is-better.

    Raises:
        ValueError: Nothing was scored.
    """
    if not scored:
        raise ValueError("no candidate was scored")
    order = sorted(
        range(len(scored)), key=lambda i: (-direction * scored[i][1].value, scored[i][0].tier, i)
    )
    win, win_score = scored[order[0]]
    for tier in range(win.tier):
        in_tier = [i for i in order if scored[i][0].tier == tier]
        if not in_tier:
            continue
        c, s = scored[in_tier[0]]
        gain, se = paired(win_score, s, direction)
        if gain <= se or (math.isnan(se) and gain <= 0):
            reason = (
                f"chose {c.name} ({TIER_NAMES[tier]}): the best on VAL, {win.name}, is better "
                f"by {gain:.4g} ± {se:.2g} (paired SE), within 1 SE, so the simpler merge wins"
            )
            return Choice(c, win, gain, se, reason)
    reason = f"chose {win.name}: the best on VAL"
    simpler = [i for i in order if scored[i][0].tier < win.tier]
    if simpler:
        c, s = scored[simpler[0]]
        gain, se = paired(win_score, s, direction)
        reason += f", better than {c.name} by {gain:.4g} ± {se:.2g} (paired SE)"
    return Choice(win, win, 0.0, 0.0, reason)
