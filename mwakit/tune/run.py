"""`tune`: baselines, searches, honest choice, TEST for the few, ``best.yaml``.

The recipe fixes the checkpoints (planned once, exactly as `mwakit run` would); the searches
propose candidates; each is merged in memory and scored on VAL by the pool (memoised by its
hash, logged for resume); the choice is made on VAL alone; TEST is scored for the baselines and
the chosen candidate only. The chosen recipe is written as a plain recipe with a ``tuning:``
block that the model card shows when it is run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mwakit import __version__
from mwakit.card import sha256_file
from mwakit.errors import MetricError, OutputError, UsageError
from mwakit.io.atomic import replace_file
from mwakit.recipe import Recipe, load_recipe
from mwakit.trainer_state import LossWindow
from mwakit.tune import searches as S
from mwakit.tune.candidates import Candidate, Space, recipe_key
from mwakit.tune.pool import Job, Pool, make_pool
from mwakit.tune.scoring import DEFAULT_FACTORY, ScorerSpec
from mwakit.tune.select import Choice, choose, paired, standard_error
from mwakit.tune.trials import Score, Trial, TrialLog

DEFAULT_BUDGET = 30
#: Loss windows the penalty search compares (kept when they change the metric).
WINDOWS: tuple[LossWindow, ...] = ("since_save", 1, 10)
OnTrial = Callable[[Trial, int, int], None]


@dataclass(frozen=True)
class Entry:
    """A candidate with its scores.

    Attributes:
        name: The candidate's label.
        kind: Its kind (``last``, ``uniform``, ``mwa``, …).
        search: The search that found it.
        val: Its VAL score.
        test: Its TEST score (baselines and the chosen one only), else None.
        recipe: The recipe data that merges it.
    """

    name: str
    kind: str
    search: str
    val: Score
    test: Score | None
    recipe: dict[str, Any] = field(compare=False)

    def to_json(self) -> dict[str, Any]:
        """name, kind, search, val, val_se, test, test_se (and nothing per row)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "search": self.search,
            "val": _num(self.val.value),
            "val_se": _num(standard_error(self.val.per_row)),
            "test": None if self.test is None else _num(self.test.value),
            "test_se": None if self.test is None else _num(standard_error(self.test.per_row)),
        }


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class TuneResult:
    """What `tune` found.

    Attributes:
        metric: The metric scored.
        direction: +1 when higher is better, −1 when lower is.
        baselines: ``last``, ``best_single``, ``uniform``.
        searches: The best candidate (on VAL) of each search run.
        best: The chosen candidate.
        reason: Why it was chosen (the simpler-within-1-SE rule says so).
        trials: Every trial scored or read back from the trial log.
        recipe: The chosen recipe, as written to ``best.yaml`` (with its ``tuning:`` block).
        out: Where ``best.yaml`` was written, if anywhere.
        plot: Where the plot was drawn, if anywhere.
        resumed: Trials read back from the trial log instead of scored.
        given: The recipe as given (its own method and params), scored on VAL for reference
            (and eligible for the choice as an MWA-tier candidate).
    """

    metric: str
    direction: int
    baselines: dict[str, Entry]
    searches: dict[str, Entry]
    best: Entry
    reason: str
    trials: list[Trial]
    recipe: dict[str, Any]
    out: Path | None = None
    plot: Path | None = None
    resumed: int = 0
    given: Entry | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document: baselines, best (with its recipe), searches, trials."""
        return {
            "metric": self.metric,
            "higher_is_better": self.direction > 0,
            "baselines": {k: e.to_json() for k, e in self.baselines.items()},
            "best": {**self.best.to_json(), "reason": self.reason, "recipe": self.recipe},
            "searches": {k: e.to_json() for k, e in self.searches.items()},
            "given": None if self.given is None else self.given.to_json(),
            "trials": [t.to_json() for t in self.trials],
            "out": None if self.out is None else str(self.out),
            "plot": None if self.plot is None else str(self.plot),
            "resumed": self.resumed,
        }

    def table(self) -> str:
        """The stdout table: baselines, the best of each search, the chosen one; VAL ± SE,
        the paired VAL gain over uniform, TEST ± SE (baselines and chosen only)."""
        uni = self.baselines["uniform"].val
        rows = [("baseline: " + k, e) for k, e in self.baselines.items()]
        rows += [("recipe as given", self.given)] if self.given is not None else []
        rows += [(f"{k}: best", e) for k, e in self.searches.items()]
        rows.append(("chosen", self.best))
        head = ["", "candidate", f"VAL {self.metric}", "vs uniform", f"TEST {self.metric}"]
        table = [head]
        for label, e in rows:
            gain, se = paired(e.val, uni, self.direction)
            test = "—" if e.test is None else _pm(e.test.value, standard_error(e.test.per_row))
            table.append(
                [
                    label,
                    e.name,
                    _pm(e.val.value, standard_error(e.val.per_row)),
                    "" if e.kind == "uniform" else f"{gain:+.4g} ± {_se(se)}",
                    test,
                ]
            )
        widths = [max(len(r[i]) for r in table) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                 for r in table]  # fmt: skip
        better = "higher" if self.direction > 0 else "lower"
        timed = [t.score for t in self.trials if t.score.seconds > 0]
        if timed:
            merge = math.fsum(s.merge_seconds for s in timed) / len(timed)
            share = math.fsum(s.merge_seconds for s in timed) / math.fsum(s.seconds for s in timed)
            lines += [
                "",
                f"{len(timed)} candidates scored: merge + swap {merge * 1e3:.0f} ms each on "
                f"average, {share:.1%} of the trial time",
            ]
        lines += [
            "",
            f"{better} is better; ± is one standard error, paired on the same rows for "
            "'vs uniform' (positive: better than uniform)",
            self.reason,
        ]
        return "\n".join(lines)


def _pm(v: float, se: float) -> str:
    return f"{v:.4f} ± {_se(se)}"


def _se(se: float) -> str:
    return "?" if math.isnan(se) else f"{se:.2g}"


def _count_rows(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _data_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UsageError(
            f"{what} data file not found" if not p.exists() else f"{what} data is not a file",
            where=str(p),
            fix="give a JSONL file of rows ({prompt, completion}, {text}, {messages} or "
            "{prompt, choices, label})",
        )
    return p


def _mwa_metric(recipe: Recipe) -> tuple[str, bool | None]:
    """The metric MWA candidates weigh by: the recipe's MWA metric, else ``loss``."""
    raw: Mapping[str, Any] = {}
    if recipe.method == "mwa":
        raw = recipe.params
    elif recipe.weighting is not None:
        raw = recipe.weighting.mwa
    metric = raw.get("metric", "loss")
    hib = raw.get("higher_is_better")
    return (metric if isinstance(metric, str) else "loss"), (hib if isinstance(hib, bool) else None)


