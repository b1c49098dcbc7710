"""executors.pool: dense LoRA tasks in worker processes write the very bytes of one process."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import mwakit
from mwakit.errors import TensorError, UsageError
from mwakit.executors import pool
from mwakit.recipe import parse_recipe

from ..conftest import shaped_adapter

SHAPES = {"q_proj": (96, 64), "k_proj": (96, 32), "v_proj": (96, 48)}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("pool")
    return [shaped_adapter(root / f"c{i}", i, SHAPES, layers=2) for i in range(3)]


def _recipe(folders: list[Path], out: Path, **kw: Any) -> mwakit.recipe.Recipe:
    return parse_recipe(
        {
            "checkpoints": [str(f) for f in folders],
            "output": {"path": str(out), "overwrite": True},
            "lora_space": "delta",
            "delta_rank": 4,
            **kw,
        }
    )


@pytest.mark.parametrize(
    ("method", "params", "rank"),
    [
        ("ties", {"density": 0.3}, 4),
        ("dare_ties", {"drop_rate": 0.5, "seed": 7}, 4),
        # Whole-model thresholds (a pre-pass here, dense ΔW there) and exact full-rank factors.
        ("ties", {"density": 0.3, "trim_scope": "model"}, "full"),
    ],
)
def test_workers_write_the_bytes_of_one_process(
    adapters: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    params: dict[str, Any],
    rank: int | str,
) -> None:
    monkeypatch.setattr(pool, "POOL_MIN", 0)  # these tiny modules are worth a pool now
    runs = {}
    for n in ("1", "2"):
        monkeypatch.setenv("MWAKIT_PROCESSES", n)
        out = tmp_path / f"out-{n}"
        rec = _recipe(adapters, out, method=method, params=params, delta_rank=rank)
        assert pool.wanted(mwakit.plan(rec), "cpu") == (0 if n == "1" else 2)
        res = mwakit.run(rec)
        runs[n] = ((out / "adapter_model.safetensors").read_bytes(), res.stats)
    (one, s1), (two, s2) = runs["1"], runs["2"]
    assert one == two
    assert s1.rel_errors == s2.rel_errors and len(s2.rel_errors) == 6
    assert s1.solvers == s2.solvers and s2.refactor_seconds > 0
    assert len(s2.solvers) == (0 if rank == "full" else 6)


def test_a_non_finite_input_is_named_and_nothing_is_written(
    adapters: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool, "POOL_MIN", 0)
    monkeypatch.setenv("MWAKIT_PROCESSES", "2")
    bad = tmp_path / "bad"
    shaped_adapter(bad, 9, SHAPES, layers=2)
    ts = load_file(bad / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"
    ts[key][3, 1] = math.nan
    save_file(ts, bad / "adapter_model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(TensorError) as err:
        mwakit.run(_recipe([*adapters, bad], out, method="ties"))
    assert "NaN" in err.value.message and key in str(err.value.where)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_what_is_worth_a_pool(
    adapters: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MWAKIT_PROCESSES", "3")
    ties = mwakit.plan(_recipe(adapters, tmp_path / "o", method="ties"))
    # Two layers of 64·96 + 32·96 + 48·96 ΔW elements, three checkpoints each.
    assert pool.dense_work(ties) == 2 * 96 * (64 + 32 + 48) * 3
    assert pool.wanted(ties, "cpu") == 0  # far below POOL_MIN
    monkeypatch.setattr(pool, "POOL_MIN", pool.dense_work(ties))
    assert pool.wanted(ties, "cpu") == 3
    assert pool.wanted(ties, "cuda") == 0  # the GPU is the parallelism there
    linear = mwakit.plan(_recipe(adapters, tmp_path / "o", method="linear"))
    assert pool.dense_work(linear) == 0  # QR + small SVD of the factors: nothing dense
    monkeypatch.setenv("MWAKIT_PROCESSES", "1")
    assert pool.wanted(ties, "cpu") == 0


def test_a_bad_process_count_is_refused_before_anything_is_written(
    adapters: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MWAKIT_PROCESSES", "many")
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="MWAKIT_PROCESSES"):
        mwakit.run(_recipe(adapters, out, method="ties"))
    assert not out.exists()


def test_sent_copies_are_compact() -> None:
    whole = torch.arange(12.0).reshape(3, 4)
    (view,) = pool.copied([whole[1:, ::2]])
    assert view.is_contiguous() and view.untyped_storage().nbytes() == 4 * 4
    assert torch.equal(view, whole[1:, ::2])


CHILD = """
import sys
from mwakit.executors import pool
pool.POOL_MIN = 0
init = pool.DensePool.__init__
def started(self, count, threads):
    init(self, count, threads)
    print(" ".join(str(p.pid) for p in self._pool._pool), flush=True)
pool.DensePool.__init__ = started
import mwakit
mwakit.run(sys.argv[1])
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux only (prctl)")
def test_workers_die_with_a_killed_merge(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    # Two modules of 16384×8192 ΔW per adapter: seconds of work each, on 0.5 MB of factors.
    big = {"q_proj": (8192, 16384), "v_proj": (8192, 16384)}
    folders = [shaped_adapter(tmp_path / f"c{i}", i, big) for i in range(4)]
    rec = tmp_path / "r.yaml"
    rec.write_text(
        yaml.safe_dump(
            {
                "method": "ties",
                "checkpoints": [str(f) for f in folders],
                "lora_space": "delta",
                "delta_rank": 4,
                "output": {"path": str(tmp_path / "out")},
            }
        )
    )
    env = {**os.environ, "MWAKIT_PROCESSES": "2"}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(rec)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2

    def stat(pid: int) -> list[str] | None:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            return None

    def cpu_s(pid: int) -> float:
        fields = stat(pid)
        return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / 100  # ticks

    def alive(pid: int) -> bool:
        fields = stat(pid)
        return fields is not None and fields[0] != "Z"  # a zombie is dead, only unreaped

    # Kill the merge while both workers are inside a task (past their ~1.5 s of imports).
    deadline = time.monotonic() + 60
    while min(cpu_s(p) for p in pids) < 2.5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(alive(p) for p in pids)
    proc.send_signal(signal.SIGKILL)  # no unwinding: only the kernel can stop the workers
    proc.wait()
    # Their task has seconds to go: without the parent-death signal they would finish it.
    deadline = time.monotonic() + 0.5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(alive(p) for p in pids)
