"""Factor averages without torch: the executor of linear merges of LoRA factors, in NumPy.

A linear merge of adapters in factor space (``mwa`` or ``linear`` with ``lora_space:
factors``, the default) is, per module, Ā = Σ_i w_i A_i and B̄ = Σ_i (w_i s_i / s_out) B_i
(`mwakit.lowrank.factors_average`), and Σ_i w_i t_i for its full tensors (``modules_to_save``,
biases; integer buffers are copied): a few multiply-adds per input byte. Importing torch
costs more than the whole merge (1.6 s on the benchmark box, where the merge of ten
Llama-3-8B-shaped r16 adapters takes under a second), so `mwakit run` computes these plans
here, with NumPy, and never imports torch.

Same bytes as the torch executor (tested, input for input): the arithmetic is
`mwakit.lowrank.factor_sum`'s — in float32, each term the input widened exactly, times w_i
rounded to float32, rounded, then added and rounded, never fused — and bfloat16 is rounded to
nearest even with integer arithmetic as torch rounds it; float16 is NumPy's own IEEE rounding.
The output file has `mwakit.io.filelayout`'s layout, as the torch writer's.

What it does not take stays with `mwakit.execute` (`fits` says which): another method or
space, float64, a device other than ``cpu``/``auto`` (``auto`` runs here: a factor average is
memory-bound, and on a GPU the host-to-device copies would cost more than the sums), side
inputs, a base. A result that is not finite is handed to the torch executor too, which names the
culprit (or the dtype that cannot hold it) exactly as it always has.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from mwakit.errors import OutputError
from mwakit.executors.stats import ExecStats
from mwakit.io.durable import (
    ALIGN,
    KICK_BYTES,
    BackgroundSync,
    InFlight,
    drop_direct,
    open_output,
    pwrite_all,
    reserve,
)
from mwakit.io.filelayout import Entry, header_bytes
from mwakit.io.files import InputFiles
from mwakit.io.oserror import output_error
from mwakit.methods.linear import weighted_sum
from mwakit.planner import (
    FullTask,
    OutTensor,
    Plan,
    Task,
    TensorRef,
    out_metadata,
    output_entries,
)

__all__ = ["execute_factors", "fits"]

_CODES = ("F32", "BF16", "F16")
"""Input and output dtypes this executor reads and writes."""
_COMPUTE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
"""Compute dtypes (the recipe's ``dtype``) it rounds to, as safetensors codes."""

Observer = Callable[[Path, int, Any], None]


class _NotFinite(Exception):
    """A result is not finite: the torch executor redoes the merge to say why."""


def fits(plan: Plan) -> bool:
    """Whether this executor runs ``plan`` (same bytes as `mwakit.execute.execute`).

    A factor-space LoRA merge by a linear method, on the CPU, computed in float32, bfloat16 or
    float16, reading and writing those dtypes, with no side inputs (Fisher and the like); its
    full tensors (``modules_to_save``, biases) are weighted sums too, its integer ones copies.
    """
    r = plan.recipe
    if plan.kind != "adapter" or not plan.method.linear or not plan.tasks:
        return False
    if r.device not in ("cpu", "auto") or r.dtype not in _COMPUTE or r.executor == "ray":
        return False
    for task in plan.tasks:
        if isinstance(task, FullTask):
            if task.copy:
                continue  # an integer tensor: its bytes are copied from the first checkpoint
            if task.base is not None or task.aux or plan.method.merge is not weighted_sum:
                return False
            outs: tuple[OutTensor, ...] = (task.out,)
        elif task.mode != "factors" or task.aux_a or task.aux_b:
            return False
        else:
            outs = task.outputs
        if any(ref.info.dtype not in _CODES for ref in task.inputs):
            return False
        if any(o.dtype not in _CODES for o in outs):
            return False
    return True


def execute_factors(
    plan: Plan,
    out_dir: Path,
    *,
    on_task: Callable[[int, Task], None] | None = None,
    observer: Observer | None = None,
    syncer: BackgroundSync | None = None,
) -> ExecStats:
    """Write the merged adapter of a plan that `fits` into ``out_dir``, without torch.

    Streams one module at a time: its A (then B, then bias) inputs are read, summed and
    written before the next module's are read.

    Args:
        plan: A plan for which `fits` is true.
        out_dir: The (temporary) output folder; ``adapter_model.safetensors`` is written there.
        on_task: Called after each module is computed, with its index and task (progress).
        observer: Sees every input byte read, as (file, offset, uint8 array), e.g. a
            `mwakit.io.hashing.StreamHasher` computing fingerprints; it may keep the array.
        syncer: Writes (and flushes) the file in the background, and fsyncs it at the end.

    Returns:
        What the execution did (device ``cpu``).

    Raises:
        SourceError: An input cannot be read, or changed while being read.
        OutputError: The output cannot be written.
        TensorError, PlanError: From the torch executor, to which a merge whose result is not
            finite is handed (it names the input holding NaN/Inf, or the dtype that overflows).
    """
    if not fits(plan):
        raise ValueError("execute_factors: this plan needs the torch executor (mwakit.execute)")
    path = out_dir / "adapter_model.safetensors"
    layout = output_entries(plan), out_metadata(plan)
    try:
        with InputFiles() as files, _Output(path, *layout, syncer) as out:
            return _run(plan, files, out, on_task, observer)
    except _NotFinite:
        # The torch executor re-reads (the hasher ignores bytes it has already seen), rewrites
        # the file from scratch and raises the error it has always raised.
        from mwakit.execute import execute

        return execute(plan, out_dir, on_task=on_task, observer=observer, syncer=syncer)


def _run(
    plan: Plan,
    files: InputFiles,
    out: _Output,
    on_task: Callable[[int, Task], None] | None,
    observer: Observer | None,
) -> ExecStats:
    t0 = time.perf_counter()
    stats = ExecStats(device="cpu")
    compute = _COMPUTE[plan.recipe.dtype]
    bufs = _Buffers()
    tasks = plan.tasks
    for i, task in enumerate(tasks):
        groups: list[tuple[Sequence[TensorRef], Sequence[float], OutTensor]]
        if isinstance(task, FullTask) and task.copy:
            raw = _read(files, task.inputs[0], observer, bufs)  # as the torch executor copies
            out.write(task.out.key, raw)
            stats.bytes_written += raw.nbytes
            groups = []
        elif isinstance(task, FullTask):
            groups = [(task.inputs, task.weights, task.out)]
        else:
            fold = [
                w * s / task.out_scaling for w, s in zip(task.weights, task.scalings, strict=True)
            ]
            groups = [(task.a, task.weights, task.out_a), (task.b, fold, task.out_b)]
            if task.bias is not None and task.out_bias is not None:
                groups.append((task.bias, fold, task.out_bias))
        for refs, ws, o in groups:
            total = _sum(files, refs, ws, observer, bufs)
            written = _round(_round(total, compute), o.dtype)
            if not _finite(written, o.dtype):
                raise _NotFinite(o.key)
            out.write(o.key, written)
            stats.bytes_written += written.nbytes
        refs = task.inputs  # no side inputs, no base (`fits`)
        stats.max_live_inputs = max(stats.max_live_inputs, len(refs))
        stats.bytes_read += sum(r.info.nbytes for r in refs)
        stats.tasks += 1
        if on_task is not None:
            on_task(i, task)
    stats.seconds = time.perf_counter() - t0
    return stats


class _Buffers:
    """Read buffers, recycled once nothing views them any more (the hasher may hold one until
    it is hashed): fresh memory costs a page fault per page, more than the read itself (see
    `mwakit.io.arena`, the torch reader's equivalent, which counts torch storage references;
    this counts NumPy ones). Measured on ten r64 fp32 adapters: 3.4 s against 4.9 s with a
    fresh array per read (5.4–5.6 s against 6.4–6.7 s with hashing)."""

    def __init__(self, keep_free: int = 256 << 20) -> None:
        self._bufs: list[tuple[np.ndarray, int]] = []  # (buffer, refcount when idle), LRU first
        self._keep_free = keep_free

    def take(self, nbytes: int) -> np.ndarray:
        """``nbytes`` of memory no one else uses (contents undefined)."""
        if nbytes < 1 << 20:
            return np.empty(nbytes, dtype=np.uint8)  # malloc recycles small blocks itself
        for i, (buf, idle) in enumerate(self._bufs):
            # At most twice the size, so a small read never pins a huge buffer; a view handed
            # out (to the caller, to the hasher) holds a reference to it.
            if nbytes <= buf.nbytes <= 2 * nbytes and sys.getrefcount(buf) <= idle:
                self._bufs.append(self._bufs.pop(i))
                return buf[:nbytes]
        buf = np.empty(-(-nbytes // (1 << 20)) << 20, dtype=np.uint8)
        # Counted as the loop above counts it: the list's tuple, the name, the call's argument.
        self._bufs.append((buf, sys.getrefcount(buf)))
        free = sum(b.nbytes for b, idle in self._bufs[:-1] if sys.getrefcount(b) <= idle)
        while free > self._keep_free and self._bufs[0][0] is not buf:
            free -= self._bufs.pop(0)[0].nbytes  # one still viewed stays valid for its holder
        return buf[:nbytes]


def _read(
    files: InputFiles, ref: TensorRef, observer: Observer | None, bufs: _Buffers
) -> np.ndarray:
    """The raw bytes of one input tensor, read (and shown to the observer)."""
    info = ref.info
    raw = bufs.take(info.nbytes)
    if info.nbytes:
        files.check_range(ref.path, info.name, info.end)
        files.read_into(ref.path, info.start, raw.data)
        if observer is not None:
            observer(ref.path, info.start, raw)  # it may keep ``raw``: then it is not reused
    return raw


_BLOCK = 1 << 14
"""Elements summed per block: the block's accumulator and term stay in the L1/L2 cache while
every checkpoint's term is added (1.6× faster than whole-tensor passes, measured)."""


def _sum(
    files: InputFiles,
    refs: Sequence[TensorRef],
    ws: Sequence[float],
    observer: Observer | None,
    bufs: _Buffers,
) -> np.ndarray:
    """Σ_i w_i t_i in float32 as `mwakit.lowrank.factor_sum` computes it: the first term with
    a non-zero weight, then each next one added (every input is read, a zero weight's too, as
    the torch executor reads it)."""
    shape = refs[0].info.shape
    terms = []
    for ref, w in zip(refs, ws, strict=True):
        raw = _read(files, ref, observer, bufs)
        if w != 0.0:
            terms.append((_flat(raw, ref.info.dtype), np.float32(w)))
    n = math.prod(shape)
    if not terms:
        return np.zeros(shape, dtype=np.float32)
    acc = np.empty(n, dtype=np.float32)
    term = np.empty(min(n, _BLOCK), dtype=np.float32)
    for lo in range(0, n, _BLOCK):
        a = acc[lo : lo + _BLOCK]
        t = term[: len(a)]
        for k, (x, w32) in enumerate(terms):
            np.multiply(_widened(x[lo : lo + _BLOCK], t), w32, out=a if k == 0 else t)
            if k:
                np.add(a, t, out=a)
    return acc.reshape(shape)


def _flat(raw: np.ndarray, code: str) -> np.ndarray:
    """The input bytes as a flat array of their dtype (bfloat16 as its uint16 bits)."""
    return raw.view({"F32": np.float32, "BF16": np.uint16, "F16": np.float16}[code])


def _widened(x: np.ndarray, term: np.ndarray) -> np.ndarray:
    """A block of an input as float32: itself, or widened (exactly) into ``term``."""
    if x.dtype == np.float32:
        return x
    if x.dtype == np.uint16:
        # A bfloat16 is the top half of the float32 with the same value.
        np.left_shift(x, 16, out=term.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(term, x)
    return term


def _round(x: np.ndarray, code: str) -> np.ndarray:
    """``x`` (float32, or a rounded result) rounded to ``code``, as torch's ``.to`` rounds.

    bfloat16 comes back as its bits (uint16), the others as NumPy floats.
    """
    if code == "F32":
        if x.dtype == np.uint16:  # bfloat16 bits: widened exactly
            return np.left_shift(x.astype(np.uint32), 16).view(np.float32)
        return x.astype(np.float32, copy=False)
    if code == "F16":
        if x.dtype == np.uint16:
            x = np.left_shift(x.astype(np.uint32), 16).view(np.float32)
        with np.errstate(over="ignore"):  # Inf, as torch writes it: `_finite` catches it
            return x.astype(np.float16)
    if x.dtype == np.uint16:
        return x
    if x.dtype == np.float16:
        x = x.astype(np.float32)
    # Round to nearest, ties to even: add 0x7FFF plus the lowest kept bit, drop 16 bits (a
    # carry into the exponent is the correct rounding up, to Inf at the top). NaN can come
    # out as Inf here: a non-finite result goes to the torch executor anyway.
    u = x.view(np.uint32)
    keep = np.right_shift(u, 16)
    np.bitwise_and(keep, 1, out=keep)
    keep += np.uint32(0x7FFF)
    keep += u
    np.right_shift(keep, 16, out=keep)
    return keep.astype(np.uint16)


def _finite(x: np.ndarray, code: str) -> bool:
    if code == "BF16":
        exponent = np.bitwise_and(x, np.uint16(0x7F80))
        return not bool((exponent == np.uint16(0x7F80)).any())
    # A finite sum proves every element finite (NaN and Inf propagate); a float16 sum is
    # taken in float32, which cannot overflow on float16 values.
    with np.errstate(over="ignore", invalid="ignore"):
        if bool(np.isfinite(x.sum(dtype=np.float32))):
            return True
    return bool(np.isfinite(x).all())


_STAGE = 8 << 20
"""Bytes gathered per direct write (a multiple of the direct I/O granularity)."""
_STAGES = 4
"""Staging buffers at most (in flight on the syncer's thread, or filling)."""


class _Output:
    """The output adapter file: header first, each tensor at its planned offset.

    Tensors come in plan order, which for adapters saved by PEFT is the file's own order. While
    they do, their bytes are gathered into aligned staging buffers that are written whole, with
    direct I/O (``O_DIRECT``) where the file system allows, on the syncer's thread when there
    is one: no page-cache copy (a buffered write of 670 MB cost 0.17–1.4 CPU-s here, a direct
    one 0.02) and nothing left to flush. A tensor out of order writes what is gathered and
    turns direct I/O off: it and the rest are written buffered, each where it belongs.
    """

    def __init__(
        self,
        path: Path,
        entries: Sequence[Entry],
        metadata: dict[str, str],
        syncer: BackgroundSync | None,
    ) -> None:
        self.path = path
        self._syncer = syncer
        head, self._offsets = header_bytes(entries, metadata)
        self._data_start = len(head)
        self._size = self._data_start + max((e for _, e in self._offsets.values()), default=0)
        self._written: set[str] = set()
        self._unsynced = 0
        self._in_flight = InFlight()
        self._in_order = True  # every write so far came in file order: they are gathered
        self._pos = 0  # where the next byte goes while they do
        self._stage: np.ndarray | None = None  # gathering [self._stage_at, self._pos)
        self._stage_at = 0
        self._spare: deque[tuple[np.ndarray, Future[None] | None]] = deque()  # oldest first
        self._stages = 0
        self._fd: int | None = None
        try:
            self._fd, self._direct = open_output(path, None)
            reserve(self._fd, self._size)
            self._gather(np.frombuffer(head, dtype=np.uint8))
        except OSError as err:
            self._close(sync=False)
            raise output_error(err, "cannot write", str(path)) from err

    def __enter__(self) -> _Output:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        missing = sorted(set(self._offsets) - self._written)
        complete = exc_type is None and not missing
        if complete:
            try:
                self._flush()
            except OSError as err:
                self._close(sync=False)
                raise output_error(err, "cannot write", str(self.path)) from err
        self._close(sync=complete)
        if exc_type is None and missing:
            raise OutputError(
                f"{len(missing)} planned tensor(s) never written, e.g. {', '.join(missing[:5])}",
                where=str(self.path),
            )

    def _job(self, fn: Callable[[int], None]) -> Future[None] | None:
        """Run ``fn(fd)`` on the syncer's thread (in order with the writes), or now."""
        assert self._fd is not None
        if self._syncer is None:
            fn(self._fd)
            return None
        return self._syncer.submit(fn, self._fd, self.path)

    def _close(self, *, sync: bool) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if self._syncer is not None:
            self._syncer.close(fd, self.path, sync=sync)
        else:
            try:
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)

    def _pwrite(self, pos: int, data: memoryview) -> Future[None] | None:
        """Write ``data`` at ``pos`` (the memoryview holds its array until it is written)."""

        def write(fd: int) -> None:
            pwrite_all(fd, data, pos)

        fut = self._job(write)
        if fut is None:
            return None
        n = data.nbytes
        self._in_flight.add(fut, n)
        if not self._direct:
            self._unsynced += n
            if self._syncer is not None and self._unsynced >= KICK_BYTES:
                self._unsynced = 0
                assert self._fd is not None
                self._syncer.kick(self._fd, self.path)
        return fut

    def _take_stage(self) -> np.ndarray:
        if self._spare and (self._stages >= _STAGES or _done(self._spare[0][1])):
            buf, fut = self._spare.popleft()
            if fut is not None:
                fut.result()  # its write is over: the buffer is free
            return buf
        self._stages += 1
        raw = np.empty(_STAGE + ALIGN, dtype=np.uint8)
        skip = -raw.ctypes.data % ALIGN  # direct I/O wants aligned memory
        return raw[skip : skip + _STAGE]

    def _gather(self, data: np.ndarray) -> None:
        """Append ``data`` at ``self._pos``: staged, each full stage written whole."""
        done = 0
        while done < data.nbytes:
            if self._stage is None:
                self._stage = self._take_stage()
            fill = self._pos - self._stage_at
            k = min(data.nbytes - done, _STAGE - fill)
            self._stage[fill : fill + k] = data[done : done + k]
            done += k
            self._pos += k
            if self._pos - self._stage_at == _STAGE:
                self._flush()

    def _flush(self) -> None:
        """Write what is gathered: whole blocks while direct (the file's last block is cut to
        size afterwards), exactly the gathered bytes otherwise."""
        stage, n = self._stage, self._pos - self._stage_at
        if stage is None or n == 0:
            return
        length = -(-n // ALIGN) * ALIGN if self._direct else n
        fut = self._pwrite(self._stage_at, stage[:length].data)
        self._spare.append((stage, fut))
        self._stage, self._stage_at = None, self._pos
        if length > n:
            size = self._size
            self._job(lambda fd: os.ftruncate(fd, size))

    def _scatter(self) -> None:
        """Write what is gathered and go on writing each tensor where it belongs, buffered (a
        tensor came out of file order)."""
        stage, n = self._stage, self._pos - self._stage_at
        self._in_order = False
        if self._direct:
            self._direct = False
            self._job(_buffered)
        if stage is not None and n:
            self._pwrite(self._stage_at, stage[:n].data)
        self._stage = None

    def write(self, name: str, data: np.ndarray) -> None:
        """Write one planned tensor's bytes (C-contiguous, of its planned dtype)."""
        start, end = self._offsets[name]
        if data.nbytes != end - start:
            raise AssertionError(f"{name}: {data.nbytes} bytes, planned {end - start}")
        at = self._data_start + start
        raw = data.reshape(-1).view(np.uint8)
        try:
            if not raw.nbytes:
                pass
            elif self._in_order and at == self._pos:
                self._gather(raw)
            else:
                if self._in_order:
                    self._scatter()
                self._pwrite(at, raw.data)
        except OSError as err:
            raise output_error(err, f"cannot write tensor {name!r}", str(self.path)) from err
        self._written.add(name)


def _buffered(fd: int) -> None:
    drop_direct(fd)


def _done(fut: Future[None] | None) -> bool:
    return fut is None or fut.done()
