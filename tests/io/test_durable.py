"""io.durable: output files are flushed in the background, errors surface at join."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from mwakit.errors import OutputError
from mwakit.io import durable
from mwakit.io.durable import BackgroundSync
from mwakit.io.writer import StreamingWriter


def test_writer_hands_its_descriptor_over_and_every_file_is_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    kicked: list[int] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    monkeypatch.setattr(os, "fdatasync", lambda fd: (kicked.append(fd), real_fdatasync(fd))[1])
    monkeypatch.setattr("mwakit.io.writer.KICK_BYTES", 1000)  # ask for writeback often
    ts = {f"t{i}": torch.full((300,), float(i)) for i in range(4)}  # 1200 bytes each
    entries = [(k, "F32", (300,)) for k in ts]
    with BackgroundSync() as s:
        # Buffered: the page cache is flushed as the file grows (a direct write has no
        # dirty pages to flush).
        w = StreamingWriter(tmp_path / "a.safetensors", entries, None, s, direct=False)
        for k, t in ts.items():
            w.write(k, t)
        w.close()
        s.join()
    assert len(synced) == 1 and kicked  # coalesced: at most one request queued per file
    # The syncer closed the descriptor: it is no longer open.
    with pytest.raises(OSError):
        os.fstat(synced[0])
    from safetensors.torch import load_file

    got = load_file(tmp_path / "a.safetensors")
    assert all(torch.equal(got[k], t) for k, t in ts.items())


def test_a_failed_flush_is_an_output_error_at_join(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    s = BackgroundSync()
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    s.close(fd, tmp_path / "f")
    with pytest.raises(OutputError, match="cannot write"):
        s.join()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed even though the flush failed


def test_a_discarded_file_is_closed_without_a_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: pytest.fail("a discarded file was synced"))
    with pytest.raises(RuntimeError), BackgroundSync() as s:
        w = StreamingWriter(tmp_path / "a.safetensors", [("t", "F32", (3,))], None, s)
        with w:
            raise RuntimeError("merge failed")
    assert durable.KICK_BYTES > 0


def test_direct_writes_run_on_the_syncer_thread_before_the_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    events: list[tuple[str, str]] = []
    real_pwrite, real_fsync = os.pwrite, os.fsync

    def pwrite(fd: int, data: object, pos: int) -> int:
        events.append(("write", threading.current_thread().name))
        return real_pwrite(fd, data, pos)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", "")), real_fsync(fd))[1])
    ts = {f"t{i}": torch.randn(3000 + i) for i in range(4)}  # several 4 KiB blocks each
    with BackgroundSync() as s:
        entries = [(k, "F32", tuple(t.shape)) for k, t in ts.items()]
        w = StreamingWriter(tmp_path / "a.safetensors", entries, None, s)
        for k, t in ts.items():
            w.write(k, t)
        w.close()
    writes = [e for e in events if e[0] == "write"]
    assert writes and all(name.startswith("mwakit-sync") for _, name in writes)
    assert events[-1][0] == "fsync"  # after every write of the file
    from safetensors.torch import load_file

    got = load_file(tmp_path / "a.safetensors")
    assert all(torch.equal(got[k], t) for k, t in ts.items())
