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
import json
import os
import sys
import time
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("/work/cache"), help="cache root")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds (default 0,1,2)")
    ap.add_argument("--train-only", action="store_true", help="build model, data and runs; stop")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    t0 = time.perf_counter()
    train_all(a.cache.resolve(), seeds)
    print(f"training ready after {time.perf_counter() - t0:.0f} s", flush=True)
    if a.train_only:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
