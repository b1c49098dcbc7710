"""tune.scoring: candidates after the first read nothing, and score exactly as without a cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mwakit.memory import merge_in_memory
from mwakit.recipe import parse_recipe
from mwakit.tune import tune
from mwakit.tune.scoring import ModelScorer
from tests.io.samples import counting_reads
from tests.tune.conftest import write_recipe


def _recipes(run: Path, out: Path) -> list[dict[str, Any]]:
    cks = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    common = {"device": "cpu", "output": {"path": str(out)}}
    return [
        {"method": "linear", "checkpoints": [{"path": str(c)} for c in cks], **common},
        {"method": "mwa", "params": {"penalty": 3.0}, "select": {"run": str(run)}, **common},
        {
            "method": "linear",
            "checkpoints": [
                {"path": str(c), "weight": w} for c, w in zip(cks, (1, 0, 2, 3, 1), strict=True)
            ],
            **common,
        },
        {"method": "linear", "checkpoints": [{"path": str(cks[-1])}], **common},  # a copy
        {
            "method": "ties",
            "params": {"density": 0.5},
            "lora_space": "delta",
            "delta_rank": 4,
            "select": {"run": str(run), "last": 3},
            **common,
        },
    ]


def test_cached_scorer_reads_nothing_after_the_first_candidate_and_scores_the_same(
    tune_base: Path, tune_run: Path, val_test: tuple[Path, Path], tmp_path: Path
) -> None:
    val, _ = val_test
    data = {"val": str(val)}
    cached = ModelScorer(str(tune_base), data)
    plain = ModelScorer(str(tune_base), data, cache_memory=0)
    assert plain.cache is None and cached.cache is not None
    recipes = _recipes(tune_run, tmp_path / "never")
    first = cached.score(recipes[0], "val")  # reads every checkpoint once
    held = cached.cache.nbytes
    assert held > 0 and cached.cache.misses == len(cached.cache)

    with counting_reads() as reads:
        got = [first] + [cached.score(r, "val") for r in recipes[1:]]
    assert reads == [], "candidates 2..N read nothing from disk"
    assert cached.cache.nbytes == held and cached.cache.hits > 0
    want = [plain.score(r, "val") for r in recipes]
    for g, w in zip(got, want, strict=True):
        assert g.value == w.value and g.per_row == w.per_row
    # The merged tensors are bitwise those of an uncached merge, and none shares the
    # cache's memory (the copy candidate included).
    for r in recipes:
        a = merge_in_memory(parse_recipe(r), cache=cached.cache)
        b = merge_in_memory(parse_recipe(r))
        assert list(a.tensors) == list(b.tensors)
        for k, t in a.tensors.items():
            assert torch.equal(t.view(torch.uint8), b.tensors[k].view(torch.uint8)), k
            assert not cached.cache.owns(t), k


def test_a_checkpoint_rewritten_between_candidates_is_read_again(
    tune_base: Path, make_adapter: Any, val_test: tuple[Path, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    for i in range(2):
        make_adapter(run / f"checkpoint-{i + 1}", seed=i + 1)
    val, _ = val_test
    scorer = ModelScorer(str(tune_base), {"val": str(val)})
    recipe = {"method": "linear", "select": {"run": str(run)}, "output": {"path": "never"}}
    before = scorer.score(recipe, "val")
    # checkpoint-2 becomes another adapter of the very same layout and size
    make_adapter(tmp_path / "other", seed=7)
    target = run / "checkpoint-2" / "adapter_model.safetensors"
    target.write_bytes((tmp_path / "other" / "adapter_model.safetensors").read_bytes())
    st = os.stat(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    after = scorer.score(recipe, "val")
    fresh = ModelScorer(str(tune_base), {"val": str(val)}, cache_memory=0).score(recipe, "val")
    assert after.value == fresh.value and after.per_row == fresh.per_row
    assert after.value != before.value


def test_tune_with_the_cache_equals_tune_without(
    tune_base: Path, tune_run: Path, val_test: tuple[Path, Path], tmp_path: Path
) -> None:
    val, test = val_test
    kw: dict[str, Any] = dict(
        data=val, test=test, base=tune_base, searches="penalty,greedy", budget=4, plot=False
    )
    a = tune(write_recipe(tmp_path, tune_run), **kw)
    b = tune(write_recipe(tmp_path, tune_run), cache_memory=0, **kw)
    assert [(t.key, t.split, t.score.value, t.score.per_row) for t in a.trials] == [
        (t.key, t.split, t.score.value, t.score.per_row) for t in b.trials
    ]
    assert a.best.name == b.best.name and a.recipe == b.recipe
