"""Execute a plan by streaming: read a tensor group lazily, merge it, write it, drop it.

Inputs are read (pread) into reusable buffers; while one group computes, the kernel is asked to
read the next group ahead (fadvise WILLNEED), and a finished group's buffers are recycled, so
resident memory is a few tensor groups whatever the adapter size. The output
file's header is known from the plan, so each result is written at its final offset as soon as
it is ready, from the writer's own recycled memory (`StreamingWriter.buffer`): results are cast
into it, and linear sums are made in it block by block (`weighted_sum_into`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mwakit.errors import PlanError, TensorError
from mwakit.executors.pool import DensePool, copied, wanted
from mwakit.executors.stats import ExecStats
from mwakit.io.cache import InputCache
from mwakit.io.durable import BackgroundSync
from mwakit.io.header import DTYPE_NAMES, TensorInfo
from mwakit.io.reader import Observer, PreadReader
from mwakit.io.shards import ShardedWriter
from mwakit.io.writer import StreamingWriter
from mwakit.lowrank import (
    QrMemo,
    concat_factors,
    dense_delta,
    dense_refactor,
    factor_sum,
    factors_average,
    full_factors,
    refactor_concat,
)
from mwakit.methods.blocks import Factored
from mwakit.methods.linear import weighted_sum, weighted_sum_into
from mwakit.methods.sparsify import derive_seed
from mwakit.planner import (
    FullTask,
    LoraTask,
    Plan,
    Task,
    TensorRef,
    out_metadata,
    output_entries,
)
from mwakit.threads import merge_thread_policy


def resolve_device(name: str) -> torch.device:
    """Map the recipe's ``device`` to a torch device.

    Raises:
        PlanError: CUDA was asked for but is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PlanError(
                "CUDA is not available on this machine",
                where=f"device: {name}",
                fix="use device: cpu or device: auto",
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PlanError(
                f"there are only {torch.cuda.device_count()} CUDA device(s)",
                where=f"device: {name}",
                fix="pick an existing device index, or device: auto",
            )
    return dev


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype code."""
    dtype: torch.dtype = getattr(torch, DTYPE_NAMES[code])
    return dtype


class _Loader:
    """Reads a task's inputs as views and moves them to the compute device."""

    def __init__(self, plan: Plan, reader: PreadReader, device: torch.device) -> None:
        self.plan = plan
        self.reader = reader
        self.device = device
        self._cpu = device.type == "cpu"  # the reader's tensors are there already

    def get(self, refs: Sequence[TensorRef]) -> list[torch.Tensor]:
        if self._cpu:
            return [self.reader.get(r.info, r.path) for r in refs]
        return [self.reader.get(r.info, r.path).to(self.device) for r in refs]

    def finish(
        self,
        out: torch.Tensor,
        code: str,
        refs: Sequence[TensorRef],
        what: str,
        *,
        into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``out`` cast to the written dtype ``code``, checked to be finite after the cast.

        One reduction over the cast result catches any non-finite input with non-zero weight
        (and 0·inf = nan catches zero-weight ones too) and any value the written dtype cannot
        hold (float16 stops at 65504: the cast would write Inf); only then is the culprit
        looked for. Checking the cast result costs what checking the merge result did, and
        reads fewer bytes when the written dtype is narrower.

        Args:
            out: The merge result.
            code: The written dtype (safetensors code).
            refs: The inputs (to name a non-finite one).
            what: The tensor's name, for messages.
            into: Cast into this CPU tensor of the written dtype and shape (the writer's
                `buffer`: written without a copy, no fresh memory) instead of a new one.

        Raises:
            TensorError: An input holds NaN/Inf, the merge overflowed, or the result does not
                fit the written dtype; naming the tensor and the fix.
        """
        cast = out.to(torch_dtype(code)) if into is None else into.copy_(out)
        if all_finite(cast):
            return cast
        if not all_finite(out):
            self._culprit(refs, what)
        name = DTYPE_NAMES[code]
        big = float(out.abs().max())
        raise TensorError(
            f"values up to {big:.4g} do not fit {name} (it holds up to "
            f"{torch.finfo(cast.dtype).max:.4g}): the file would store Inf",
            where=what,
            fix="write a wider dtype (out_dtype: bfloat16 or float32), or lower the weights "
            "(or λ) that scale the result",
        )

    def _culprit(self, refs: Sequence[TensorRef], what: str) -> None:
        for r in refs:
            t = self.reader.get(r.info, r.path)
            if not all_finite(t):
                raise TensorError(
                    "input tensor holds NaN or Inf",
                    where=f"{self.plan.checkpoints[r.ckpt].name} {r.info.name}",
                    fix="the checkpoint is corrupt or training diverged; drop it from the recipe",
                )
        narrow = self.plan.recipe.dtype in ("bfloat16", "float16")
        raise TensorError(
            f"the merge produced NaN or Inf in {what} (weights or values overflow "
            f"{self.plan.recipe.dtype if narrow else 'the arithmetic'})",
            where=what,
            fix="use dtype: float32 (or float64) for computing"
            if narrow
            else "lower the weights (or λ), or compute in float64 (dtype: float64)",
        )


@contextmanager
def _explained(method: str, key: str) -> Iterator[None]:
    """Turn a method's refusal of its inputs into a one-line error that says where."""
    try:
        yield
    except ValueError as err:
        # Methods raise ValueError on inputs they cannot take; say where, not a traceback.
        raise PlanError(str(err), where=key, fix=f"check the {method} params") from err
    except RuntimeError as err:
        # torch refuses a scalar its dtype cannot hold (a weight times a DARE rescale beyond
        # 3.4e38); the planner checks the weights themselves, this catches their products.
        if "cannot be converted to type" not in str(err):
            raise
        raise TensorError(
            "a weight (times its scaling) is too large for the arithmetic",
            where=key,
            fix="weights are relative: scale them down",
        ) from err


def _merge(
    plan: Plan,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: Any,
    key: str,
    dtype: torch.dtype,
    **extra: Any,
) -> torch.Tensor:
    with _explained(plan.method.name, key):
        out = plan.method.merge(tensors, weights, params, dtype=dtype, key=key, **extra)
    # Methods compute in float32 at least; `dtype` is what their result is rounded to.
    return out if out.dtype == dtype else out.to(dtype)


@dataclass(frozen=True)
class DenseJob:
    """One dense LoRA task's computation: everything it needs, nothing of the plan.

    Attributes:
        method: The method's registered name.
        params: Its validated params for this module.
        a: Each checkpoint's A.
        b: Each checkpoint's B.
        scalings: s_i, each checkpoint's LoRA scaling.
        weights: w_i.
        module: The module name (messages, the sketch's seed).
        dtype: The recipe's compute dtype.
        factored: Hand the method `Factored` ΔW_i (formed block by block) instead of dense ones.
        thresholds: Whole-model trim thresholds (``trim_scope: model``), or None.
        full: ``delta_rank: full`` (exact full-rank factors) instead of a rank-``rank`` SVD.
        rank: The output rank.
    """

    method: str
    params: Any
    a: list[torch.Tensor]
    b: list[torch.Tensor]
    scalings: tuple[float, ...]
    weights: tuple[float, ...]
    module: str
    dtype: torch.dtype
    factored: bool
    thresholds: list[float] | None
    full: bool
    rank: int


@dataclass(frozen=True)
class DenseResult:
    """A dense LoRA task's factors (rounded to the compute dtype) and how they were found."""

    a: torch.Tensor
    b: torch.Tensor
    rel_error: float
    solver: str | None
    refactor_seconds: float


def dense_lora(job: DenseJob) -> DenseResult:
    """Merge each ΔW_i of one module and re-factorise the result (here or in a worker process).

    Task-vector methods act on ΔW_i = s_i B_i A_i (base 0), never on A or B alone; the merged
    ΔW is sparse, no longer low rank: it is re-factorised by a truncated SVD, or (``delta_rank:
    full``) written exactly as full-rank factors.

    Raises:
        ValueError: The method refuses its inputs (the caller says where: `_explained`).
    """
    from mwakit.methods import get_method

    method = get_method(job.method)
    acc = torch.float64 if job.dtype == torch.float64 else torch.float32
    deltas: list[Any]
    if job.factored:
        # Formed block by block inside the method, in the compute dtype: never whole.
        deltas = [
            Factored(A.to(acc), B.to(acc), s)
            for A, B, s in zip(job.a, job.b, job.scalings, strict=True)
        ]
    else:
        deltas = [
            dense_delta(A.to(job.dtype), B.to(job.dtype), s)
            for A, B, s in zip(job.a, job.b, job.scalings, strict=True)
        ]
    extra: dict[str, Any] = {} if job.thresholds is None else {"thresholds": job.thresholds}
    merged = method.merge(deltas, job.weights, job.params, dtype=job.dtype, key=job.module, **extra)
    merged = merged if merged.dtype == job.dtype else merged.to(job.dtype)
    del deltas
    t0 = time.perf_counter()
    if job.full:
        ref = full_factors(merged)
        solver = None
    else:
        # No bf16/fp16 SVD exists: factorise in float32 (float64) whatever `dtype` is.
        # The sketch is seeded by the module name: same bytes in every run and process.
        seed = derive_seed(0, f"refactor:{job.module}", 0)
        ref = dense_refactor(merged, job.rank, compute_dtype=acc, seed=seed)
        solver = ref.solver
    spent = time.perf_counter() - t0
    return DenseResult(ref.A.to(job.dtype), ref.B.to(job.dtype), ref.rel_error, solver, spent)


def _dense_job(
    task: LoraTask,
    plan: Plan,
    a: list[torch.Tensor],
    b: list[torch.Tensor],
    dtype: torch.dtype,
    stats: ExecStats,
) -> DenseJob:
    thresholds = stats.thresholds.get(task.module)
    return DenseJob(
        method=plan.method.name,
        params=task.params,
        a=a,
        b=b,
        scalings=task.scalings,
        weights=task.weights,
        module=task.module,
        dtype=dtype,
        factored=plan.method.factored and thresholds is None,
        thresholds=thresholds,
        full=task.mode == "full",
        rank=task.rank,
    )


def _dense_done(task: LoraTask, res: DenseResult, stats: ExecStats) -> None:
    stats.rel_errors[task.module] = res.rel_error
    if res.solver is not None:
        stats.solvers[task.module] = res.solver
    stats.refactor_seconds += res.refactor_seconds


def _aux(ld: _Loader, refs: Sequence[TensorRef] | None, stats: ExecStats) -> dict[str, Any]:
    if refs is None:
        return {}
    out: dict[str, Any] = {"fishers": ld.get(refs)}
    if stats.fisher_norms:
        out["fisher_norms"] = stats.fisher_norms
    return out


Alloc = Callable[[str], torch.Tensor]
"""Memory for a planned output tensor, by name: the writer's `buffer`."""


def _run_full(
    task: FullTask,
    plan: Plan,
    ld: _Loader,
    dtype: torch.dtype,
    stats: ExecStats,
    alloc: Alloc | None = None,
) -> dict[str, torch.Tensor]:
    if task.copy:
        return {task.out.key: ld.reader.get(task.inputs[0].info, task.inputs[0].path)}
    key = task.out.key
    tensors = ld.get(task.inputs)
    into = alloc(key) if alloc is not None and ld.device.type == "cpu" else None
    fused = plan.method.merge is weighted_sum and task.aux is None and key not in stats.thresholds
    if fused and plan.kind == "adapter" and task.base is None:
        # An adapter's full tensors (modules_to_save, biases, DoRA magnitudes) are summed term
        # by term as its factors are (`factor_sum`, no fused multiply-add), so the torch-free
        # executor of factor averages (`mwakit.executors.factors`) writes the same bytes.
        out = factor_sum(tensors, task.weights, dtype, key)
        return {key: ld.finish(out, task.out.dtype, task.inputs, key, into=into)}
    if into is not None and fused:
        # A weighted sum straight into the writer's buffer, block by block: the same bytes as
        # the merge + cast below, without their tensor-sized temporaries (`weighted_sum_into`).
        try:
            weighted_sum_into(tensors, task.weights, into, dtype=dtype)
        except RuntimeError:
            pass  # (a weight too large for the arithmetic) the path below says so
        else:
            if all_finite(into):
                return {key: into}
        # Not finite: the path below finds the culprit and raises.
    base = ld.get([task.base])[0] if task.base is not None else None
    extra = _aux(ld, task.aux, stats)
    if key in stats.thresholds:
        extra["thresholds"] = stats.thresholds[key]
    out = _merge(plan, tensors, task.weights, task.params, key, dtype, base=base, **extra)
    return {key: ld.finish(out, task.out.dtype, task.inputs, key, into=into)}


def _run_lora(
    task: LoraTask, plan: Plan, ld: _Loader, dtype: torch.dtype, stats: ExecStats
) -> dict[str, torch.Tensor]:
    As, Bs = ld.get(task.a), ld.get(task.b)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    fold = [w * s / task.out_scaling for w, s in zip(task.weights, task.scalings, strict=True)]
    if task.mode == "factors" and plan.method.linear:
        a, b = factors_average(As, Bs, task.weights, task.scalings, task.out_scaling, dtype=dtype)
        coeffs = fold
    elif task.mode == "factors":
        # A non-linear method on the factors (e.g. Fisher-weighted): A and B separately, each
        # B first brought to the output scaling so every checkpoint's own update is kept.
        a = _merge(
            plan,
            As,
            task.weights,
            task.params,
            task.out_a.key,
            dtype,
            **_aux(ld, task.aux_a, stats),
        )
        rescaled = [
            t.to(dtype) * (s / task.out_scaling) for t, s in zip(Bs, task.scalings, strict=True)
        ]
        b = _merge(
            plan,
            rescaled,
            task.weights,
            task.params,
            task.out_b.key,
            dtype,
            **_aux(ld, task.aux_b, stats),
        )
        coeffs = fold
    elif task.dense:
        with _explained(plan.method.name, task.module):
            res = dense_lora(_dense_job(task, plan, As, Bs, dtype, stats))
        _dense_done(task, res, stats)
        return _lora_outputs(task, res.a, res.b, ld, dtype)
    else:
        coeffs = [w * s for w, s in zip(task.weights, task.scalings, strict=True)]
        # Scaled (and factorised) in float32 at least, then rounded to `dtype` once.
        if task.mode == "svd":
            cache = ld.reader.cache
            memo = None if cache is None else cache.derived.setdefault("qr", QrMemo(cache.charge))
            ref = refactor_concat(
                As, Bs, coeffs, task.rank, compute_dtype=acc, memo=memo, key=task.module
            )
            a, b = ref.A, ref.B
            stats.rel_errors[task.module] = ref.rel_error
        else:
            a, b = concat_factors(As, Bs, coeffs, dtype=acc)
    return _lora_outputs(task, a.to(dtype), b.to(dtype), ld, dtype, coeffs)


def _lora_outputs(
    task: LoraTask,
    a: torch.Tensor,
    b: torch.Tensor,
    ld: _Loader,
    dtype: torch.dtype,
    coeffs: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """A task's written tensors from its factors (rounded to ``dtype``): checked, cast, bias.

    ``coeffs`` are the bias's merge coefficients (default w_i·s_i).
    """
    if coeffs is None:
        coeffs = [w * s for w, s in zip(task.weights, task.scalings, strict=True)]
    # Factors made from ΔW (or re-factorised from all of them) come from every A and B: a
    # non-finite one of either kind is what to name.
    joint = task.mode in ("svd", "dense", "full")
    refs_a, refs_b = (task.a + task.b, task.a + task.b) if joint else (task.a, task.b)
    out = {
        task.out_a.key: ld.finish(a, task.out_a.dtype, refs_a, task.out_a.key),
        task.out_b.key: ld.finish(b, task.out_b.dtype, refs_b, task.out_b.key),
    }
    if task.bias is not None and task.out_bias is not None:
        # lora_B's bias is scaled with B: it merges with the same coefficients as B.
        bias = factor_sum(ld.get(task.bias), coeffs, dtype, "bias")
        key = task.out_bias.key
        out[key] = ld.finish(bias, task.out_bias.dtype, task.bias, key)
    return out


def task_refs(task: Task) -> tuple[TensorRef, ...]:
    """Every input a task reads: checkpoints, base and side inputs."""
    if isinstance(task, LoraTask):
        return task.inputs + (task.aux_a or ()) + (task.aux_b or ())
    return task.inputs + ((task.base,) if task.base else ()) + (task.aux or ())


class MemorySink:
    """A tensor sink that keeps the merged tensors in memory (no file is written).

    What `execute` writes into it equals, tensor for tensor, what it writes into the output
    file: the same plan, methods and output dtypes. Used to score merges without a disk write.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}

    def __enter__(self) -> MemorySink:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def expect(self, plan: Plan) -> None:
        """Learn the planned output tensors, so that `buffer` can make them (`execute` calls
        it)."""
        self._specs = {o.key: (torch_dtype(o.dtype), o.shape) for o in plan.outputs}

    def buffer(self, name: str) -> torch.Tensor:
        """Fresh CPU memory of a planned tensor's dtype and shape, to merge into (as the file
        writers' `buffer`: fused linear sums are made in it, with no temporaries).

        Raises:
            KeyError: The name is not planned (or `expect` was not called).
        """
        dtype, shape = self._specs[name]
        return torch.empty(shape, dtype=dtype)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Keep one merged tensor (already on the CPU, in its output dtype)."""
        self.tensors[name] = tensor


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite, in one pass without a temporary.

    NaN and ±Inf always propagate into a sum (Inf + −Inf is NaN), so a finite sum proves every
    element finite; it reads the tensor once and allocates nothing, where ``isfinite(t).all()``
    writes a bool tensor as large as ``t`` first (measured 20× slower on 256 MiB). Only a sum
    that is not finite — a non-finite element, or a sum that overflowed — is checked element
    by element.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype in _SUMMABLE and bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


_SUMMABLE = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def execute(
    plan: Plan,
    out_dir: Path | None,
    *,
    on_task: Callable[[int, Task], None] | None = None,
    sink: MemorySink | None = None,
    observer: Observer | None = None,
    syncer: BackgroundSync | None = None,
    cache: InputCache | None = None,
) -> ExecStats:
    """Stream every task of the plan into the output folder's safetensors file(s).

    Computes with `mwakit.threads.merge_threads` torch threads (1 unless ``MWAKIT_THREADS``
    says otherwise); a plan with much dense LoRA work (TIES, DARE, … on adapters) spreads its
    dense tasks over worker processes (`mwakit.executors.pool`), same bytes.

    Args:
        plan: The plan to run.
        out_dir: The (temporary) output folder: ``adapter_model.safetensors`` for adapters,
            ``model.safetensors`` or shards + index for full models. None with ``sink``.
        on_task: Called after each task is written with its index and the task (progress).
        sink: Receive the merged tensors here instead of writing files (``out_dir`` unused).
        observer: Sees every input byte read (e.g. a `StreamHasher` computing fingerprints).
        syncer: Flushes the output files to disk in the background as they are written (the
            caller joins it before the output is renamed into place).
        cache: Input tensors kept across executions (`mwakit.io.cache.InputCache`): what an
            earlier execution read of the same unchanged files is not read again, and what
            this one reads is kept within the cache's budget.

    Raises:
        TensorError: An input holds NaN/Inf, or the merge overflowed.
        PlanError: The device is unavailable, or the method rejects its inputs.
    """
    device = resolve_device(plan.recipe.device)
    dtype: torch.dtype = getattr(torch, plan.recipe.dtype)  # float32, bfloat16, …
    stats = ExecStats(device=str(device))
    t0 = time.perf_counter()
    writer: StreamingWriter | ShardedWriter | MemorySink
    if sink is not None:
        sink.expect(plan)
        writer = sink
    elif out_dir is None:
        raise ValueError("execute needs an output folder or a sink")
    elif plan.kind == "full":
        writer = ShardedWriter(
            out_dir, output_entries(plan), plan.shard_size, out_metadata(plan), syncer
        )
    else:
        writer = StreamingWriter(
            out_dir / "adapter_model.safetensors",
            output_entries(plan),
            out_metadata(plan),
            syncer,
        )
    reader = PreadReader(observer=observer, cache=cache)
    workers = wanted(plan, device.type) if sink is None else 0
    with merge_thread_policy() as threads, reader, writer, ExitStack() as stack:
        # Started first: the workers import torch while this process reads the first inputs.
        pool = stack.enter_context(DensePool(workers, threads)) if workers else None
        ld = _Loader(plan, reader, device)
        _prepasses(plan, ld, stats, dtype)
        tasks = list(enumerate(plan.tasks))
        run_tasks(plan, tasks, ld, writer, stats, on_task=on_task, pool=pool)
    stats.seconds = time.perf_counter() - t0
    return stats


def run_tasks(
    plan: Plan,
    tasks: Sequence[tuple[int, Task]],
    ld: _Loader,
    writer: StreamingWriter | ShardedWriter | MemorySink,
    stats: ExecStats,
    *,
    on_task: Callable[[int, Task], None] | None = None,
    pool: DensePool | None = None,
) -> None:
    """Merge ``tasks`` (index in the plan, task) in order into ``writer``, reading one ahead.

    The loop every executor runs: the local one over the whole plan, the Ray one per shard.
    With a ``pool``, dense LoRA tasks are computed by its worker processes, a few in flight at
    once, and written in plan order all the same.
    """
    dtype: torch.dtype = getattr(torch, plan.recipe.dtype)
    out_dtypes = {o.key: o.dtype for o in plan.outputs}
    reader = ld.reader
    cache = reader.cache
    # Each task's inputs by file, grouped once: the group is read ahead, then released.
    groups = [_by_file(task_refs(task)) for _, task in tasks]
    # Results are made in the writer's own (recycled, aligned) memory where it offers some.
    alloc: Alloc | None = getattr(writer, "buffer", None)
    # Tasks sent to the pool, oldest first: (position in ``tasks``, its result to come).
    pending: deque[tuple[int, Any]] = deque()

    def emit(j: int, results: dict[str, torch.Tensor]) -> None:
        i, task = tasks[j]
        refs = task_refs(task)
        stats.max_live_inputs = max(stats.max_live_inputs, len(refs))
        for key, t in results.items():
            t = t.to(device="cpu", dtype=torch_dtype(out_dtypes[key])).contiguous()
            if cache is not None and cache.owns(t):
                # A copied input (or a method returning its input) would hand the cache's
                # bytes to the caller, who may write into them.
                t = t.clone()
            writer.write(key, t)
            stats.bytes_written += t.numel() * t.element_size()
        stats.bytes_read += sum(r.info.nbytes for r in refs)
        del results
        for path, infos in groups[j].items():
            reader.release(path, infos)
        stats.tasks += 1
        if on_task is not None:
            on_task(i, task)

    def drain(keep: int) -> None:
        while len(pending) > keep:
            j, handle = pending.popleft()
            task = tasks[j][1]
            assert isinstance(task, LoraTask)
            with _explained(plan.method.name, task.module):
                res = handle.get()
            _dense_done(task, res, stats)
            emit(j, _lora_outputs(task, res.a, res.b, ld, dtype))

    for j, (_, task) in enumerate(tasks):
        if j + 1 < len(tasks):
            for path, infos in groups[j + 1].items():
                reader.prefetch(path, infos)
        if pool is not None and isinstance(task, LoraTask) and task.dense:
            a, b = copied(ld.get(task.a)), copied(ld.get(task.b))
            pending.append((j, pool.submit(_dense_job(task, plan, a, b, dtype, stats))))
            drain(2 * pool.count)  # each worker busy, one more queued for each
            continue
        drain(0)
        if isinstance(task, FullTask):
            emit(j, _run_full(task, plan, ld, dtype, stats, alloc))
        else:
            emit(j, _run_lora(task, plan, ld, dtype, stats))
    drain(0)


def _prepasses(plan: Plan, ld: _Loader, stats: ExecStats, dtype: torch.dtype) -> None:
    """Whole-model statistics some methods need before the streaming pass."""
    if getattr(plan.params, "normalize_fisher", False):
        # Global L2 norm of each checkpoint's Fisher, streamed one tensor at a time.
        sums = [0.0] * len(plan.checkpoints)
        for task in plan.tasks:
            for refs in _aux_groups(task):
                for r in refs:
                    t = ld.reader.get(r.info, r.path)
                    sums[r.ckpt] += float(t.double().square().sum())
                _release(ld.reader, refs)
        stats.fisher_norms = [s**0.5 for s in sums]
    if getattr(plan.params, "trim_scope", "tensor") == "model":
        from mwakit.thresholds import model_thresholds

        stats.thresholds = model_thresholds(plan, ld, dtype)


def _aux_groups(task: Task) -> list[tuple[TensorRef, ...]]:
    if isinstance(task, LoraTask):
        return [g for g in (task.aux_a, task.aux_b) if g]
    return [task.aux] if task.aux else []


def _by_file(refs: Sequence[TensorRef]) -> dict[Path, list[TensorInfo]]:
    by_file: dict[Path, list[TensorInfo]] = {}
    for r in refs:
        by_file.setdefault(r.path, []).append(r.info)
    return by_file


def _release(reader: PreadReader, refs: Sequence[TensorRef]) -> None:
    for path, infos in _by_file(refs).items():
        reader.release(path, infos)
