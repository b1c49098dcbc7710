"""How many torch threads a merge computes with: one, unless told otherwise.

Streaming merges are memory-bound elementwise work (weighted sums, casts, finiteness checks):
a second intra-op thread barely helps them on an idle box, and on a busy one it is ruinous. On
the project's shared 2-core machine (load ≈ 6) a 256 MiB ``torch.isfinite(x).all()`` took
0.87 s with 1 thread and 1.77 s with 2; a five-way bf16 weighted sum 0.53 s against 1.90 s;
a cast 0.17 s against 0.34 s. OpenMP workers that wait at a barrier for a descheduled peer
spin, burning the core the peer needs. Meanwhile mwakit's own second core is busy anyway: the
reader's read-ahead thread copies (and hashes) the next tensor group while this one computes.

`benchmarks/bench_threads.py` measures these kernels; at load ≈ 10 it gave TIES over five
2048×5632 task vectors 1.67 s with 1 thread against 19.8 s with 2.

So a merge runs with 1 intra-op thread, which also makes every result independent of the
machine's core count. ``MWAKIT_THREADS=N`` overrides it (a many-core idle machine re-factorising
large ΔW with ``delta_rank`` gains from more threads in the randomized sketch's products; the
QR and SVD steps run on one thread whatever the setting, so the bytes do not change);
``MWAKIT_THREADS=auto`` keeps torch's own choice. The previous setting is restored afterwards,
so a program that calls mwakit keeps its own.

The blocked merge kernel (`mwakit.methods.blocks`: TIES, DARE, trims, on a CPU) is
compute-bound on cache-resident blocks instead: it splits its blocks (and a trim its
per-checkpoint threshold selections) over
`block_workers` Python threads, each running its own single-threaded torch ops on its own
buffers. Those threads take the next block when they are free and wait on a lock (they sleep,
never spin) when there is none, so a busy box slows them without the barrier collapse above,
and every element is computed by the same ops whichever thread takes its block: the bytes do
not depend on the count. ``MWAKIT_BLOCK_WORKERS=N`` sets it (default: the cores this process may
run on, at most `MAX_BLOCK_WORKERS`).

Those threads still hand the GIL over at every op (1.3–1.5× from two on the 2-core box), so
the dense LoRA tasks of a large task-vector merge go to worker processes instead
(`mwakit.executors.pool`, 1.9× from two): ``MWAKIT_PROCESSES=N`` sets how many (1: none;
default: as many as block workers).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from mwakit.errors import UsageError

ENV = "MWAKIT_THREADS"
DEFAULT = 1
BLOCK_ENV = "MWAKIT_BLOCK_WORKERS"
MAX_BLOCK_WORKERS = 4
"""The default's cap (also of the worker processes): a guess, measured only on 2 cores, that
more threads would mostly contend for the memory bus and more processes hold more memory."""
PROCESS_ENV = "MWAKIT_PROCESSES"


def merge_threads() -> int | None:
    """The intra-op thread count for a merge: ``MWAKIT_THREADS`` or 1; None for ``auto``.

    Raises:
        UsageError: ``MWAKIT_THREADS`` is neither a whole number ≥ 1 nor ``auto``.
    """
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT
    if raw.lower() == "auto":
        return None
    if raw.isdigit() and int(raw) >= 1:
        return int(raw)
    raise UsageError(
        f"{ENV}={raw!r} is not a thread count",
        where=ENV,
        fix="set it to a whole number ≥ 1 (e.g. 1) or auto, or unset it",
    )


@contextmanager
def merge_thread_policy() -> Iterator[int]:
    """Run the block with `merge_threads` intra-op torch threads; yields the count in use."""
    import torch

    want = merge_threads()
    block_workers()  # bad counts are refused before the merge starts
    merge_processes()
    before = torch.get_num_threads()
    if want is None or want == before:
        yield before
        return
    torch.set_num_threads(want)
    try:
        yield want
    finally:
        torch.set_num_threads(before)


def usable_cpus() -> list[int]:
    """The CPUs this process may run on, in order (all of them where that is not known)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return list(range(os.cpu_count() or 1))


def _cores() -> int:
    return max(1, min(MAX_BLOCK_WORKERS, len(usable_cpus())))


def _count(env: str, none: str) -> int:
    raw = os.environ.get(env, "").strip()
    if not raw:
        return _cores()
    if raw.isdigit() and int(raw) >= 1:
        return int(raw)
    raise UsageError(
        f"{env}={raw!r} is not a worker count",
        where=env,
        fix=f"set it to a whole number ≥ 1 (1: {none}), or unset it",
    )


def block_workers() -> int:
    """Python threads a blocked CPU kernel splits its blocks over (``MWAKIT_BLOCK_WORKERS``).

    Raises:
        UsageError: ``MWAKIT_BLOCK_WORKERS`` is not a whole number ≥ 1.
    """
    return _count(BLOCK_ENV, "no block threads")


def merge_processes() -> int:
    """Worker processes for the dense LoRA tasks of a large merge (``MWAKIT_PROCESSES``).

    Raises:
        UsageError: ``MWAKIT_PROCESSES`` is not a whole number ≥ 1.
    """
    return _count(PROCESS_ENV, "no worker processes")
