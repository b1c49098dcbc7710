"""io.hashing: digests streamed from the reader's reads equal sha256 of the whole file."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mwakit.errors import SourceError
from mwakit.io.hashing import StreamHasher
from mwakit.io.header import read_header
from mwakit.io.reader import PreadReader


def _file(tmp: Path, n: int = 6, name: str = "x.safetensors") -> Path:
    g = torch.Generator().manual_seed(n)
    ts = {f"t{i}": torch.randn(50 + 13 * i, 7, generator=g) for i in range(n)}
    path = tmp / name
    save_file(ts, path)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _infos(path: Path) -> list:  # type: ignore[type-arg]
    return sorted(read_header(path).tensors.values(), key=lambda i: i.start)


@pytest.mark.parametrize("order", ["file", "reverse", "odd-then-even", "some", "none"])
def test_digest_is_sha256_whatever_the_read_order(tmp_path: Path, order: str) -> None:
    path = _file(tmp_path)
    infos = _infos(path)
    picks = {
        "file": infos,
        "reverse": infos[::-1],
        "odd-then-even": infos[1::2] + infos[0::2],
        "some": infos[1:3] + infos[4:5],  # tensors never read are hashed by finish
        "none": [],
    }[order]
    h = StreamHasher([path])
    with PreadReader(readahead=0, observer=h.observe) as r:
        for info in picks:
            r.get(info, path)
        r.get(picks[0], path) if picks else None  # a second read of a tensor is ignored
    assert h.finish() == {path: _sha(path)}


@pytest.mark.parametrize("max_pending", [1, 1 << 20])  # 1: every read waits for the hashing
def test_read_ahead_thread_and_main_thread_feed_one_digest(
    tmp_path: Path, max_pending: int
) -> None:
    path = _file(tmp_path, n=12)
    infos = _infos(path)
    h = StreamHasher([path], max_pending=max_pending)
    with PreadReader(observer=h.observe) as r:
        for a, b in zip(infos[0::2], infos[1::2], strict=True):
            r.prefetch(path, [b])  # b is read on the helper thread while a is read here
            r.get(a, path)
            r.get(b, path)
    assert h.finish()[path] == _sha(path)


def test_concurrent_observers_on_one_file(tmp_path: Path) -> None:
    path = _file(tmp_path, n=16)
    infos = _infos(path)
    h = StreamHasher([path])
    readers = [PreadReader(readahead=0, observer=h.observe) for _ in range(2)]

    def work(r: PreadReader, part: list) -> None:  # type: ignore[type-arg]
        for info in part:
            r.get(info, path)

    ts = [threading.Thread(target=work, args=(readers[k], infos[k::2])) for k in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for r in readers:
        r.close()
    assert h.finish()[path] == _sha(path)


def test_other_files_are_ignored_and_links_match(tmp_path: Path) -> None:
    a, b = _file(tmp_path, 3, "a.safetensors"), _file(tmp_path, 4, "b.safetensors")
    link = tmp_path / "link.safetensors"
    link.symlink_to(a)
    h = StreamHasher([a])
    with PreadReader(readahead=0, observer=h.observe) as r:
        for info in _infos(b):
            r.get(info, b)
        for info in _infos(a)[:2]:
            r.get(info, link)  # the same file under another name feeds its digest
    assert h.finish() == {a: _sha(a)}


def test_close_after_a_failed_merge_stops_the_thread(tmp_path: Path) -> None:
    path = _file(tmp_path)
    h = StreamHasher([path])
    with PreadReader(readahead=0, observer=h.observe) as r:
        r.get(_infos(path)[2], path)
    h.close()
    assert h._threads == []
    assert not [t for t in threading.enumerate() if t.name == "mwakit-hash"]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_helper_threads_hash_each_file_in_order(tmp_path: Path, threads: int) -> None:
    # Reads of several files interleaved, as a merge reads one module from every checkpoint:
    # threads take different files at once, each file's reads in order (a read out of order
    # would be a second read of the file, not a wrong digest, so count the file's reads).
    paths = [_file(tmp_path, n, f"f{n}.safetensors") for n in (5, 7, 9)]
    h = StreamHasher(paths, threads=threads, max_pending=1 << 12)
    reads = []
    real = h._hash_range
    h._hash_range = lambda run, stop: (reads.append(stop), real(run, stop))[1]  # type: ignore[method-assign]
    with PreadReader(readahead=0, observer=h.observe) as r:
        for k in range(9):
            for p in paths:
                infos = _infos(p)
                if k < len(infos):
                    r.get(infos[k], p)
    assert h.finish() == {p: _sha(p) for p in paths}
    # Only the headers (one gap each, before the first tensor) and the ends were read again.
    assert len([s for s in reads if s is not None]) == len(paths)


def test_a_file_changed_between_reads_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path)
    infos = _infos(path)
    h = StreamHasher([path])
    with PreadReader(readahead=0, observer=h.observe) as r:
        r.get(infos[0], path)
    with path.open("ab") as f:
        f.write(b"appended")
    os.utime(path, ns=(5, 5))
    with pytest.raises(SourceError, match="changed while being read"):
        h.finish()
