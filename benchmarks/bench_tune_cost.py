"""Benchmark: what tune pays per candidate on a real run — plan, merge, swap vs evaluation.

Needs the real SmolLM2 runs of benchmarks/quality.py (``--cache``/quality: run-seed0,
data-v1, the trial log of seed 0) and the base folder (``--cache``/smollm2-135m-instruct).

``steps`` (default): the first K+1 VAL candidates of ≥ 10 checkpoints from the seed-0 trial
log, each planned, merged in memory and scored the way `mwakit.tune.scoring.ModelScorer`
does (input cache and header memo, unless ``--no-cache``); prints plan, merge, swap and
evaluation per candidate and their means after the first. ``tune``: a short real tune with
a fresh trial log (``--searches``, ``--budget``), then the trial log's merge + swap against
evaluation: overall, median, worst, and for candidates of ≥ 10 checkpoints.

Measured (Dec 2026, quiet 2-core box, one thread; benchmarks/QUALITY.md "Cost per
candidate"): steps, 8 candidates of 20 checkpoints: plan 33 ms (median), merge 75 ms, swap
3 ms vs evaluation 3.28 s = 4.1 % overall, 3.4 % median (before the cache: 15.0 %); tune
penalty,last budget 6: 2.7 % overall, 3.0 % for ≥ 10 checkpoints (before: 6.5 %, 15.2 %).
With the output head computed only at scored positions (the evaluation 25 % cheaper): steps
4.8 % overall, 4.0 % median (``--full-logits``: 3.6 %, 3.1 %); tune 2.8 %, 3.2 %.

Usage (under the bench lock)::

    python benchmarks/bench_tune_cost.py steps [--candidates 8] [--no-cache]
    python benchmarks/bench_tune_cost.py tune [--searches penalty,last] [--budget 6]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def steps(cache_root: Path, k: int, use_cache: bool, full_logits: bool = False) -> None:
    """Plan, merge, swap and evaluate K+1 logged candidates; print the split."""
    from mwakit.evaluate import Evaluator, load_rows
    from mwakit.io.cache import InputCache
    from mwakit.io.header import HeaderMemo, remembered_headers
    from mwakit.memory import merge_in_memory
    from mwakit.recipe import parse_recipe
    from mwakit.validate import checked_plan

    q = cache_root / "quality"
    lines = (q / "trials-run-seed0.jsonl").read_text().splitlines()[1:]
    recipes = [
        t["recipe"]
        for t in map(json.loads, lines)
        if t.get("split") == "val" and len(t.get("recipe", {}).get("checkpoints", [])) >= 10
    ][: k + 1]
    ev = Evaluator(cache_root / "smollm2-135m-instruct", metrics=("exact_match",))
    if full_logits:
        ev.trim_logits = False  # the output head at every position, as before it was trimmed
    rows = load_rows(q / "data-v1" / "val.jsonl")
    ev.encode(rows)
    cache = InputCache() if use_cache else None
    headers: HeaderMemo = {}
    got = []
    for i, r in enumerate(recipes):
        t0 = time.perf_counter()
        with remembered_headers(headers) if use_cache else contextlib.nullcontext():
            plan = checked_plan(parse_recipe(dict(r)))
        t1 = time.perf_counter()
        merged = merge_in_memory(plan, cache=cache)
        t2 = time.perf_counter()
        res = ev.score(rows, merged)
        row = (t1 - t0, t2 - t1, res.swap_seconds, res.seconds - res.swap_seconds)
        print(
            f"{i} {r['method']:6} n={len(r['checkpoints'])} plan {row[0] * 1e3:6.1f} ms "
            f"merge {row[1] * 1e3:6.1f} ms swap {row[2] * 1e3:5.1f} ms eval {row[3]:5.2f} s "
            f"= {sum(row[:3]) / row[3]:6.1%}",
            flush=True,
        )
        if i:
            got.append(row)
    if not got:
        return
    p, m, s, e = (sum(x[j] for x in got) / len(got) for j in range(4))
    med = statistics.median(sum(x[:3]) / x[3] for x in got)
    print(
        f"mean over {len(got)} after the first: plan {p * 1e3:.0f} ms, merge {m * 1e3:.0f} ms, "
        f"swap {s * 1e3:.0f} ms, eval {e:.2f} s: (plan + merge + swap) / eval "
        f"{(p + m + s) / e:.1%} overall, {med:.1%} median"
    )


def _cost(trials: list[dict[str, Any]], what: str) -> None:
    if not trials:
        return
    fr = sorted(d["merge_seconds"] / (d["seconds"] - d["merge_seconds"]) for d in trials)
    m = sum(d["merge_seconds"] for d in trials)
    e = sum(d["seconds"] - d["merge_seconds"] for d in trials)
    n = len(trials)
    print(
        f"{what} ({n}): merge + swap {1e3 * m / n:.0f} ms vs eval {e / n:.2f} s per candidate: "
        f"overall {m / e:.1%}, median {fr[n // 2]:.1%}, worst {fr[-1]:.1%}"
    )


def real_tune(cache_root: Path, searches: str, budget: int) -> None:
    """A short tune with a fresh trial log; the log's cost per candidate."""
    from mwakit.recipe import parse_recipe
    from mwakit.tune import tune

    q = cache_root / "quality"
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "trials.jsonl"
        recipe = {
            "name": "quality-run-seed0",
            "method": "mwa",
            "params": {"metric": "loss", "penalty": 0.7},
            "select": {"run": str(q / "run-seed0"), "last": 20},
            "output": {"path": str(Path(d) / "never")},
        }
        t0 = time.perf_counter()
        res = tune(
            parse_recipe(recipe),
            data=q / "data-v1" / "val.jsonl",
            base=cache_root / "smollm2-135m-instruct",
            metric="exact_match",
            searches=searches,
            budget=budget,
            trial_log=log,
            plot=False,
        )
        took = time.perf_counter() - t0
        print(f"tune {took:.0f} s: chose {res.best.name} (VAL {res.best.val.value:.4f})")
        trials = [json.loads(x) for x in log.read_text().splitlines()[1:]]
    _cost(trials, "every trial")
    _cost([t for t in trials if len(t["recipe"].get("checkpoints", [])) >= 10], ">= 10 checkpoints")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("mode", nargs="?", choices=["steps", "tune"], default="steps")
    ap.add_argument("--cache", type=Path, default=Path("/work/cache"), help="quality.py's cache")
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--no-cache", action="store_true", help="steps: no input cache, no memo")
    ap.add_argument(
        "--full-logits", action="store_true", help="steps: the output head at every position"
    )
    ap.add_argument("--searches", default="penalty,last")
    ap.add_argument("--budget", type=int, default=6)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if a.mode == "steps":
        steps(a.cache, a.candidates, not a.no_cache, a.full_logits)
    else:
        real_tune(a.cache, a.searches, a.budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
