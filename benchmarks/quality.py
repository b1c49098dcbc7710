"""Does tuning the merge pay on a real model? (issue #9, Evidence)

SmolLM2-135M-Instruct, a LoRA run with the real Trainer per seed, 20 checkpoints each; then
per seed: the last checkpoint, the best single checkpoint (by VAL), the uniform average, MWA
at the paper's penalties and each search's choice, all scored on TEST with paired standard
errors against the uniform average. See `benchmarks/quality_task.py` for the model, the task
and the runs, and benchmarks/QUALITY.md for the results.

Usage (long: run it under the benchmark lock, one thread)::

    flock /tmp/mwakit-bench.lock nice -n 10 python benchmarks/quality.py --train-only
    flock /tmp/mwakit-bench.lock nice -n 10 python benchmarks/quality.py

Runs, data and per-candidate scores are cached under ``--cache``/quality, so a re-run skips
training and every evaluation it already did. Nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_task as qt

#: Training and task settings: part of every cached run's key (run.json).
STEPS = 160
SAVE_STEPS = 8  # -> 20 checkpoints
BATCH = 8
LR = 2e-3
RANK = 8
ALPHA = 16
TRAIN_ROWS = 2000
VAL_ROWS = 150
TEST_ROWS = 300
DATA_SEED = 1234


def train_all(cache: Path, seeds: list[int]) -> tuple[Path, dict[str, Path], dict[int, Path]]:
    """Base model, task files and one LoRA run per seed, each built once and then reused."""
    import torch

    torch.set_num_threads(1)
    base = qt.prepare_base(cache)
    root = cache / "quality"
    data = qt.write_task(
        root / f"data-v{qt.TASK_VERSION}",
        seed=DATA_SEED,
        train=TRAIN_ROWS,
        val=VAL_ROWS,
        test=TEST_ROWS,
    )
    train_rows = [json.loads(line) for line in data["train"].read_text().splitlines()]
    runs: dict[int, Path] = {}
    for seed in seeds:
        run, wall = qt.train_run(
            base,
            train_rows,
            root / f"run-seed{seed}",
            seed=seed,
            steps=STEPS,
            save_steps=SAVE_STEPS,
            batch=BATCH,
            lr=LR,
            r=RANK,
            alpha=ALPHA,
        )
        what = f"trained in {wall:.0f} s" if wall else "cached"
        print(f"seed {seed}: {run} ({what})", flush=True)
        runs[seed] = run
    return base, data, runs


# ---------------------------------------------------------------- candidates and their scores

#: MWA settings scored on every seed: the paper's penalties (loss p 0.5-0.8, step p 1.0, over
#: the run's checkpoints), then the trap the issue measured (a large penalty on the one-batch
#: logged loss, ``loss_window: 1``) and its fix, mwakit's default ``loss_window: since_save``
#: (the mean of the losses logged since the previous checkpoint: 8 batches here).
MWA_ROWS: list[tuple[str, dict[str, Any], int | str]] = [
    ("mwa loss p=0.5", {"metric": "loss", "penalty": 0.5}, 1),
    ("mwa loss p=0.8", {"metric": "loss", "penalty": 0.8}, 1),
    ("mwa step p=1.0", {"metric": "step", "penalty": 1.0}, 1),
    ("mwa loss p=8 (1 batch)", {"metric": "loss", "penalty": 8.0}, 1),
    ("mwa loss p=8 (since_save)", {"metric": "loss", "penalty": 8.0}, "since_save"),
]
#: Uniform averages of the last k checkpoints (the study: last 5-10 beat the last checkpoint).
LAST_K = (5, 10)


@dataclass
class Candidate:
    """One merge to score: a single checkpoint folder or a recipe (merged in memory)."""

    name: str
    group: str  # "baseline", "mwa", "last-k" or "tune"
    checkpoint: Path | None = None
    recipe: dict[str, Any] | None = None

    def key(self) -> str:
        """A hash of what is merged (not of the name): the score cache's key."""
        what = {"checkpoint": str(self.checkpoint)} if self.checkpoint else self.recipe
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def checkpoints_of(run: Path) -> list[Path]:
    """The run's ``checkpoint-<N>`` folders by step."""
    found = [p for p in run.glob("checkpoint-*") if p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def base_recipe(run: Path, out: Path) -> dict[str, Any]:
    """The recipe tune starts from: MWA over all of the run's checkpoints (tune varies the
    method, params and loss_window; the default window is ``since_save``)."""
    return {
        "name": f"quality-{run.name}",
        "method": "mwa",
        "params": {"metric": "loss", "penalty": 0.7},
        "select": {"run": str(run), "last": STEPS // SAVE_STEPS},
        "output": {"path": str(out), "overwrite": True},
    }


def linear_recipe(cks: list[Path], out: Path, name: str) -> dict[str, Any]:
    """A uniform average of ``cks`` (`linear`, equal weights)."""
    return {
        "name": name,
        "method": "linear",
        "params": {"normalize": True},
        "checkpoints": [{"path": str(c), "weight": 1.0} for c in cks],
        "output": {"path": str(out), "overwrite": True},
    }


def fixed_candidates(run: Path, out: Path) -> list[Candidate]:
    """Every checkpoint, the uniform average, last-k averages and the MWA rows of one run."""
    cks = checkpoints_of(run)
    cands = [Candidate(c.name, "single", checkpoint=c) for c in cks]
    cands.append(Candidate("uniform", "baseline", recipe=linear_recipe(cks, out, "uniform")))
    for k in LAST_K:
        r = linear_recipe(cks[-k:], out, f"last-{k}")
        cands.append(Candidate(f"uniform last {k}", "last-k", recipe=r))
    for name, params, window in MWA_ROWS:
        r = base_recipe(run, out)
        r.update(params={**r["params"], **params}, loss_window=window)
        cands.append(Candidate(name, "mwa", recipe=r))
    return cands


@dataclass
class Score:
    """One candidate on one split: the metric per row, and what the scoring cost."""

    em: list[float]
    loss: float
    merge_s: float
    swap_s: float
    eval_s: float

    @property
    def mean(self) -> float:
        """Exact match in points (0-100)."""
        return 100.0 * sum(self.em) / len(self.em)


class Scorer:
    """Scores candidates with one loaded model, memoised on disk (JSON lines)."""

    def __init__(self, base: Path, log: Path) -> None:
        from mwakit.evaluate import Evaluator

        self.ev = Evaluator(base, metrics=("exact_match", "loss"))
        self.log = log
        self.memo: dict[str, Score] = {}
        if log.is_file():
            for line in log.read_text().splitlines():
                d = json.loads(line)
                self.memo[d["key"]] = Score(**d["score"])

    def score(self, cand: Candidate, split: str, rows: list[Any]) -> Score:
        """The candidate's score on ``rows`` (the ``split`` names them in the memo)."""
        key = f"{cand.key()}:{split}:{len(rows)}"
        if key in self.memo:
            return self.memo[key]
        from mwakit.evaluate.target import resolve_target
        from mwakit.memory import merge_in_memory
        from mwakit.recipe import parse_recipe

        t0 = time.perf_counter()
        if cand.checkpoint is not None:
            adapter = resolve_target(cand.checkpoint).adapter
        else:
            assert cand.recipe is not None
            adapter = merge_in_memory(parse_recipe(cand.recipe))
        merge_s = time.perf_counter() - t0
        res = self.ev.score(rows, adapter)
        s = Score(
            em=res.per_row["exact_match"],
            loss=res.metrics["loss"],
            merge_s=merge_s if cand.recipe is not None else 0.0,
            swap_s=res.swap_seconds,
            eval_s=res.seconds - res.swap_seconds,
        )
        self.memo[key] = s
        with self.log.open("a") as f:
            f.write(json.dumps({"key": key, "name": cand.name, "score": asdict(s)}) + "\n")
        return s


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of a - b on the same rows, in points."""
    d = [100.0 * (x - y) for x, y in zip(a, b, strict=True)]
    n = len(d)
    m = sum(d) / n
    var = sum((x - m) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    return m, math.sqrt(var / n)


#: Searches run by `mwakit.tune` (each one's best, and tune's choice, are scored on TEST).
SEARCHES = ("penalty", "last", "greedy", "weights")


def tune_candidates(
    run: Path, out: Path, data: dict[str, Path], base: Path, budget: int, log: Path
) -> tuple[list[Candidate], str]:
    """Run `mwakit.tune` on VAL over the run's checkpoints: each search's best and the choice.

    Returns:
        (the candidates, tune's reason for its choice); ([], why) when tune is not importable.
    """
    try:
        from mwakit.tune import tune
    except ImportError as err:
        return [], f"mwakit.tune not importable ({err})"
    from mwakit.recipe import parse_recipe

    res = tune(
        parse_recipe(base_recipe(run, out)),
        data=data["val"],
        test=data["test"],
        base=base,
        metric="exact_match",
        searches=SEARCHES,
        budget=budget,
        trial_log=log,
        plot=False,
    )
    cands = [
        Candidate(f"tune {name}: best ({e.name})", "search", recipe=e.recipe)
        for name, e in res.searches.items()
    ]
    cands.append(Candidate(f"tune choice ({res.best.name})", "choice", recipe=res.recipe))
    return cands, res.reason


@dataclass
class SeedResult:
    """Everything measured on one seed."""

    seed: int
    rows: list[tuple[Candidate, Score, Score]]  # candidate, VAL, TEST
    uniform_test: Score
    reason: str
    trained_s: float


def evaluate_seed(
    seed: int,
    run: Path,
    scorer: Scorer,
    data: dict[str, Path],
    base: Path,
    budget: int,
    use_tune: bool,
) -> SeedResult:
    """Score the fixed candidates (and tune's) of one run on VAL, then the reported on TEST."""
    from mwakit.evaluate import load_rows

    val, test = load_rows(data["val"]), load_rows(data["test"])
    out = run.parent / "out" / run.name  # never written: merges stay in memory
    cands = fixed_candidates(run, out)
    scored = [(c, scorer.score(c, "val", val)) for c in cands]
    singles = [(c, s) for c, s in scored if c.group == "single"]
    last = singles[-1]
    # Ties go to the later checkpoint: what a user keeping "the best so far" would hold.
    best = max(reversed(singles), key=lambda cs: cs[1].mean)
    report = [
        (Candidate(f"last ({last[0].name})", "baseline", checkpoint=last[0].checkpoint), last[1]),
        (Candidate(f"best single ({best[0].name})", "baseline", checkpoint=best[0].checkpoint),
         best[1]),
    ]  # fmt: skip
    report += [(c, s) for c, s in scored if c.group != "single"]
    reason = "tune not run (--no-tune)"
    if use_tune:
        log = run.parent / f"trials-{run.name}.jsonl"
        tuned, reason = tune_candidates(run, out, data, base, budget, log)
        report += [(c, scorer.score(c, "val", val)) for c in tuned]
    rows = [(c, v, scorer.score(c, "test", test)) for c, v in report]
    uniform = next(t for c, _, t in rows if c.name == "uniform")
    spec = json.loads((run / "run.json").read_text())
    return SeedResult(seed, rows, uniform, reason, spec.get("train_s", 0.0))


def _cell(v: float, se: float | None = None) -> str:
    return f"{v:.1f}" if se is None else f"{v:+.1f} ± {se:.1f}"


def seed_table(r: SeedResult) -> str:
    """One seed's markdown table: VAL and TEST exact match, TEST gain over uniform ± SE."""
    lines = [
        f"Seed {r.seed} (trained in {r.trained_s:.0f} s):",
        "",
        "| candidate | VAL EM | TEST EM | TEST vs uniform | TEST loss |",
        "|---|---:|---:|---:|---:|",
    ]
    for c, v, t in r.rows:
        gain = "—" if c.name == "uniform" else _cell(*paired(t.em, r.uniform_test.em))
        lines.append(f"| {c.name} | {v.mean:.1f} | {t.mean:.1f} | {gain} | {t.loss:.3f} |")
    lines += ["", f"tune: {r.reason}", ""]
    return "\n".join(lines)


def _label(c: Candidate) -> str:
    """The seed-independent part of a candidate's name (drops "(checkpoint-80)" etc.)."""
    return c.name.split(" (")[0] if c.group in ("baseline", "search", "choice") else c.name


def mean_table(results: list[SeedResult]) -> str:
    """Mean over seeds; the SE pairs rows across candidates and averages them over seeds."""
    by_seed = [{_label(c): (v, t) for c, v, t in r.rows} for r in results]
    lines = [
        f"Mean over {len(results)} seeds (TEST {len(results[0].uniform_test.em)} rows):",
        "",
        "| candidate | VAL EM | TEST EM | TEST vs uniform | worst seed vs uniform |",
        "|---|---:|---:|---:|---:|",
    ]
    uni = [r.uniform_test.em for r in results]
    n, k = len(uni[0]), len(results)
    for label in by_seed[0]:
        if not all(label in d for d in by_seed):
            continue
        got = [d[label] for d in by_seed]
        val = sum(v.mean for v, _ in got) / k
        test = sum(t.mean for _, t in got) / k
        # Per row: the mean over seeds of (candidate - uniform); its SE over rows.
        a = [sum(t.em[i] for _, t in got) / k for i in range(n)]
        b = [sum(u[i] for u in uni) / k for i in range(n)]
        worst = min(paired(t.em, u)[0] for (_, t), u in zip(got, uni, strict=True))
        gain = "—" if label == "uniform" else _cell(*paired(a, b))
        w = "—" if label == "uniform" else f"{worst:+.1f}"
        lines.append(f"| {label} | {val:.1f} | {test:.1f} | {gain} | {w} |")
    return "\n".join(lines) + "\n"


def cost_table(scorer: Scorer) -> str:
    """Merge + swap time against evaluation time per candidate (VAL rows, merged recipes)."""
    merged = [s for s in scorer.memo.values() if s.merge_s > 0]
    if not merged:
        return ""
    merged.sort(key=lambda s: (s.merge_s + s.swap_s) / s.eval_s)
    med = merged[len(merged) // 2]
    worst = merged[-1]
    tot = sum(s.merge_s + s.swap_s for s in merged) / sum(s.eval_s for s in merged)

    def frac(s: Score) -> str:
        return (
            f"merge {s.merge_s * 1000:.0f} ms + swap {s.swap_s * 1000:.0f} ms vs eval "
            f"{s.eval_s:.2f} s = {100 * (s.merge_s + s.swap_s) / s.eval_s:.1f} %"
        )

    return (
        f"Per-candidate cost over {len(merged)} merged candidates: median {frac(med)}; "
        f"worst {frac(worst)}; overall {100 * tot:.1f} %.\n"
    )


def tune_cost(logs: list[Path]) -> str:
    """What tune's own trials say: merge + swap seconds against the rest of each trial."""
    trials = []
    for log in logs:
        if log.is_file():
            for line in log.read_text().splitlines():
                d = json.loads(line)
                if "merge_seconds" in d and d.get("seconds", 0) > d["merge_seconds"]:
                    trials.append(d)
    if not trials:
        return ""
    fr = sorted(d["merge_seconds"] / (d["seconds"] - d["merge_seconds"]) for d in trials)
    many = [d for d in trials if len(d.get("recipe", {}).get("checkpoints", [])) >= 10]
    merge = sum(d["merge_seconds"] for d in trials)
    rest = sum(d["seconds"] - d["merge_seconds"] for d in trials)
    line = (
        f"tune's trial logs ({len(trials)} trials): merge + swap / evaluation: median "
        f"{100 * fr[len(fr) // 2]:.1f} %, overall {100 * merge / rest:.1f} %"
    )
    if many:
        mm = sum(d["merge_seconds"] for d in many) / len(many)
        ev = sum(d["seconds"] - d["merge_seconds"] for d in many) / len(many)
        line += (
            f"; candidates of >= 10 checkpoints ({len(many)}): {mm:.2f} s vs {ev:.2f} s "
            f"= {100 * mm / ev:.1f} %"
        )
    return line + ".\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("/work/cache"), help="cache root")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds (default 0,1,2)")
    ap.add_argument("--train-only", action="store_true", help="build model, data and runs; stop")
    ap.add_argument("--no-tune", action="store_true", help="skip mwakit.tune (fixed rows only)")
    ap.add_argument("--budget", type=int, default=16, help="tune budget per search (default 16)")
    ap.add_argument("--markdown", type=Path, help="also write the tables to this file")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    t0 = time.perf_counter()
    base, data, runs = train_all(a.cache.resolve(), seeds)
    print(f"training ready after {time.perf_counter() - t0:.0f} s", flush=True)
    if a.train_only:
        return 0
    scorer = Scorer(base, a.cache.resolve() / "quality" / "scores.jsonl")
    results = []
    for seed in seeds:
        r = evaluate_seed(seed, runs[seed], scorer, data, base, a.budget, not a.no_tune)
        results.append(r)
        print(seed_table(r), flush=True)
    text = "\n".join(seed_table(r) for r in results) + "\n" + mean_table(results)
    logs = [runs[s].parent / f"trials-{runs[s].name}.jsonl" for s in seeds]
    text += "\n" + cost_table(scorer) + tune_cost(logs)
    print(mean_table(results))
    print(cost_table(scorer) + tune_cost(logs))
    print(f"total {time.perf_counter() - t0:.0f} s")
    if a.markdown:
        a.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
