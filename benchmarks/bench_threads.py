"""Benchmark: merge kernels with 1 vs 2 torch threads, on an idle or a busy machine.

The numbers behind `mwakit.threads` (a merge computes with one intra-op thread). Times, for
each thread count, the kernels a streamed full-model merge runs on one 64 M-element tensor
(256 MiB in float32): ``torch.isfinite(x).all()``, the sum-based check mwakit uses instead
(`mwakit.execute.all_finite`), a five-way bf16 weighted sum into float32, the cast to bf16, and
TIES (`mwakit.methods.ties`) on five 2048×5632 task vectors. ``--busy N`` starts N spinning
processes first, to see what a box shared with other jobs does to each.

Usage::

    python benchmarks/bench_threads.py              # as the machine is
    python benchmarks/bench_threads.py --busy 2     # with two CPU hogs beside it
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable


def _spin() -> None:
    while True:
        pass


def _best(f: Callable[[], object], n: int) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--busy", type=int, default=0, help="spinning processes beside it")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    a = ap.parse_args()
    import torch

    from mwakit.execute import all_finite
    from mwakit.methods import ties

    hogs = [mp.Process(target=_spin, daemon=True) for _ in range(a.busy)]
    for h in hogs:
        h.start()
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64 << 20, generator=g)
        parts = [torch.randn(16 << 20, generator=g).to(torch.bfloat16) for _ in range(5)]
        base = torch.randn(2048, 5632, generator=g).to(torch.bfloat16)
        fts = [(base.float() + 0.01 * torch.randn(2048, 5632, generator=g)).to(torch.bfloat16)
               for _ in range(5)]  # fmt: skip
        params = ties.Params(density=0.2)

        def linear() -> object:
            acc = torch.zeros(16 << 20)
            for p in parts:
                acc.add_(p, alpha=0.2)
            return acc.to(torch.bfloat16)

        kernels: dict[str, Callable[[], object]] = {
            "isfinite(x).all()": lambda: bool(torch.isfinite(x).all()),
            "all_finite (sum)": lambda: all_finite(x),
            "linear 5× bf16": linear,
            "cast to bf16": lambda: x.to(torch.bfloat16),
            "ties 5× 2048×5632": lambda: ties.merge(fts, [0.2] * 5, params, base=base),
        }
        load = os.getloadavg()[0]
        print(f"{os.cpu_count()} CPUs, load {load:.1f}, {a.busy} spinning beside; best of "
              f"{a.repeat}")  # fmt: skip
        print(f"{'kernel':22}" + "".join(f"{f'{n} thr s':>10}" for n in a.threads))
        for name, f in kernels.items():
            cells = []
            for n in a.threads:
                torch.set_num_threads(n)
                cells.append(_best(f, a.repeat))
            print(f"{name:22}" + "".join(f"{c:10.3f}" for c in cells), flush=True)
    finally:
        for h in hogs:
            h.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
