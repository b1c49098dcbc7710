"""Where candidates are scored: in this process, in N local processes, or on Ray actors.

Each worker builds its scorer once (loads the base model and the data once) and then takes
one candidate at a time from the driver, so a slow candidate never holds up the others. A
worker that dies (killed, out of memory) loses only the candidate it held: the driver starts
a new worker and scores that candidate again (twice at most, then the tune stops with an
error naming it). An error the scorer raises on purpose (`MwakitError`) is not retried: it is
raised in the driver as if scored here.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mwakit import errors
from mwakit.errors import MwakitError
from mwakit.tune.scoring import Scorer, ScorerSpec
from mwakit.tune.trials import Score

#: Tries of one candidate before a dying worker stops the tune.
TRIES = 3


@dataclass(frozen=True)
class Job:
    """One candidate to score: its memo key, recipe data and split."""

    key: str
    recipe: dict[str, Any]
    split: str


class Pool(Protocol):
    """Scores jobs; results come back as they finish."""

    def run(self, jobs: Sequence[Job]) -> Iterator[tuple[Job, Score]]:
        """Score every job, yielding each (job, score) when it is done."""
        ...

    def close(self) -> None:
        """Stop the workers."""
        ...


def _pack(err: BaseException) -> tuple[str, str, str | None, str | None]:
    """An error as plain strings, to cross a process boundary whatever its constructor."""
    if isinstance(err, MwakitError) and type(err).__init__ is MwakitError.__init__:
        return type(err).__name__, err.what, err.where, err.fix
    if isinstance(err, MwakitError):
        return "MwakitError", err.message, None, None
    return "", f"{type(err).__name__}: {err}", None, None


def _unpack(packed: tuple[str, str, str | None, str | None], key: str) -> BaseException:
    name, what, where, fix = packed
    cls = getattr(errors, name, None) if name else None
    if isinstance(cls, type) and issubclass(cls, MwakitError):
        return cls(what, where=where, fix=fix)
    return RuntimeError(f"scoring candidate {key} failed in a worker: {what}")


def _died(job: Job, why: str) -> MwakitError:
    return errors.PlanError(
        f"a worker died {TRIES} times scoring this candidate ({why})",
        where=f"candidate {job.key}",
        fix="check the workers' memory (fewer --workers), or score it alone without workers",
    )


class InProcess:
    """Score in this process (the scorer is built on first use)."""

    def __init__(self, spec: ScorerSpec) -> None:
        self.spec = spec
        self._scorer: Scorer | None = None

    def run(self, jobs: Sequence[Job]) -> Iterator[tuple[Job, Score]]:
        """Score the jobs one by one."""
        if self._scorer is None:
            self._scorer = self.spec.build()
        for job in jobs:
            yield job, self._scorer.score(job.recipe, job.split)

    def close(self) -> None:
        """Drop the scorer (and its model)."""
        self._scorer = None


def _worker_main(conn: Any, spec: ScorerSpec, threads: int = 0) -> None:
    """A local worker: build the scorer, then score what the driver sends until None.

    ``threads`` (> 0) caps the worker's math threads, so N workers share the cores instead
    of each starting one thread per core.
    """
    import signal
    import sys

    if threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # read when torch is first imported

    # Ctrl-C reaches the whole process group: the driver stops the workers itself, so a
    # worker must not die printing a KeyboardInterrupt traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        scorer = spec.build()
    except BaseException as err:
        conn.send(("init", "err", _pack(err)))
        return
    if threads > 0 and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    conn.send(("init", "ok", None))
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            conn.send((job.key, "ok", scorer.score(job.recipe, job.split)))
        except Exception as err:
            conn.send((job.key, "err", _pack(err)))


class LocalWorkers:
    """N local processes (spawned: a clean interpreter each, no forked torch state)."""

    def __init__(self, spec: ScorerSpec, n: int) -> None:
        import multiprocessing

        self.spec, self.n = spec, max(1, n)
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[tuple[Any, Any]] = []  # (process, connection)
        self._ready: set[int] = set()
        self._deaths = 0

    def _start(self) -> tuple[Any, Any]:
        parent, child = self._ctx.Pipe()
        threads = max(1, (os.cpu_count() or 1) // self.n)
        proc = self._ctx.Process(target=_worker_main, args=(child, self.spec, threads), daemon=True)
        proc.start()
        child.close()
        return proc, parent

    def run(self, jobs: Sequence[Job]) -> Iterator[tuple[Job, Score]]:
        """Score the jobs on the workers, restarting any that dies."""
        from multiprocessing.connection import wait

        queue = deque((job, 0) for job in jobs)
        while len(self._workers) < min(self.n, len(queue)):
            self._workers.append(self._start())
        # Per worker: "init" (starting), "idle", or the (job, tries) it holds.
        state: dict[int, Any] = {
            i: "idle" if i in self._ready else "init" for i in range(len(self._workers))
        }
        while queue or any(isinstance(v, tuple) for v in state.values()):
            for i, v in state.items():
                if v == "idle" and queue:
                    held = queue.popleft()
                    self._workers[i][1].send(held[0])
                    state[i] = held
            ready: dict[Any, int] = {}
            for i in state:
                ready[self._workers[i][1]] = i
                ready[self._workers[i][0].sentinel] = i
            seen: set[int] = set()
            for obj in wait(list(ready)):
                i = ready[obj]
                if i in seen:
                    continue
                seen.add(i)
                proc, conn = self._workers[i]
                msg = None
                with contextlib.suppress(EOFError, OSError):
                    if conn.poll():
                        msg = conn.recv()
                if msg is None:
                    if proc.is_alive():
                        continue
                    self._restart(i, state, queue, proc)
                    continue
                key, status, payload = msg
                if key == "init":
                    if status == "err":
                        raise _unpack(payload, "init")
                    state[i] = "idle"
                    self._ready.add(i)
                    continue
                job, _ = state[i]
                state[i] = "idle"
                if status == "err":
                    raise _unpack(payload, key)
                yield job, payload

    def _restart(self, i: int, state: dict[int, Any], queue: deque[Any], proc: Any) -> None:
        """Worker ``i`` died: requeue the candidate it held and start a new worker."""
        held = state[i]
        self._deaths += 1
        if isinstance(held, tuple):
            job, tries = held
            if tries + 1 >= TRIES:
                raise _died(job, f"exit code {proc.exitcode}")
            queue.appendleft((job, tries + 1))
        elif self._deaths >= TRIES * self.n:  # dying while starting, again and again
            raise errors.PlanError(
                f"tune workers keep dying while they start (exit code {proc.exitcode})",
                where="--workers",
                fix="check the workers' memory (fewer --workers), or tune without workers",
            )
        proc.join(timeout=5)
        self._workers[i][1].close()
        self._workers[i] = self._start()
        self._ready.discard(i)
        state[i] = "init"

    def close(self) -> None:
        """Ask every worker to stop, then make sure it did."""
        for _proc, conn in self._workers:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(None)
        for proc, conn in self._workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
            conn.close()
        self._workers = []
        self._ready = set()


class _Actor:
    """A Ray actor: the scorer, built once."""

    def __init__(self, spec: ScorerSpec) -> None:
        self.scorer = spec.build()

    def score(self, job: Job) -> tuple[str, Any]:
        try:
            return "ok", self.scorer.score(job.recipe, job.split)
        except Exception as err:
            return "err", _pack(err)


class RayWorkers:
    """Ray actors on a cluster (``address``; None starts a local one), each loading the base
    once; the driver hands each free actor the next candidate."""

    def __init__(self, spec: ScorerSpec, address: str | None, n: int = 0) -> None:
        try:
            import ray
        except ImportError as err:
            raise errors.UsageError(
                "--ray needs Ray installed",
                where="--ray",
                fix="pip install 'mwakit[ray]'",
            ) from err
        self.ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            from mwakit.executors.ray import connect

            connect(ray, address)
        self.n = n or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.spec = spec
        # An actor evaluating on CUDA holds one GPU (Ray then places actors on GPU nodes).
        gpus = 1 if str(spec.kwargs.get("device", "cpu")).startswith("cuda") else 0
        self._remote = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=0)(_Actor)
        self._actors: list[Any] = []

    def run(self, jobs: Sequence[Job]) -> Iterator[tuple[Job, Score]]:
        """Score the jobs on the actors, replacing any that dies."""
        ray = self.ray
        queue = deque((job, 0) for job in jobs)
        while len(self._actors) < min(self.n, len(queue)):
            self._actors.append(self._remote.remote(self.spec))
        inflight: dict[Any, tuple[int, Job, int]] = {}
        free = list(range(len(self._actors)))
        while queue or inflight:
            while free and queue:
                i = free.pop()
                job, tries = queue.popleft()
                inflight[self._actors[i].score.remote(job)] = (i, job, tries)
            done, _ = ray.wait(list(inflight), num_returns=1)
            ref = done[0]
            i, job, tries = inflight.pop(ref)
            try:
                status, payload = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as err:
                if tries + 1 >= TRIES:
                    raise _died(job, type(err).__name__) from err
                queue.appendleft((job, tries + 1))
                self._actors[i] = self._remote.remote(self.spec)
                free.append(i)
                continue
            except ray.exceptions.RayTaskError as err:  # the scorer's __init__ failed
                raise RuntimeError(f"a Ray worker could not start: {err}") from err
            free.append(i)
            if status == "err":
                raise _unpack(payload, job.key)
            yield job, payload

    def close(self) -> None:
        """Stop the actors; disconnect from Ray if this pool connected."""
        for a in self._actors:
            with contextlib.suppress(Exception):
                self.ray.kill(a)
        self._actors = []
        if self._started:  # a connection (or a local cluster) this pool opened: close it
            self.ray.shutdown()


def make_pool(spec: ScorerSpec, workers: int = 0, ray: str | bool | None = None) -> Pool:
    """The pool for these options: Ray actors with ``ray`` (True or "": a local cluster),
    else ``workers`` local processes (≥ 2), else this process."""
    if ray is not None and ray is not False:
        address = ray if isinstance(ray, str) and ray else None
        return RayWorkers(spec, address, workers)
    if workers >= 2:
        return LocalWorkers(spec, workers)
    return InProcess(spec)
