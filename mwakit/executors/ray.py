"""The Ray executor: each output shard's tensor groups run as one Ray task on a cluster.

A plan is a list of independent tensor groups, and a full model's output is cut into shards
whose layout is fixed up front. So the driver (the process that runs ``mwakit run``):

1. plans as usual and runs the whole-model pre-passes some methods need (Fisher norms,
   model-wide trim thresholds) — reading only what those need;
2. submits one task per output shard, with the plan (put once into the object store), the
   shard's file name in the output's temporary folder and the groups it holds;
3. each task, on any node, reads its groups' input tensors from the shared storage, merges
   them exactly as the local executor does (`mwakit.execute.run_tasks`), writes its shard
   file at its final path and fsyncs it; the task returns its statistics;
4. the weights files' sha256 (the card's fingerprints) are computed by tasks too, one per
   file, so the driver never reads the inputs through;
5. when every shard is complete, the driver writes the shard index; `mwakit.api.run` then
   writes the card and renames the folder into place, as for a local run.

A task whose worker dies (killed, out of memory, node lost) is retried (``max_retries``) and
rewrites its shard from scratch. A task that fails (a NaN in an input, a read error) fails the
merge with that error; the other tasks are cancelled and the temporary folder is removed: a
failed merge leaves nothing, as today. Byte for byte the output equals the local executor's:
same plan, same kernels, same single compute thread, same writer.

Ray is an optional extra (``pip install 'mwakit[ray]'``), imported only here.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mwakit.errors import MwakitError, OutputError, UsageError
from mwakit.planner import LoraTask, Plan, Task

#: A worker that dies mid-task (a killed process, a lost node) gets this many more attempts.
RETRIES = 3
#: Fault injection for tests: ``exit-once:PATH`` makes the first task to create PATH exit.
FAULT_ENV = "MWAKIT_RAY_FAULT"

Entry = tuple[str, str, tuple[int, ...]]


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise UsageError(
            "executor: ray needs Ray, which is not installed",
            where="executor",
            fix="pip install 'mwakit[ray]', or use executor: local",
        ) from err
    return ray


def shard_groups(plan: Plan) -> list[tuple[str, list[Entry], list[int]]]:
    """(file name, tensor entries, task indices) of every output file, in order.

    A full model's shards are cut exactly as the local executor cuts them; an adapter is one
    file, so one task.
    """
    from mwakit.execute import output_entries
    from mwakit.io.shards import shard_names, split_shards

    entries = output_entries(plan)
    if plan.kind == "full":
        shards = split_shards(entries, plan.shard_size)
        names = shard_names(len(shards))
    else:
        shards, names = [entries], ["adapter_model.safetensors"]
    where = {e[0]: j for j, shard in enumerate(shards) for e in shard}
    tasks: list[list[int]] = [[] for _ in shards]
    for i, task in enumerate(plan.tasks):
        keys = _out_keys(task)
        shard = where[keys[0]]
        if any(where[k] != shard for k in keys):  # never for today's plans: one key, or one file
            raise OutputError(
                f"tensor group {keys[0]} spans two output shards", where="executor: ray"
            )
        tasks[shard].append(i)
    return [(n, s, t) for n, s, t in zip(names, shards, tasks, strict=True)]


def _out_keys(task: Task) -> list[str]:
    if isinstance(task, LoraTask):
        bias = [task.out_bias.key] if task.out_bias is not None else []
        return [task.out_a.key, task.out_b.key, *bias]
    return [task.out.key]


def _fault(spec: str | None) -> None:
    if not spec or not spec.startswith("exit-once:"):
        return
    try:
        fd = os.open(spec.removeprefix("exit-once:"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(17)  # the worker dies as a killed one would: no exception, no result


def run_shard(
    plan: Plan,
    path: str,
    entries: Sequence[Entry],
    indices: Sequence[int],
    prepass: dict[str, Any],
    cwd: str,
    fault: str | None = None,
) -> dict[str, Any]:
    """One Ray task: merge the groups ``indices`` of ``plan`` into the shard file ``path``.

    Returns:
        Its statistics (``tasks``, ``bytes_read``, ``bytes_written``, ``rel_errors``,
        ``max_live_inputs``), or ``error``: (class name, what, where, fix) of a `MwakitError`
        (sent as fields: an exception with keyword-only arguments does not round-trip).
    """
    _fault(fault)
    if os.path.isdir(cwd):
        os.chdir(cwd)  # relative input paths mean what they meant to the driver
    from mwakit.execute import ExecStats, _Loader, out_metadata, resolve_device, run_tasks
    from mwakit.io.durable import BackgroundSync
    from mwakit.io.reader import PreadReader
    from mwakit.io.writer import StreamingWriter
    from mwakit.threads import merge_thread_policy

    try:
        device = resolve_device(plan.recipe.device)
        stats = ExecStats(device=str(device), **prepass)
        with (
            merge_thread_policy(),
            BackgroundSync() as syncer,
            PreadReader() as reader,
            StreamingWriter(Path(path), entries, out_metadata(plan), syncer) as writer,
        ):
            ld = _Loader(plan, reader, device)
            run_tasks(plan, [(i, plan.tasks[i]) for i in indices], ld, writer, stats)
    except MwakitError as err:
        return {"error": (type(err).__name__, err.what, err.where, err.fix)}
    return {
        "tasks": stats.tasks,
        "bytes_read": stats.bytes_read,
        "bytes_written": stats.bytes_written,
        "rel_errors": stats.rel_errors,
        "max_live_inputs": stats.max_live_inputs,
        "device": stats.device,
    }


def hash_file(path: str, cwd: str) -> str:
    """One Ray task: the sha256 of an input file (`mwakit.card.sha256_file`, digest cache
    included), so fingerprinting terabytes of inputs spreads over the cluster too."""
    if os.path.isdir(cwd):
        os.chdir(cwd)
    from mwakit.card import sha256_file

    return sha256_file(Path(path))


def _raise(fields: tuple[str, str, str | None, str | None]) -> None:
    from mwakit import errors

    name, what, where, fix = fields
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, MwakitError)) or name == "RecipeError":
        cls = OutputError
    raise cls(what, where=where, fix=fix)


def connect(ray: Any, address: str | None) -> bool:
    """Join (or start) a cluster unless connected already; True when this call started it.

    Ray logs a warning when it turns on token authentication for a new local cluster (its
    default). The token stays on; the notice would land between mwakit's own lines, so it is
    held back (``RAY_AUTH_MODE`` set by the user silences Ray itself).
    """
    if ray.is_initialized():
        return False
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = notice.level
    notice.setLevel(logging.ERROR)
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
            configure_logging=False,
        )
    finally:
        notice.setLevel(level)
    return True


def execute_ray(
    plan: Plan,
    out_dir: Path,
    *,
    address: str | None = None,
    on_task: Callable[[int, Task], None] | None = None,
    hash_files: Sequence[Path] = (),
) -> Any:
    """Run the plan's tensor groups as Ray tasks, one per output shard, into ``out_dir``.

    ``hash_files`` are hashed by Ray tasks too (one per file, submitted after the shards);
    their digests come back in ``ExecStats.digests``.

    Args:
        plan: The plan to run.
        out_dir: The output's temporary folder, on storage every node sees.
        address: The cluster (``auto``, ``ray://host:10001``); None: ``RAY_ADDRESS``, else a
            local cluster started for this run (and shut down after it). A process already
            connected to Ray uses that connection.
        on_task: Called for each tensor group of a shard when the shard is complete.

    Returns:
        `mwakit.execute.ExecStats` of the whole merge.

    Raises:
        UsageError: Ray is not installed.
        MwakitError: A task's error (the same one the local executor raises); `OutputError`
            when a task's worker kept dying (after `RETRIES` more attempts) or Ray failed.
    """
    ray = _import_ray()
    import torch

    from mwakit.execute import ExecStats, _Loader, _prepasses
    from mwakit.io.reader import PreadReader
    from mwakit.io.shards import write_index

    t0 = time.perf_counter()
    stats = ExecStats()
    with PreadReader() as reader:  # pre-passes (few methods have any) run here, on the CPU
        _prepasses(plan, _Loader(plan, reader, torch.device("cpu")), stats, plan_dtype(plan))
    prepass = {"fisher_norms": stats.fisher_norms, "thresholds": stats.thresholds}
    groups = shard_groups(plan)
    started = connect(ray, address)
    try:
        # A task sees a GPU only when it asks for one (Ray hides the others from it).
        gpus = 1 if plan.recipe.device.startswith("cuda") else 0
        remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=RETRIES)(run_shard)
        plan_ref = ray.put(plan)
        fault = os.environ.get(FAULT_ENV)
        out = out_dir.resolve()
        cwd = os.getcwd()
        pending = {
            remote.remote(plan_ref, str(out / name), entries, idx, prepass, cwd, fault): j
            for j, (name, entries, idx) in enumerate(groups)
        }
        hasher = ray.remote(num_cpus=1, max_retries=RETRIES)(hash_file)
        hashing = {hasher.remote(str(f), cwd): Path(f) for f in dict.fromkeys(hash_files)}
        try:
            while pending or hashing:
                done, _ = ray.wait([*pending, *hashing], num_returns=1)
                for ref in done:
                    if ref in hashing:
                        f = hashing.pop(ref)
                        stats.digests[f] = _result(ray, ref, f.name)
                        continue
                    j = pending.pop(ref)
                    res = _result(ray, ref, groups[j][0])
                    if "error" in res:
                        _raise(res["error"])
                    stats.tasks += res["tasks"]
                    stats.bytes_read += res["bytes_read"]
                    stats.bytes_written += res["bytes_written"]
                    stats.rel_errors.update(res["rel_errors"])
                    stats.max_live_inputs = max(stats.max_live_inputs, res["max_live_inputs"])
                    stats.device = res["device"]
                    if on_task is not None:
                        for i in groups[j][2]:
                            on_task(i, plan.tasks[i])
        except BaseException:
            for ref in [*pending, *hashing]:
                ray.cancel(ref, force=True)
            # Wait for the cancelled tasks to stop: none may write into the folder once the
            # caller removes it.
            if pending:
                ray.wait(list(pending), num_returns=len(pending), timeout=30)
            raise
    finally:
        if started:
            ray.shutdown()
    write_index(out_dir, [g[0] for g in groups], [g[1] for g in groups])
    stats.seconds = time.perf_counter() - t0
    return stats


def plan_dtype(plan: Plan) -> Any:
    """The torch dtype the plan computes in."""
    import torch

    return getattr(torch, plan.recipe.dtype)


def _result(ray: Any, ref: Any, name: str) -> Any:
    try:
        res = ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise
    except ray.exceptions.RayError as err:
        raise OutputError(
            f"the Ray task writing {name} failed ({type(err).__name__}) after {RETRIES} retries",
            where="executor: ray",
            fix="check the cluster (node memory, logs under /tmp/ray), then run again",
        ) from err
    return res
