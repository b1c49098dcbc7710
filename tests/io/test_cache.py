"""io.cache: input tensors kept across readers, dropped when their file changes, within budget."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mwakit.io.cache import FileId, InputCache, default_budget
from mwakit.io.header import read_header
from mwakit.io.reader import PreadReader

from .samples import as_bytes, counting_reads, one_of_each, random_tensor


def _sample(tmp: Path, seed: int = 1, name: str = "x.safetensors") -> Path:
    ts = one_of_each((4, 3))
    ts["big"] = random_tensor(torch.float32, (300, 40), seed)
    ts["empty"] = torch.zeros(0, 4)
    path = tmp / name
    save_file(ts, path)
    return path


def _read_all(path: Path, cache: InputCache | None, **kw: object) -> dict[str, torch.Tensor]:
    h = read_header(path)
    with PreadReader(cache=cache, **kw) as r:  # type: ignore[arg-type]
        return {name: r.get(info, path) for name, info in h.tensors.items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(as_bytes(a[k]), as_bytes(b[k])), k


def test_second_reader_reads_nothing_and_gets_the_same_bytes(tmp_path: Path) -> None:
    path = _sample(tmp_path)
    n = len(read_header(path).tensors) - 1  # the empty tensor is never read nor kept
    cache = InputCache(1 << 30)
    first = _read_all(path, cache)
    assert (cache.hits, cache.misses, len(cache)) == (0, n, n)
    held = cache.nbytes
    assert held == sum(i.nbytes for i in read_header(path).tensors.values())

    with counting_reads() as reads:
        second = _read_all(path, cache)
    assert reads == [], "every tensor came from the cache"
    assert (cache.hits, cache.misses, cache.nbytes) == (n, n, held)
    _same(second, first)
    _same(second, load_file(path))


def test_a_changed_file_is_read_again_and_its_old_entries_dropped(tmp_path: Path) -> None:
    path = _sample(tmp_path, seed=1)
    cache = InputCache(1 << 30)
    _read_all(path, cache)
    held = cache.nbytes
    # Same size, other bytes: only mtime (and ctime) tell; set mtime explicitly so the test
    # does not depend on the clock's granularity.
    _sample(tmp_path, seed=2)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    got = _read_all(path, cache)
    _same(got, load_file(path))
    assert cache.nbytes == held, "the old version's bytes were dropped, the new ones kept"
    # A different size (another layout) is another file too.
    save_file({"only": torch.arange(10, dtype=torch.float32)}, path)
    got = _read_all(path, cache)
    _same(got, load_file(path))
    assert cache.nbytes == 40


def test_file_identity_follows_the_real_path(tmp_path: Path) -> None:
    path = _sample(tmp_path)
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    assert FileId.of(link, os.stat(link)) == FileId.of(path, os.stat(path))
    cache = InputCache(1 << 30)
    _read_all(path, cache)
    _same(_read_all(link, cache), load_file(path))
    assert cache.hits == len(cache)


def test_over_budget_tensors_are_read_every_time(tmp_path: Path) -> None:
    path = _sample(tmp_path)
    infos = read_header(path).tensors
    big = infos["big"].nbytes
    cache = InputCache(big - 1)  # everything but "big" fits
    first = _read_all(path, cache)
    assert "big" not in {key[0] for _, key, _ in cache.items()}
    assert cache.nbytes <= cache.budget
    second = _read_all(path, cache)
    _same(second, first)
    _same(second, load_file(path))
    assert cache.hits == len(cache)
    assert cache.misses == len(cache) + 2, "big was read by both readers"
    # budget 0 keeps nothing and reads everything each time
    none = InputCache(0)
    _same(_read_all(path, none), first)
    _same(_read_all(path, none), first)
    assert len(none) == 0 and none.hits == 0


def test_readahead_fills_the_cache_and_the_observer_sees_hits(tmp_path: Path) -> None:
    path = _sample(tmp_path)
    h = read_header(path)
    infos = [i for i in h.tensors.values() if i.numel]
    cache = InputCache(1 << 30)
    with PreadReader(cache=cache) as r:
        r.prefetch(path, infos)
        got = {i.name: r.get(i, path) for i in infos}
    assert len(cache) == len(infos)
    seen: list[tuple[int, bytes]] = []

    def observe(p: Path, offset: int, buf: torch.Tensor) -> None:
        seen.append((offset, bytes(buf.numpy())))

    with PreadReader(cache=cache, observer=observe) as r:
        r.prefetch(path, infos)  # nothing to read ahead: all held
        again = {i.name: r.get(i, path) for i in infos}
    _same(again, got)
    raw = path.read_bytes()
    assert sorted(seen) == sorted((i.start, raw[i.start : i.end]) for i in infos)


def test_bad_budget_and_default() -> None:
    with pytest.raises(ValueError, match="budget"):
        InputCache(-1)
    assert InputCache().budget == default_budget() > 0


def test_derived_memory_is_charged_to_the_budget() -> None:
    cache = InputCache(100)
    assert cache.charge(60) and cache.nbytes == 60
    assert not cache.charge(41) and cache.nbytes == 60
    assert cache.charge(-60) and cache.nbytes == 0
    cache.derived["x"] = object()
    cache.clear()
    assert cache.derived == {}
