"""Honest selection (paired SEs, the simpler-within-1-SE rule) and the resumable trial log."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mwakit.errors import UsageError
from mwakit.tune.candidates import Candidate
from mwakit.tune.select import choose, paired, standard_error
from mwakit.tune.trials import Score, Trial, TrialLog


def _c(name: str, kind: str) -> Candidate:
    return Candidate(name, kind, "test", (0, 1))


def test_standard_error_and_paired_difference() -> None:
    assert standard_error([1.0, 2.0, 3.0, 4.0]) == pytest.approx(math.sqrt(5 / 3 / 4))
    assert math.isnan(standard_error([1.0]))
    a = Score(2.0, (1.0, 2.0, 3.0))
    b = Score(2.5, (1.5, 2.5, 3.5))
    # Lower is better (loss): a beats b by exactly 0.5 on every row, so the SE is 0.
    assert paired(a, b, -1) == (pytest.approx(0.5), 0.0)
    assert paired(a, Score(1.0), -1) == (
        1.0 * -1 * (2.0 - 1.0),
        pytest.approx(math.nan, nan_ok=True),
    )


def test_the_winner_is_kept_when_it_beats_the_simpler_by_more_than_1_se() -> None:
    uni = Score(1.00, (1.0, 1.1, 0.9, 1.0))
    gre = Score(0.90, (0.9, 1.0, 0.8, 0.9))  # 0.1 better on every row: SE 0
    ch = choose([(_c("uniform", "uniform"), uni), (_c("soup", "greedy"), gre)], -1)
    assert ch.candidate.name == "soup" and ch.winner.name == "soup"
    assert "better than uniform by 0.1" in ch.reason


def test_a_simpler_candidate_within_1_se_wins_and_says_so() -> None:
    uni = Score(1.000, (1.0, 1.2, 0.8, 1.0))
    mwa = Score(0.995, (0.9, 1.3, 0.8, 0.98))
    w = Score(0.990, (1.1, 1.0, 0.9, 0.96))  # the best on VAL, but within noise of uniform
    scored = [(_c("uniform", "uniform"), uni), (_c("mwa", "mwa"), mwa), (_c("w", "weights"), w)]
    ch = choose(scored, -1)
    gain, se = paired(w, uni, -1)
    assert 0 < gain <= se
    assert ch.candidate.name == "uniform" and ch.winner.name == "w"
    assert "within 1 SE, so the simpler merge wins" in ch.reason
    assert ch.margin == pytest.approx(gain)


def test_higher_is_better_and_ties_go_to_the_simpler() -> None:
    a = Score(0.5, (1.0, 0.0))
    ch = choose([(_c("w", "weights"), a), (_c("u", "uniform"), a)], +1)
    assert ch.candidate.name == "u" and ch.winner.name == "u"
    with pytest.raises(ValueError):
        choose([], 1)


def _trial(key: str, v: float, split: str = "val") -> Trial:
    return Trial(key, split, f"c{key}", "penalty", "mwa", Score(v, (v, v + 1), 0.5, 0.01))


def test_trial_log_resumes_and_skips_a_cut_last_line(tmp_path: Path) -> None:
    path = tmp_path / "trials.jsonl"
    ctx = {"data": "sha-a", "metric": "loss"}
    log = TrialLog(path, ctx)
    log.add(_trial("k1", 1.0))
    log.add(_trial("k2", math.nan))  # NaN survives JSON as a string
    with path.open("a") as f:
        f.write('{"key": "k3", "split": "va')  # an interrupted write
    again = TrialLog(path, ctx)
    assert again.resumed == 2 and again.get("k1", "val") == log.get("k1", "val")
    t2 = again.get("k2", "val")
    assert t2 is not None and math.isnan(t2.score.value)
    assert again.get("k3", "val") is None
    again.add(_trial("k3", 3.0, "test"))
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(x) for x in lines)
    assert TrialLog(path, ctx).get("k3", "test") is not None


def test_trial_log_of_another_tune_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "trials.jsonl"
    TrialLog(path, {"data": "sha-a", "metric": "loss"}).add(_trial("k1", 1.0))
    with pytest.raises(UsageError, match=r"another tune \(different data\)"):
        TrialLog(path, {"data": "sha-b", "metric": "loss"})
    (tmp_path / "junk.jsonl").write_text("hello\n")
    with pytest.raises(UsageError, match="not a tune trial log"):
        TrialLog(tmp_path / "junk.jsonl", {})
