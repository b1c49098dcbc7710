"""The Python API: load a recipe, plan it, run it. The CLI is a thin layer over these."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mwakit.card import (
    RESOLVED_RECIPE,
    fingerprint_files,
    fingerprints,
    known_digest,
    remember_digest,
    resolved_recipe,
    write_assets,
    write_card,
)
from mwakit.errors import MwakitError, UsageError
from mwakit.io.atomic import atomic_output_dir, check_target
from mwakit.io.durable import BackgroundSync
from mwakit.io.hashing import StreamHasher
from mwakit.io.layout import MODEL_SIDE_FILES, inside_folder, side_files
from mwakit.planner import LoraTask, Plan, Task
from mwakit.recipe import HubTarget, Recipe, dump_recipe, load_recipe
from mwakit.signals import signals_held
from mwakit.sources import discover
from mwakit.validate import checked_plan

if TYPE_CHECKING:
    from mwakit.executors.stats import ExecStats

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def input_paths(p: Plan) -> list[Path]:
    """Every file and folder a plan reads: what its output may neither be nor contain.

    The checkpoint folders and their weights files (a converted pickle's source and its cached
    copy), the base model, side inputs such as Fisher files, and a local ``select.run``.
    """
    paths: list[Path] = []
    extra = [c for c in (p.base, p.side_source) if c is not None]
    for c in [*p.checkpoints, *extra]:
        paths += [c.path, *c.files]
    for task in p.tasks:
        groups = (task.aux_a, task.aux_b) if isinstance(task, LoraTask) else (task.aux,)
        for refs in groups:
            paths += [r.path for r in refs or ()]
    run = p.recipe.select.run if p.recipe.select is not None else None
    if run is not None and not run.startswith("hf://"):
        paths.append(Path(run))
    return list(dict.fromkeys(paths))


def read_files(p: Plan) -> set[Path]:
    """The files the merge reads tensors from (checkpoints, base, side inputs)."""
    out: set[Path] = set()
    for t in p.tasks:
        if isinstance(t, LoraTask):
            groups = (t.inputs, t.aux_a, t.aux_b)
        else:
            groups = (t.inputs, (t.base,) if t.base is not None else (), t.aux)
        for refs in groups:
            out.update(r.path for r in refs or ())
    return out


def streamed_files(p: Plan) -> list[Path]:
    """The fingerprinted files to hash from the merge's own reads: those it reads tensors from
    whose sha256 is not known already (a Hub blob's name, the digest cache)."""
    read = read_files(p)
    return [f for _, f in fingerprint_files(p) if f in read and known_digest(f) is None]


def _recipe_inputs(r: Recipe) -> list[Path]:
    # The local inputs the recipe names, known before anything is resolved: an early, precise
    # refusal ("is an input") instead of a later one. `input_paths` has the complete list.
    refs = [c.path for c in r.checkpoints or ()]
    refs += [x for x in (r.select.run if r.select else None, r.base_model) if x]
    paths = [Path(x) for x in refs if not x.startswith("hf://")]
    if r.select is not None and not r.select.run.startswith("hf://"):
        with contextlib.suppress(MwakitError):  # resolving reports a bad run folder
            paths += discover(r.select)
    return paths


def model_side_files(p: Plan) -> list[Path]:
    """The config and tokenizer files that travel with a merged full model: those of the
    checkpoint that gives the other tensors of a slice merge, else the base, else the first.

    A side file that is a symlink out of its folder is refused (it could copy a secret into an
    output that is then pushed); a Hub cache snapshot's links into its blobs are fine.

    Raises:
        SourceError: A side file resolves outside its folder.
    """
    side = p.side_source or p.base
    src = side.path if side is not None else p.checkpoints[0].path
    return side_files(src)


#: Tokenizer files a Trainer saves into every checkpoint (given a tokenizer or processing
#: class); an adapter output carries them too, so ``AutoTokenizer.from_pretrained(out)`` works.
TOKENIZER_FILES = tuple(
    n for n in MODEL_SIDE_FILES if n not in ("config.json", "generation_config.json")
)


def adapter_side_files(p: Plan) -> list[Path]:
    """The tokenizer files an adapter output carries: those of the latest checkpoint that has
    any (checkpoints are in step order; a run saves the same tokenizer in each).

    A file that is a symlink out of its checkpoint folder is refused, as for `model_side_files`.

    Raises:
        SourceError: A tokenizer file resolves outside its folder.
    """
    for c in reversed(p.checkpoints):
        found = [
            inside_folder(c.path, n, "tokenizer file")
            for n in TOKENIZER_FILES
            if os.path.lexists(c.path / n)
        ]
        found = [f for f in found if f.is_file()]
        if found:
            return found
    return []


def copy_model_files(p: Plan, out: Path) -> None:
    """Copy `model_side_files` into ``out``.

    ``config.json`` gets the written dtype, so loaders pick the right one, and the plan's
    changes (slices: the layer count).

    Raises:
        SourceError: A side file resolves outside its folder.
    """
    for f in model_side_files(p):
        name = f.name
        if name == "config.json" and (p.recipe.out_dtype or p.config_updates):
            cfg = json.loads(f.read_text(encoding="utf-8"))
            cfg.update(p.config_updates)
            if p.recipe.out_dtype:
                cfg["torch_dtype"] = p.recipe.out_dtype
                if "dtype" in cfg:
                    cfg["dtype"] = p.recipe.out_dtype
            (out / name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(f, out / name)


@dataclass(frozen=True)
class RunResult:
    """What `run` produced."""

    path: Path
    plan: Plan
    stats: ExecStats
    commit_url: str | None = None
    """The Hub commit (or pull request) URL when the output was pushed."""


def _as_recipe(recipe: Recipe | str | Path) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def plan(recipe: Recipe | str | Path) -> Plan:
    """Resolve the checkpoints and plan the merge, reading headers only.

    Args:
        recipe: A validated `Recipe`, or the path of a recipe YAML file.

    Raises:
        MwakitError: Any recipe, source, metric or plan problem; several at once are one
            `RecipeError` listing each (the same verdict as `mwakit validate`).
    """
    r = _as_recipe(recipe)
    return checked_plan(r, source=None if isinstance(recipe, Recipe) else str(recipe))


def run(
    recipe: Recipe | str | Path,
    *,
    output: str | Path | None = None,
    overwrite: bool | None = None,
    on_task: Callable[[int, Task], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    push: bool | None = None,
    hub: HubTarget | None = None,
    executor: str | None = None,
) -> RunResult:
    """Plan and execute a merge into an output folder, atomically.

    An adapter folder holds ``adapter_model.safetensors`` and ``adapter_config.json``; a full
    model ``model.safetensors`` (or shards + index), ``config.json`` and tokenizer files. Both
    get ``README.md`` (the model card) and ``mwakit.yaml`` (the resolved recipe). The folder
    appears only when complete: a failure or Ctrl-C leaves no output folder behind.

    Args:
        recipe: A validated `Recipe`, or the path of a recipe YAML file.
        output: Overrides ``output.path``.
        overwrite: Overrides ``output.overwrite``.
        on_task: Progress callback, called after each tensor group is written.
        on_plan: Called once with the plan, before any tensor byte is read.
        push: Upload the finished folder to the Hub; None (default) pushes iff a target is
            set (``hub`` or ``output.hub``), False never pushes.
        hub: Overrides ``output.hub`` (the push target).
        executor: Overrides the recipe's ``executor`` (``local``, ``ray``, ``ray=ADDRESS``).

    Raises:
        UsageError: ``push=True`` with no target.
        MwakitError: Any recipe, source, metric, plan, tensor, output or Hub problem. A failed
            upload leaves the output folder complete (`HubError`, with the retry command).
    """
    r = _as_recipe(recipe)
    if executor is not None:
        from mwakit.executors import parse_executor

        name, address = parse_executor(executor)
        r = r.model_copy(update={"executor": name, "executor_address": address})
    dest = None if push is False else (hub or r.output.hub)
    if push and dest is None:
        dest = hub_target(None)  # raises the usage error: nowhere to push
    if dest is not None:
        from mwakit.hub import preflight

        preflight(dest)  # fail before the merge when pushing cannot work (no token)
    if output is not None or overwrite is not None:
        out = r.output.model_copy(
            update={
                **({"path": str(output)} if output is not None else {}),
                **({"overwrite": overwrite} if overwrite is not None else {}),
            }
        )
        r = r.model_copy(update={"output": out})
    target = Path(r.output.path)
    check_target(target, r.output.overwrite, _recipe_inputs(r))
    p = checked_plan(r, source=None if isinstance(recipe, Recipe) else str(recipe))
    # Refuse a link out of a folder before the merge, not after.
    if p.kind == "full":
        model_side_files(p)
    else:
        adapter_side_files(p)
    if on_plan is not None:
        on_plan(p)
    if r.output.format == "merged":
        # Bake into the base in one pass: the merged adapter stays in memory, never written.
        from mwakit.bake import merged_base, run_merged

        base = merged_base(p)  # a missing base fails before any output is created
        stats = run_merged(
            p, target, r.output.overwrite, input_paths(p), on_task=on_task, base=base
        )
        url = _push(target, dest) if dest is not None else None
        return RunResult(path=target, plan=p, stats=stats, commit_url=url)
    with (
        atomic_output_dir(target, r.output.overwrite, input_paths(p)) as tmp,
        _Assets(write_assets, p) as assets,
        BackgroundSync() as syncer,
    ):
        # The inputs the merge reads are fingerprinted from the bytes it reads (one read, not
        # two); the plot and the other fingerprints do not depend on the merge: they are made
        # on a second core while torch imports and the merge streams (hashing releases the GIL).
        # With executor: ray the tasks read on other nodes, and Ray tasks hash the weights.
        ray = r.executor == "ray"
        to_stream = streamed_files(p)
        hasher = StreamHasher([] if ray else to_stream)
        assets.start(tmp, to_stream)
        try:
            if ray:
                with signals_held():  # see _execute_local
                    from mwakit.executors.ray import execute_ray

                stats = execute_ray(
                    p, tmp, address=r.executor_address, on_task=on_task, hash_files=to_stream
                )
            else:
                stats = _execute_local(p, tmp, on_task, hasher, syncer)
            streamed = {**hasher.finish(), **stats.digests}
        except BaseException:
            hasher.close()
            raise
        for f, digest in streamed.items():
            remember_digest(f, digest)
        if p.kind == "full":
            copy_model_files(p, tmp)
        else:
            (tmp / "adapter_config.json").write_text(
                json.dumps(p.adapter_config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
            for f in adapter_side_files(p):
                shutil.copyfile(f, tmp / f.name)
        resolved = resolved_recipe(p, folder=target)
        text = dump_recipe(resolved)
        (tmp / RESOLVED_RECIPE).write_text(text, encoding="utf-8")
        prints = fingerprints(p, {**assets.result(), **streamed})
        write_card(
            p,
            tmp,
            text,
            stats.rel_errors,
            prints,
            rerun=resolved.output.path,
            solvers=stats.solvers,
        )
        syncer.join()  # every weights file on disk before the folder is renamed into place
    # The upload starts only once the local folder is complete; if it fails, the folder stays
    # and the error says how to retry with `mwakit push`.
    url = _push(target, dest) if dest is not None else None
    return RunResult(path=target, plan=p, stats=stats, commit_url=url)


class _Assets:
    """`write_assets` on a daemon thread beside the merge (a context manager).

    On a clean exit the thread is joined (`result`). After an error — Ctrl-C included — it is
    given `_ASSETS_GRACE` seconds and then abandoned rather than waited for forever: a signal
    whose handler raised inside an import of the main thread can leave the global import lock
    held, and this thread's next import would never return (seen under load in the signal
    tests). It writes nothing the cleanup depends on: into a removed folder its plot fails.
    """

    def __init__(self, fn: Callable[..., dict[Path, str]], plan: Plan) -> None:
        self._fn, self._plan = fn, plan
        self._out: dict[Path, str] = {}
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _Assets:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        t = self._thread
        # Not started (a signal inside start) means nothing to wait for.
        if t is not None and exc_type is not None and t.ident is not None:
            t.join(_ASSETS_GRACE)

    def start(self, tmp: Path, streamed: Collection[Path]) -> None:
        def work() -> None:
            try:
                self._out = self._fn(self._plan, tmp, streamed)
            except BaseException as err:  # re-raised by result()
                self._error = err

        self._thread = threading.Thread(target=work, name="mwakit-assets", daemon=True)
        self._thread.start()

    def result(self) -> dict[Path, str]:
        """The digests `write_assets` made (its error, if it failed)."""
        assert self._thread is not None
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._out


_ASSETS_GRACE = 10.0
"""Seconds a failed run waits for the assets thread before it goes on cleaning up."""


def _execute_local(
    p: Plan,
    tmp: Path,
    on_task: Callable[[int, Task], None] | None,
    hasher: StreamHasher,
    syncer: BackgroundSync,
) -> ExecStats:
    # Imported with signals held: the card's thread imports at the same time (see
    # `signals_held`); a Ctrl-C meanwhile is raised once the import is done.
    with signals_held():
        from mwakit.executors import factors

        torch_free = factors.fits(p)
        if not torch_free:
            from mwakit.execute import execute  # torch is imported only when a merge runs
    if torch_free:
        # A factor average: NumPy computes it in less time than torch takes to import.
        return factors.execute_factors(
            p, tmp, on_task=on_task, observer=hasher.observe, syncer=syncer
        )
    return execute(p, tmp, on_task=on_task, observer=hasher.observe, syncer=syncer)


def hub_target(
    repo_id: str | None = None,
    *,
    base: HubTarget | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool | None = None,
) -> HubTarget:
    """A push target from ``base`` (e.g. ``output.hub``) with the given fields overridden.

    Raises:
        UsageError: No repo id at all, or an invalid combination (create_pr with revision).
    """
    from pydantic import ValidationError

    data = base.model_dump() if base is not None else {}
    given = {
        "repo_id": repo_id,
        "private": private,
        "revision": revision,
        "commit_message": commit_message,
        "create_pr": create_pr,
    }
    data.update({k: v for k, v in given.items() if v is not None})
    if not data.get("repo_id"):
        raise UsageError(
            "no Hub repo to push to",
            where="--push",
            fix="set output.hub.repo_id in the recipe, or pass --repo-id org/name",
        )
    try:
        return HubTarget.model_validate(data)
    except ValidationError as err:
        msgs = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'hub'}: {e['msg'].removeprefix('Value error, ')}"
            for e in err.errors()
        )
        raise UsageError(msgs, where="push options", fix="correct the push options") from err


def push(folder: str | Path, target: HubTarget | str) -> str:
    """Upload a finished output folder to the Hub in one commit.

    Args:
        folder: An output folder written by `run` (or any folder to upload as is).
        target: ``output.hub`` settings, or just a repo id (private repo, default branch).

    Returns:
        The URL of the commit, or of the pull request with ``create_pr``.

    Raises:
        HubError: No token, no access, network failure; the message says how to retry.
    """
    return _push(folder, hub_target(target) if isinstance(target, str) else target)


def _push(folder: str | Path, target: HubTarget) -> str:
    from mwakit import hub  # huggingface_hub is imported only when something is pushed

    return hub.push(folder, target)
