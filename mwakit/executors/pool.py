"""Merge processes for the dense LoRA tasks of a large task-vector merge on a CPU.

TIES, DARE and the trims on adapters work on every ΔW_i = s_i B_i A_i: compute-bound work on
tiny inputs (the factors, ~1 MB per module and checkpoint) that dwarfs the reading — ten rank-16
adapters of Llama-3-8B shapes are 1.7 GB of factors and 70 G element-operations of ΔW. One
process computes it on one core. Python threads do not give the second one back: every torch
op on a cache-sized block hands the GIL over (measured on the project's 2-core box: 1.3–1.5×
from two threads on these kernels, against 1.9× from two processes). So, when the plan holds
enough such work (`POOL_MIN`), each dense task is sent — its factors copied, a few MB — to one
of `mwakit.threads.merge_processes` worker processes, and the results are written in plan order.

Every worker computes a task with the very code (`mwakit.execute.dense_lora`) and thread
settings (`mwakit.threads.merge_threads` intra-op threads, no block threads) of the merging
process, so the bytes do not depend on where a task ran, nor on how many workers there are.
Workers are started with ``spawn`` (the merging process has reader and hashing threads running,
which ``fork`` must not copy); they ignore Ctrl-C, are stopped by the merging process on its
way out, whether the merge succeeded or not, and (on Linux) die with it if it is killed.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from mwakit.execute import DenseJob, DenseResult
    from mwakit.planner import Plan

POOL_MIN = 1 << 31
"""The least dense work (Σ over dense tasks of ΔW elements × checkpoints) worth a pool: about
8 s of single-process compute, against ~1.5 s for a worker to start (which overlaps the first
tasks' reading)."""


def dense_work(plan: Plan) -> int:
    """Σ over the plan's dense LoRA tasks of the ΔW elements times the checkpoints merged."""
    from mwakit.planner import LoraTask

    return sum(
        task.b[0].info.shape[0]
        * math.prod(task.a[0].info.shape[1:])  # ΔW is out × in (× kernel)
        * sum(1 for w in task.weights if w != 0.0)
        for task in plan.tasks
        if isinstance(task, LoraTask) and task.dense
    )


def wanted(plan: Plan, device: str) -> int:
    """How many worker processes this plan's execution should use (0: none, compute here)."""
    from mwakit.threads import merge_processes

    if plan.kind == "full" or device != "cpu":
        return 0
    count = merge_processes()
    if count < 2 or dense_work(plan) < POOL_MIN:
        return 0
    return count


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """On Linux, have the kernel kill this worker when the merging process dies (SIGKILL, a
    crash): an orphan would otherwise finish its task, burning a core for nothing."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the pool's pipes end it after its task
        pass


def _start(threads: int) -> None:
    """A worker's set-up: the merge's thread policy, no block threads, Ctrl-C left to the parent."""
    import torch

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["MWAKIT_BLOCK_WORKERS"] = "1"  # the processes are the parallelism
    torch.set_num_threads(threads)


def _run(job: DenseJob) -> DenseResult:
    from mwakit.execute import dense_lora

    return dense_lora(job)


class DensePool:
    """Worker processes computing `DenseJob`s; a context manager that stops them on exit.

    Args:
        count: Worker processes.
        threads: Intra-op torch threads of each (the merge's own count).
    """

    def __init__(self, count: int, threads: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.count = count
        self._pool: Any = ctx.Pool(count, initializer=_start, initargs=(threads,))

    def submit(self, job: DenseJob) -> Any:
        """Queue ``job``; ``.get()`` on the returned handle gives its `DenseResult` (or raises
        what `mwakit.execute.dense_lora` raised)."""
        return self._pool.apply_async(_run, (job,))

    def __enter__(self) -> DensePool:
        return self

    def __exit__(self, *exc: object) -> None:
        # Finished or failed, nothing more is wanted from the workers: stop them now.
        self._pool.terminate()
        self._pool.join()


def copied(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Compact copies to send: a view would pickle the whole buffer it is a view of."""
    import torch

    return [t.detach().clone(memory_format=torch.contiguous_format) for t in tensors]