def build_space(recipe: Recipe) -> Space:
    """Plan the recipe once and fix its checkpoints (in step order) into a `Space`.

    Raises:
        MwakitError: The recipe cannot be planned (as `mwakit plan` says).
        UsageError: Fewer than two checkpoints.
    """
    from mwakit.card import resolved_recipe
    from mwakit.trainer_state import read_metrics
    from mwakit.validate import checked_plan
    from mwakit.weights import metric_direction

    plan = checked_plan(recipe)
    cks = list(plan.checkpoints)
    if len(cks) < 2:
        raise UsageError(
            f"tune needs at least 2 checkpoints, the recipe gives {len(cks)}",
            where=recipe.source or "recipe",
            fix="select more checkpoints (e.g. select: {run: RUN, last: 10})",
        )
    if all(c.step is not None for c in cks):
        cks.sort(key=lambda c: c.step or 0)
    given = {s.path: s for s in recipe.checkpoints or []}
    specs = []
    for c in cks:
        spec: dict[str, Any] = {"path": c.pinned_ref}
        g = given.get(c.ref)
        if g is not None and g.metrics:
            spec["metrics"] = dict(g.metrics)
        specs.append(spec)
    metric, hib = _mwa_metric(recipe)
    try:
        higher = metric_direction(metric, hib)
    except MetricError:
        higher = None
    windows: dict[int | str, tuple[dict[str, float], ...]] = {}
    first: LossWindow = recipe.loss_window
    for w in (first, *(x for x in WINDOWS if x != first)):
        if w != first and any("metrics" in s for s in specs):
            break  # metrics given in the recipe: the window changes nothing
        rows = tuple(
            dict(c.metrics)
            if w == first
            else {**c.metrics, **read_metrics(c.path, loss_window=w).metrics}
            for c in cks
        )
        vec = [r.get(metric) for r in rows]
        if all(vec != [r.get(metric) for r in seen] for seen in windows.values()):
            windows[w] = rows
    # Only what the recipe sets: best.yaml stays as short as a hand-written recipe.
    base = recipe.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    base["output"] = recipe.output.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    base.pop("tuning", None)
    if base.pop("relative_to", "cwd") == "recipe":
        # Loading rebased the paths onto the recipe's folder; best.yaml lives elsewhere, so
        # it says where the output goes plainly (its checkpoints are absolute already).
        base["output"]["path"] = str(Path(recipe.output.path).resolve())
        if recipe.base_model is not None and not recipe.base_model.startswith("hf://"):
            base["base_model"] = str(Path(recipe.base_model).resolve())
    return Space(
        base=base,
        specs=tuple(specs),
        names=tuple(c.name for c in cks),
        metric=metric,
        higher_is_better=bool(higher),
        metrics=windows if higher is not None else {},
        given=_given(resolved_recipe(plan)),
    )


