"""Damaged and changing inputs (issue 8 §4): a bad file is one located error at plan time, and
a file that shrinks or changes while it is read is a clean error — never SIGBUS."""

from __future__ import annotations

import json
import os
import signal
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mwakit
from mwakit.errors import SourceError
from mwakit.io.header import read_header
from mwakit.io.reader import PreadReader

from .harness import assert_clean_failure, invoke, leftovers, snapshot
from .io_fixtures import recipe, run, run_src, spawn, temp_dirs, wait_for

__all__ = ["run", "run_src"]


def _weights(run: Path) -> Path:
    return run / "checkpoint-20" / "adapter_model.safetensors"


def _rewrite(
    path: Path, header: bytes | dict[str, object], data: bytes, n: int | None = None
) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)


def _damage(path: Path, kind: str) -> None:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    doc = json.loads(blob[8 : 8 + n])
    data = blob[8 + n :]
    if kind == "truncated":
        path.write_bytes(blob[: len(blob) - 100])
    elif kind == "tiny":
        path.write_bytes(blob[:3])
    elif kind == "oversized-header":
        _rewrite(path, blob[8 : 8 + n], data, n=200_000_000)
    elif kind == "header-past-end":
        _rewrite(path, blob[8 : 8 + n], data, n=len(blob))
    elif kind == "not-json":
        _rewrite(path, b"{not json" + b" " * (n - 9), data)
    elif kind == "overlap":
        names = [k for k in doc if k != "__metadata__"]
        a, b = sorted(names, key=lambda k: doc[k]["data_offsets"][0])[:2]
        (s0, _), (t0, t1) = doc[a]["data_offsets"], doc[b]["data_offsets"]
        doc[b]["data_offsets"] = [s0, s0 + t1 - t0]  # b starts where a does
        _rewrite(path, doc, data)
    elif kind == "bad-dtype":
        name = next(k for k in doc if k != "__metadata__")
        doc[name]["dtype"] = "F128"
        _rewrite(path, doc, data)
    elif kind == "trailing":
        path.write_bytes(blob + b"\0" * 16)


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("truncated", "truncated"),
        ("tiny", "only 3 bytes long"),
        ("oversized-header", "header length 200000000 does not fit"),
        ("header-past-end", "does not fit the file"),
        ("not-json", "header is not JSON"),
        ("overlap", "expected"),
        ("bad-dtype", "unknown dtype 'F128'"),
        ("trailing", "16 trailing bytes"),
    ],
)
def test_damaged_file_is_one_located_error(
    tmp_path: Path, run: Path, kind: str, needle: str
) -> None:
    _damage(_weights(run), kind)
    out = tmp_path / "out"
    before = snapshot(run)
    res = invoke("run", recipe(tmp_path, out, select={"run": str(run)}))
    assert_clean_failure(res, needle=needle, out=out, before=before, inputs=[run])
    assert str(_weights(run)) in res.stderr


def _big(tmp: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    ts = {f"t{i}": torch.randn(256, 1024) for i in range(4)}  # 1 MiB each: the arena path
    path = tmp / "x.safetensors"
    save_file(ts, path)
    return path, ts


def test_file_shrunk_under_an_open_reader_is_an_error_not_sigbus(tmp_path: Path) -> None:
    path, ts = _big(tmp_path)
    h = read_header(path)
    with PreadReader() as r:
        assert torch.equal(r.get(h.tensors["t0"], path), ts["t0"])
        os.truncate(path, h.tensors["t2"].start + 100)  # what a crashed copy or re-save does
        with pytest.raises(SourceError) as exc:
            r.get(h.tensors["t3"], path)
    assert exc.value.where == str(path)
    assert "changed while mwakit was reading it" in (exc.value.fix or "")


def test_file_changed_under_an_open_reader_is_an_error(tmp_path: Path) -> None:
    path, _ = _big(tmp_path)
    h = read_header(path)
    with PreadReader() as r:
        r.get(h.tensors["t0"], path)
        with path.open("r+b") as f:  # rewritten in place: same size, new mtime
            f.seek(h.tensors["t1"].start)
            f.write(b"\0" * 64)
        os.utime(path, ns=(0, 10**9))
        with pytest.raises(SourceError, match="changed while being read"):
            r.get(h.tensors["t1"], path)


def test_file_shrunk_between_plan_and_merge(tmp_path: Path, run: Path) -> None:
    out = tmp_path / "out"
    target = _weights(run)

    def shrink(plan: object) -> None:
        os.truncate(target, target.stat().st_size // 2)

    with pytest.raises(SourceError) as exc:
        mwakit.run(recipe(tmp_path, out, select={"run": str(run)}), on_plan=shrink)
    assert exc.value.where == str(target) and exc.value.fix
    assert not out.exists() and leftovers(out) == []


def test_input_truncated_while_a_real_merge_reads_it(tmp_path: Path, run: Path) -> None:
    # The SIGBUS: a real process, an input cut short mid-merge.
    out = tmp_path / "out"
    target = _weights(run)
    proc = spawn("run", recipe(tmp_path, out, select={"run": str(run)}))
    wait_for(lambda: bool(temp_dirs(out)), proc, "the merge to start")
    os.truncate(target, 4096)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, (proc.returncode, stderr)
    assert proc.returncode != -signal.SIGBUS
    (line,) = stderr.strip().splitlines()
    assert line.startswith(f"error: {target}:") and "fix:" in line
    assert not out.exists() and temp_dirs(out) == []
