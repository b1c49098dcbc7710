"""The searches on synthetic objectives with known optima (no model, no merge)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from mwakit.tune.candidates import Candidate, Space, mwa, recipe_key, round_sig, uniform
from mwakit.tune.searches import (
    GRID,
    baselines,
    greedy_search,
    last_search,
    penalty_search,
    weights_search,
)

LOSSES = (2.0, 1.6, 1.3, 1.2, 1.25)


def _space(n: int = 5, losses: Sequence[float] = LOSSES) -> Space:
    specs = tuple({"path": f"/runs/x/checkpoint-{10 * (i + 1)}"} for i in range(n))
    return Space(
        base={"name": "t", "method": "mwa", "lora_space": "factors", "output": {"path": "o"}},
        specs=specs,
        names=tuple(f"checkpoint-{10 * (i + 1)}" for i in range(n)),
        metric="loss",
        higher_is_better=False,
        metrics={"since_save": tuple({"loss": v} for v in losses[:n])},
    )


class Counter:
    """A batch objective over effective weights, counting calls."""

    def __init__(self, space: Space, target: Sequence[float]) -> None:
        self.space, self.target, self.calls = space, list(target), 0

    def __call__(self, cands: Sequence[Candidate]) -> list[float]:
        self.calls += len(cands)
        out = []
        for c in cands:
            w = c.weight_vector(self.space)
            out.append(-math.fsum((a - b) ** 2 for a, b in zip(w, self.target, strict=True)))
        return out


def test_candidate_recipes_are_plain_recipes() -> None:
    sp = _space()
    r = uniform(sp, [3, 1], name="soup").recipe(sp)
    assert r["method"] == "linear" and r["params"] == {}
    assert [c["path"] for c in r["checkpoints"]] == [sp.specs[1]["path"], sp.specs[3]["path"]]
    assert "weight" not in r["checkpoints"][0] and r["output"] == {"path": "o"}
    m = mwa(sp, 2.0, "softmax").recipe(sp)
    assert m["method"] == "mwa" and m["loss_window"] == "since_save"
    assert m["params"] == {
        "metric": "loss",
        "penalty": 2.0,
        "transform": "softmax",
        "higher_is_better": False,
    }
    # The memo key ignores the label and the output, not the merge.
    ctx = {"data": "abc"}
    assert recipe_key(r, ctx) == recipe_key({**r, "name": "x", "output": {"path": "p"}}, ctx)
    assert recipe_key(r, ctx) != recipe_key(m, ctx) != recipe_key(m, {"data": "abd"})


def test_mwa_weight_vector_is_the_formula() -> None:
    sp = _space(3, (1.0, 0.8, 0.5))
    # README's example: losses (1.0, 0.8, 0.5) at p = 1 give 4/17, 5/17, 8/17.
    assert mwa(sp, 1.0).weight_vector(sp) == pytest.approx([4 / 17, 5 / 17, 8 / 17])


def test_baselines_pick_last_best_single_uniform() -> None:
    sp = _space()
    ev = Counter(sp, [0, 0, 0, 1, 0])  # checkpoint 3 alone is the optimum
    b = baselines(sp, ev)
    assert b["last"][0].members == (4,) and b["best_single"][0].members == (3,)
    assert b["best_single"][1] == 0.0 and b["uniform"][0].members == (0, 1, 2, 3, 4)
    assert ev.calls == 6


def test_greedy_soup_finds_the_known_soup() -> None:
    # Optimum: the uniform average of checkpoints 1, 2 and 4. Single scores rank 2, 1, 4
    # first, then 3 and 0; greedy adds 1 and 4 to 2 and refuses 3 and 0.
    sp = _space()
    target = [0, 1 / 3, 1 / 3, 0, 1 / 3]
    ev = Counter(sp, target)
    singles = [g for _, g in (baselines(sp, ev)[f"single:{i}"] for i in range(5))]
    tried = greedy_search(sp, ev, 10, singles)
    best = max(tried, key=lambda cg: cg[1])
    assert best[0].members == (1, 2, 4) and best[1] == pytest.approx(0.0, abs=1e-15)
    assert len(tried) == 4  # one trial per other checkpoint
    # The budget caps the trials.
    assert len(greedy_search(sp, Counter(sp, target), 2, singles)) <= 3


def test_cma_es_finds_known_interior_weights() -> None:
    sp = _space()
    target = [0.1, 0.35, 0.2, 0.25, 0.1]
    ev = Counter(sp, target)
    tried = weights_search(sp, ev, 400, start=None, seed=0)
    best, _ = max(tried, key=lambda cg: cg[1])
    assert best.weight_vector(sp) == pytest.approx(target, abs=0.02)
    assert ev.calls <= 400 and best.kind == "weights"
    # Deterministic: the same seed and objective give the same candidates.
    again = weights_search(sp, Counter(sp, target), 400, start=None, seed=0)
    assert [c for c, _ in again] == [c for c, _ in tried]


def test_cma_es_starts_from_the_given_weights() -> None:
    sp = _space()
    start = mwa(sp, 8.0).weight_vector(sp)
    ev = Counter(sp, start)  # the start is the optimum: CMA-ES's first generation is near it
    tried = weights_search(sp, ev, 10, start=start, sigma=0.05)
    assert max(g for _, g in tried) > -1e-3


def test_penalty_search_refines_to_the_known_penalty() -> None:
    sp = _space()
    p_star = 5.0
    target = mwa(sp, p_star).weight_vector(sp)
    ev = Counter(sp, target)
    tried = penalty_search(sp, ev, 24)
    best, _ = max(tried, key=lambda cg: cg[1])
    assert best.transform == "power"
    assert best.penalty == pytest.approx(p_star, rel=0.1)
    assert len(tried) <= 24
    # The coarse grid is scaled by the spread of log(loss).
    logs = [math.log(v) for v in LOSSES]
    mean = sum(logs) / 5
    s = math.sqrt(sum((x - mean) ** 2 for x in logs) / 5)
    grid = sorted(c.penalty for c, _ in tried[:5] if c.penalty is not None)
    assert grid == [round_sig(c / s, 4) for c in GRID]


def test_penalty_search_tries_each_loss_window() -> None:
    sp = _space()
    sp = Space(
        sp.base,
        sp.specs,
        sp.names,
        metrics={
            "since_save": tuple({"loss": v} for v in LOSSES),
            1: tuple({"loss": v * (1.3 if i == 3 else 1.0)} for i, v in enumerate(LOSSES)),
        },
    )
    tried = penalty_search(sp, Counter(sp, [0.2] * 5), 30)
    assert {(c.transform, c.loss_window) for c, _ in tried} >= {
        ("power", "since_save"),
        ("power", 1),
        ("softmax", "since_save"),
    }
    assert mwa(sp, 1.0, "power", 1).recipe(sp)["loss_window"] == 1


def test_last_search_ks() -> None:
    sp = _space()
    tried = last_search(sp, Counter(sp, [0, 0, 0, 0.5, 0.5]), 10)
    assert [c.members for c, _ in tried] == [(3, 4), (2, 3, 4), (1, 2, 3, 4)]
    assert max(tried, key=lambda cg: cg[1])[0].name == "last 2"
    assert len(last_search(_space(), Counter(sp, [0.2] * 5), 2)) == 2