def _given(r: Recipe) -> dict[str, Any]:
    """The recipe as run (absolute checkpoints: a Ray actor runs elsewhere), minus its
    tuning block."""
    data = r.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    data = {"method": r.method, **data}  # said even when it is the default
    data["output"] = r.output.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    data.pop("tuning", None)
    return data


class _Tuner:
    """The state of one tune: the space, the pool, the log, progress."""

    def __init__(
        self,
        space: Space,
        pool: Pool,
        log: TrialLog,
        context: Mapping[str, Any],
        direction: int,
        total: int,
        on_trial: OnTrial | None,
    ) -> None:
        self.space, self.pool, self.log, self.context = space, pool, log, context
        self.direction, self.total, self.on_trial = direction, total, on_trial
        self.done = 0
        self.scored: dict[str, tuple[Candidate, Score]] = {}  # VAL, by key

    def key(self, c: Candidate) -> str:
        return recipe_key(c.recipe(self.space), self.context)

    def score(self, cands: Sequence[Candidate], split: str = "val") -> list[Score]:
        """Score candidates (memo, then the pool for the rest), in order."""
        keys = [self.key(c) for c in cands]
        jobs: dict[str, Job] = {}
        for c, k in zip(cands, keys, strict=True):
            if self.log.get(k, split) is None and k not in jobs:
                jobs[k] = Job(k, c.recipe(self.space), split)
        by_key = dict(zip(keys, cands, strict=True))
        for job, s in self.pool.run(list(jobs.values())):
            c = by_key[job.key]
            t = Trial(job.key, split, c.name, c.search, c.kind, s, job.recipe)
            self.log.add(t)
            self.done += 1
            if self.on_trial is not None:
                self.on_trial(t, self.done, self.total)
        out = []
        for c, k in zip(cands, keys, strict=True):
            got = self.log.get(k, split)
            assert got is not None
            if split == "val":
                self.scored.setdefault(k, (c, got.score))
            out.append(got.score)
        return out

    def evaluate(self, cands: Sequence[Candidate]) -> list[float]:
        """Goodness on VAL (NaN, a diverged merge, is the worst)."""
        return [
            self.direction * s.value if math.isfinite(s.value) else -math.inf
            for s in self.score(cands)
        ]


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _searches(names: Sequence[str] | str) -> list[str]:
    items = [s.strip() for s in names.split(",")] if isinstance(names, str) else list(names)
    bad = [s for s in items if s not in S.SEARCHES]
    if bad or not items:
        raise UsageError(
            f"unknown search {bad[0]!r}" if bad else "no search given",
            where="--search",
            fix=f"use one or more of {', '.join(S.SEARCHES)}, comma-separated",
        )
    # weights starts from the best MWA solution and groups varies it: both need penalty's.
    if {"weights", "groups"} & set(items):
        items.append("penalty")
    return [name for name in S.SEARCHES if name in items]  # prerequisites first


