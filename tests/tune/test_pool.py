"""Scale-out: local worker processes and Ray actors give the in-process results; a worker that
dies loses only its candidate, which is scored again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mwakit.tune import tune
from mwakit.tune.scoring import ScorerSpec
from tests.tune.conftest import write_recipe

ROOT = Path(__file__).resolve().parents[2]
HASH = ScorerSpec("tests.tune.helpers:HashScorer")
SEARCHES = "penalty,last,greedy"


def _values(res: Any) -> dict[tuple[str, str, str], float]:
    # By label, not key: the key also hashes the scorer's name, which differs here.
    return {(t.name, t.search, t.split): t.score.value for t in res.trials}


@pytest.fixture(scope="module")
def in_process(tune_run: Path, val_test: tuple[Path, Path], tmp_path_factory: Any) -> Any:
    tmp = tmp_path_factory.mktemp("inproc")
    return tune(
        write_recipe(tmp, tune_run), data=val_test[0], searches=SEARCHES, budget=4, scorer=HASH
    )


def test_local_workers_equal_in_process(
    in_process: Any, tune_run: Path, val_test: tuple[Path, Path], tmp_path: Path
) -> None:
    crash = ScorerSpec("tests.tune.helpers:CrashOnce", {"marker": str(tmp_path / "died")})
    res = tune(
        write_recipe(tmp_path, tune_run),
        data=val_test[0],
        searches=SEARCHES,
        budget=4,
        scorer=crash,
        workers=2,
        trial_log=tmp_path / "log.jsonl",
    )
    assert (tmp_path / "died").is_file()  # a worker really died on "last 2"…
    assert _values(res) == _values(in_process)  # … and its candidate was scored again
    assert res.best.name == in_process.best.name
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 1 + len(res.trials)


@pytest.mark.slow
def test_ray_actors_equal_in_process_and_survive_a_dead_actor(
    ray_cluster: None, in_process: Any, tune_run: Path, val_test: tuple[Path, Path], tmp_path: Path
) -> None:
    crash = ScorerSpec("tests.tune.helpers:CrashOnce", {"marker": str(tmp_path / "died")})
    res = tune(
        write_recipe(tmp_path, tune_run),
        data=val_test[0],
        searches=SEARCHES,
        budget=4,
        scorer=crash,
        ray=True,
        workers=2,
    )
    assert (tmp_path / "died").is_file()
    assert _values(res) == _values(in_process)
    assert res.best.name == in_process.best.name


@pytest.mark.slow
def test_ray_with_the_real_scorer_equals_in_process(
    ray_cluster: None, tune_base: Path, tune_run: Path, val_test: tuple[Path, Path], tmp_path: Path
) -> None:
    # Each actor loads the base model once and scores the candidates the driver hands it.
    kw: dict[str, Any] = dict(data=val_test[0], base=tune_base, searches="last", budget=2)
    here = tune(write_recipe(tmp_path, tune_run), **kw)
    there = tune(write_recipe(tmp_path, tune_run), ray=True, workers=2, **kw)
    want = _values(here)
    assert set(_values(there)) == set(want)
    for k, v in _values(there).items():
        assert v == pytest.approx(want[k], abs=1e-6), k
