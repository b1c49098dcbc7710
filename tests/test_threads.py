"""threads: a merge computes with one torch thread unless MWAKIT_THREADS says otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mwakit.errors import UsageError
from mwakit.threads import merge_thread_policy, merge_threads


@pytest.mark.parametrize(("env", "want"), [(None, 1), ("1", 1), ("3", 3), ("auto", None)])
def test_thread_count_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, env: str | None, want: int | None
) -> None:
    if env is None:
        monkeypatch.delenv("MWAKIT_THREADS", raising=False)
    else:
        monkeypatch.setenv("MWAKIT_THREADS", env)
    assert merge_threads() == want


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5"])
def test_a_bad_thread_count_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("MWAKIT_THREADS", bad)
    with pytest.raises(UsageError, match="MWAKIT_THREADS"):
        merge_threads()


def test_policy_is_restored_after_the_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MWAKIT_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with merge_thread_policy() as n:
            assert n == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_merge_runs_with_one_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mwakit import execute as ex

    seen: list[int] = []
    real = ex.run_tasks

    def spy(*a: object, **kw: object) -> None:
        seen.append(torch.get_num_threads())
        real(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ex, "run_tasks", spy)
    monkeypatch.delenv("MWAKIT_THREADS", raising=False)
    from .test_execute import _recipe, write_adapter

    folders = [tmp_path / f"c{i}" for i in range(2)]
    for i, f in enumerate(folders):
        write_adapter(f, modules=2, seed=i)
    import mwakit

    # In delta space (a factor average runs in NumPy, without torch).
    mwakit.run(_recipe(tmp_path, folders, method="linear", lora_space="delta", delta_rank=4))
    assert seen == [1]


@pytest.mark.parametrize("name", ["MWAKIT_BLOCK_WORKERS", "MWAKIT_PROCESSES"])
def test_worker_counts_from_the_environment(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    from mwakit.threads import block_workers, merge_processes

    count = {"MWAKIT_BLOCK_WORKERS": block_workers, "MWAKIT_PROCESSES": merge_processes}[name]
    monkeypatch.setenv(name, "3")
    assert count() == 3
    monkeypatch.delenv(name)
    assert 1 <= count() <= 4  # the usable cores, at most 4
    monkeypatch.setenv(name, "0")
    with pytest.raises(UsageError, match=name):
        count()