def _direction(metric: str) -> int:
    from mwakit.evaluate import metric_direction

    return int(metric_direction(metric))


def tune(
    recipe: Recipe | str | Path,
    *,
    data: str | Path,
    test: str | Path | None = None,
    base: str | Path | None = None,
    metric: str = "loss",
    searches: Sequence[str] | str = ("penalty",),
    budget: int = DEFAULT_BUDGET,
    out: str | Path | None = None,
    trial_log: str | Path | None = None,
    workers: int = 0,
    ray: str | bool | None = None,
    on_trial: OnTrial | None = None,
    tokenizer: str | Path | None = None,
    device: str = "cpu",
    plot: str | Path | bool | None = None,
    scorer: ScorerSpec | None = None,
    seed: int = 0,
    cache_memory: int | None = None,
) -> TuneResult:
    """Search how to merge a recipe's checkpoints, scoring every candidate on held-out data.

    Args:
        recipe: A recipe (file) whose checkpoints are fixed (e.g. ``select: {run, last: 20}``);
            its method, params, weighting, rules and loss_window are what tune varies.
        data: VAL: the JSONL rows every candidate is scored on (and chosen by).
        test: TEST: scored for the baselines and the chosen candidate only.
        base: The base model (default: the adapters' ``base_model_name_or_path``).
        metric: The metric to score by (``loss``, ``exact_match``, ``accuracy``, …).
        searches: Any of ``penalty``, ``last``, ``greedy``, ``weights``, ``groups`` (a list or
            a comma-separated string), run in that order; ``weights`` and ``groups`` bring
            ``penalty`` (they start from its best). The baselines are always scored.
        budget: The most candidates each search scores (the baselines are not counted).
        out: Where to write the chosen recipe (``best.yaml``); None writes nothing.
        trial_log: A JSONL trial log: scores already in it are reused (resume), new ones
            appended. Refused when written for other data, checkpoints, base or metric.
        workers: Local worker processes (≥ 2), or Ray actors with ``ray`` (0: the cluster's
            CPUs).
        ray: Score on Ray actors: True (or "") starts a local cluster, a string is its address.
        on_trial: Called after each new trial with (trial, trials done, expected total).
        tokenizer: The tokenizer folder (default: the base's).
        device: Where to evaluate (cpu, cuda, cuda:N).
        plot: Where to draw VAL against the penalty and the chosen weights (default with
            ``out``: beside it, ``<out>.png``); False draws nothing.
        scorer: Another scorer (tests, custom evaluation): a factory and its kwargs, given
            ``data`` and ``metric`` on top.
        seed: CMA-ES's seed.
        cache_memory: Bytes of checkpoint tensors each scorer keeps in memory across
            candidates (default: a quarter of the RAM, split among local ``workers``; 0: read
            them for every candidate).

    Returns:
        The baselines, each search's best, the chosen candidate and every trial.

    Raises:
        MwakitError: The recipe cannot be planned, a data file or the base is unusable, a
            search name is unknown (`UsageError`), or a candidate fails to merge.
    """
    names = _searches(searches)
    if budget < 1:
        raise UsageError("--budget must be at least 1", where="--budget", fix="give e.g. 30")
    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    val_path = _data_file(data, "VAL")
    test_path = None if test is None else _data_file(test, "TEST")
    space = build_space(r)
    if scorer is None:
        from mwakit.evaluate import load_rows

        for p in (val_path, test_path):
            if p is not None:
                load_rows(p)  # a bad row is reported here, before any model loads
        if base is None:
            base = _default_base(r)
    direction = _direction(metric)
    if out is not None:
        _check_out(Path(out))
    # Absolute paths: a Ray actor runs in a folder of its own.
    base, tokenizer = _absolute(base), _absolute(tokenizer)
    files = {"val": str(val_path.resolve())}
    if test_path is not None:
        files["test"] = str(test_path.resolve())
    context = {
        "checkpoints": [s["path"] for s in space.specs],
        "data": {k: sha256_file(Path(p)) for k, p in files.items()},
        "base": None if base is None else str(base),
        "tokenizer": None if tokenizer is None else str(tokenizer),
        "metric": metric,
        "scorer": DEFAULT_FACTORY if scorer is None else scorer.factory,
    }
    if scorer is None:
        assert base is not None
        kw: dict[str, Any] = {"base": str(base), "tokenizer": tokenizer and str(tokenizer)}
        if cache_memory is None and workers > 1 and ray is None:
            from mwakit.io.cache import default_budget

            # Local workers share this machine's RAM: the default quarter, split among them.
            cache_memory = max(1, default_budget() // workers)
        spec = ScorerSpec(DEFAULT_FACTORY, {**kw, "device": device, "cache_memory": cache_memory})
    else:
        spec = scorer
    spec = ScorerSpec(spec.factory, {**spec.kwargs, "data": files, "metric": metric})
    log = TrialLog(trial_log, context)
    # Trials read back from the log are not scored again: the bar counts the others.
    total = max(1, _expected(names, budget, space) + (4 if test_path else 0) - log.resumed)
    pool = make_pool(spec, workers, ray)
    try:
        tuner = _Tuner(space, pool, log, context, direction, total, on_trial)
        result = _run(tuner, names, budget, test_path is not None, seed)
    finally:
        pool.close()
    chosen = _with_tuning(result, space, r, files, metric, base)
    out_path = None if out is None else Path(out)
    if out_path is not None:
        text = yaml.safe_dump(chosen, sort_keys=False, allow_unicode=True)
        try:
            _atomic_write(out_path, text)
        except OSError as err:
            raise OutputError(
                f"cannot write the chosen recipe: {err.strerror or err}",
                where=str(out_path),
                fix="write it into a folder you can write to (--out PATH)",
            ) from err
    plot_path = _plot_path(plot, out_path)
    if plot_path is not None:
        from mwakit.tune.plot import draw

        draw(plot_path, tuner, result[0], space)
    choice, baselines, best_of, best_entry, given = result
    return TuneResult(
        metric=metric,
        direction=direction,
        baselines=baselines,
        searches=best_of,
        given=given,
        best=best_entry,
        reason=choice.reason,
        trials=list(log),
        recipe=chosen,
        out=out_path,
        plot=plot_path,
        resumed=log.resumed,
    )


def _expected(names: Sequence[str], budget: int, space: Space) -> int:
    """About how many VAL trials the tune scores (the progress bar's total, for its ETA)."""
    n = space.n
    per = {
        "penalty": min(budget, 5 * len(S.penalty_variants(space)) + 6),
        "last": min(budget, max(0, n - 2)),
        "greedy": min(budget, n - 1),
        "weights": max(1, budget // (4 + int(3 * math.log(n)))) * (4 + int(3 * math.log(n))),
        "groups": min(budget, 10),
    }
    return n + 2 + sum(per[name] for name in names)


def _absolute(p: str | Path | None) -> str | None:
    """A local path made absolute; an ``hf://`` reference (or None) as it is."""
    if p is None or str(p).startswith("hf://"):
        return None if p is None else str(p)
    return str(Path(p).resolve())


def _check_out(out: Path) -> None:
    """Refuse an --out that cannot be a file before any candidate is scored."""
    if out.is_dir():
        raise OutputError(
            "--out is a folder", where=str(out), fix="give a file name, e.g. best.yaml"
        )
    parent = next((p for p in out.resolve().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise OutputError(
            f"{parent} is a file, not a folder", where=str(out), fix="write --out elsewhere"
        )


def _plot_path(plot: str | Path | bool | None, out: Path | None) -> Path | None:
    if plot is False:
        return None
    if plot is None or plot is True:
        return None if out is None else out.with_suffix(".png")
    return Path(plot)


def _default_base(r: Recipe) -> str:
    from mwakit.api import plan

    p = plan(r)
    found = p.base_model
    if found and (Path(found).is_dir() or found.startswith("hf://")):
        return found
    raise UsageError(
        "no base model to evaluate on" + (f": {found!r} is not a local folder" if found else ""),
        where="--base",
        fix="pass --base BASE_MODEL_FOLDER (or hf://org/repo)",
    )


_Outcome = tuple[Choice, dict[str, Entry], dict[str, Entry], Entry, Entry]


def _need_cmaes() -> None:
    try:
        import cmaes  # noqa: F401
    except ImportError as err:
        raise UsageError(
            "the weights search needs the cmaes library",
            where="--search weights",
            fix="pip install 'mwakit[tune]'",
        ) from err


def _run(t: _Tuner, names: Sequence[str], budget: int, with_test: bool, seed: int) -> _Outcome:
    space = t.space
    base = S.baselines(space, t.evaluate)
    singles = [base[f"single:{i}"][1] for i in range(space.n)]
    given = Candidate("recipe as given", "recipe", "baseline", tuple(range(space.n)))
    t.evaluate([given])
    tried: S.Tried = []
    per_search: dict[str, S.Tried] = {}
    for name in names:
        if name == "penalty":
            got = S.penalty_search(space, t.evaluate, budget)
        elif name == "last":
            got = S.last_search(space, t.evaluate, budget)
        elif name == "greedy":
            got = S.greedy_search(space, t.evaluate, budget, singles)
        elif name == "weights":
            _need_cmaes()
            start = S.start_weights(space, tried)
            got = S.weights_search(space, t.evaluate, budget, start, seed=seed)
        else:  # groups
            mwas = [(c, g) for c, g in tried if c.kind == "mwa"]
            got = S.groups_search(space, t.evaluate, budget, S.best(mwas)[0]) if mwas else []
        per_search[name] = got
        tried += got
    # Every distinct merge scored, labelled by the first search that found it.
    scored = list(t.scored.values())
    labelled = {t.key(c): (c, s) for c, s in scored}
    for k in ("last", "best_single", "uniform"):
        c = base[k][0]
        labelled[t.key(c)] = (c, labelled[t.key(c)][1])
    choice = choose(list(labelled.values()), t.direction)
    # TEST: the three baselines and the chosen one, nothing else.
    test_cands = [base["last"][0], base["best_single"][0], base["uniform"][0], choice.candidate]
    tests = t.score(test_cands, "test") if with_test else [None] * 4

    def entry(c: Candidate, ts: Score | None) -> Entry:
        return Entry(c.name, c.kind, c.search, labelled[t.key(c)][1], ts, c.recipe(space))

    baselines = {
        "last": entry(base["last"][0], tests[0]),
        "best_single": entry(base["best_single"][0], tests[1]),
        "uniform": entry(base["uniform"][0], tests[2]),
    }
    best_of = {}
    for name, got in per_search.items():
        if got:
            c, _ = S.best(got)
            best_of[name] = entry(c, tests[3] if t.key(c) == t.key(choice.candidate) else None)
    given_entry = entry(given, tests[3] if t.key(given) == t.key(choice.candidate) else None)
    return choice, baselines, best_of, entry(choice.candidate, tests[3]), given_entry


def _with_tuning(
    result: _Outcome,
    space: Space,
    r: Recipe,
    files: Mapping[str, str],
    metric: str,
    base: str | Path | None,
) -> dict[str, Any]:
    """The chosen recipe with its ``tuning:`` block (what the card's Tuning section shows)."""
    choice, baselines, _, best, _ = result
    recipe = dict(best.recipe)
    data = {}
    for split, p in files.items():
        data[split] = {"path": str(Path(p).resolve()), "sha256": sha256_file(Path(p)),
                       "rows": _count_rows(Path(p))}  # fmt: skip
    results = {"chosen": best.to_json(), **{k: e.to_json() for k, e in baselines.items()}}
    recipe["tuning"] = {
        "tool": f"mwakit {__version__} tune",
        "metric": metric,
        "base": None if base is None else str(base),
        "data": data,
        "chosen": best.name,
        "reason": choice.reason,
        "results": {
            k: {f: v[f] for f in ("name", "val", "val_se", "test", "test_se")}
            for k, v in results.items()
        },
    }
    return recipe
