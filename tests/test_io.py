"""io: header-only reads, zero-copy mmap views, the streaming writer, atomic output folders."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from mwakit.errors import OutputError, SourceError
from mwakit.io.atomic import atomic_output_dir, check_target
from mwakit.io.header import dtype_code, read_header
from mwakit.io.reader import MmapReader
from mwakit.io.writer import StreamingWriter, planned_size

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int8]


def _sample(tmp: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ts = {
        f"t.{i}.{str(d).split('.')[1]}": (torch.randn(3, 5, generator=g) * 10).to(d)
        for i, d in enumerate(DTYPES)
    }
    ts["scalar"] = torch.tensor(2.5)
    ts["empty"] = torch.zeros(0, 4)
    path = tmp / "x.safetensors"
    save_file(ts, path, metadata={"format": "pt", "k": "v"})
    return path, ts


def test_header_matches_safe_open(tmp_path: Path) -> None:
    path, _ = _sample(tmp_path)
    h = read_header(path)
    assert h.metadata == {"format": "pt", "k": "v"}
    with safe_open(path, "pt") as f:
        assert set(h.tensors) == set(f.keys())
        for k in f.keys():  # noqa: SIM118 - safe_open is not a dict
            sl = f.get_slice(k)
            assert list(h.tensors[k].shape) == list(sl.get_shape())
            assert h.tensors[k].dtype == sl.get_dtype()
    starts = [i.start for i in h.tensors.values()]
    assert starts == sorted(starts), "tensors are listed in file order"


def test_header_never_reads_tensor_bytes(tmp_path: Path) -> None:
    path, _ = _sample(tmp_path)
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    raw[8 + n :] = b"\xff" * (len(raw) - 8 - n)  # garbage data, intact header
    path.write_bytes(bytes(raw))
    assert len(read_header(path).tensors) == len(DTYPES) + 2


@pytest.mark.parametrize(
    ("corrupt", "needle"),
    [
        (lambda raw: raw[:5], "only 5 bytes"),
        (lambda raw: struct.pack("<Q", 10**9) + raw[8:], "does not fit the file"),
        (lambda raw: raw[:8] + b"#" + raw[9:], "not JSON"),
        (lambda raw: raw[:-4], "past the end"),
    ],
)
def test_corrupt_files_name_the_path(tmp_path: Path, corrupt, needle: str) -> None:  # type: ignore[no-untyped-def]
    path, _ = _sample(tmp_path)
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(SourceError, match=needle) as exc:
        read_header(path)
    assert exc.value.where == str(path)


def test_reader_views_are_exact_and_zero_copy(tmp_path: Path) -> None:
    path, ts = _sample(tmp_path)
    h = read_header(path)
    with MmapReader() as r:
        for k, info in h.tensors.items():
            v = r.get(info, path)
            assert v.dtype == ts[k].dtype and torch.equal(v, ts[k])
        mm = r._maps[path]
        import ctypes

        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        info = h.tensors["t.0.float32"]
        assert r.get(info, path).data_ptr() == base + info.start
        r.prefetch(path, list(h.tensors.values()))
        r.release(path, list(h.tensors.values()))
        # Pages dropped from this process come back from the file, unchanged.
        assert torch.equal(r.get(info, path), ts["t.0.float32"])


def _entries(ts: dict[str, torch.Tensor]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(k, dtype_code(str(t.dtype)), tuple(t.shape)) for k, t in ts.items()]


def test_writer_any_order_loads_bit_exactly(tmp_path: Path) -> None:
    _, ts = _sample(tmp_path)
    out = tmp_path / "out.safetensors"
    with StreamingWriter(out, _entries(ts), {"mwakit_version": "x"}) as w:
        for k in reversed(list(ts)):
            w.write(k, ts[k])
    assert out.stat().st_size == planned_size(_entries(ts), {"mwakit_version": "x"})
    with safe_open(out, "pt") as f:
        assert f.metadata() == {"format": "pt", "mwakit_version": "x"}
        for k in ts:
            assert torch.equal(f.get_tensor(k), ts[k])
    h = read_header(out)
    sizes = [torch.tensor([], dtype=ts[i.name].dtype).element_size() for i in h.tensors.values()]
    assert sizes == sorted(sizes, reverse=True), "alignment-descending layout"
    assert all(i.start % 8 == 0 for i in h.tensors.values() if ts[i.name].element_size() == 8)


def test_writer_errors(tmp_path: Path) -> None:
    ts = {"a": torch.zeros(2, 2), "b": torch.zeros(3)}
    out = tmp_path / "o.safetensors"
    w = StreamingWriter(out, _entries(ts))
    with pytest.raises(OutputError, match="not in the planned layout"):
        w.write("c", torch.zeros(1))
    with pytest.raises(OutputError, match="planned float32 \\[3\\]"):
        w.write("b", torch.zeros(4))
    w.write("a", ts["a"])
    with pytest.raises(OutputError, match="written twice"):
        w.write("a", ts["a"])
    with pytest.raises(OutputError, match=r"never written, e\.g\. b"):
        w.close()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), min_size=0, max_size=3)),
        min_size=1,
        max_size=6,
    ),
    st.randoms(use_true_random=False),
)
def test_writer_round_trip_property(specs, rnd) -> None:  # type: ignore[no-untyped-def]
    import tempfile

    ts = {f"k{i}": (torch.randn(tuple(shape)) * 50).to(d) for i, (d, shape) in enumerate(specs)}
    order = list(ts)
    rnd.shuffle(order)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "o.safetensors"
        with StreamingWriter(out, _entries(ts)) as w:
            for k in order:
                w.write(k, ts[k])
        with safe_open(out, "pt") as f:
            for k, t in ts.items():
                assert torch.equal(f.get_tensor(k), t)
        json.loads(out.read_bytes()[8 : 8 + struct.unpack("<Q", out.read_bytes()[:8])[0]])


def test_atomic_success_and_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out"
    with atomic_output_dir(target, overwrite=False) as tmp:
        assert tmp.parent == target.parent and not target.exists()
        (tmp / "f").write_text("1")
    assert (target / "f").read_text() == "1"
    with pytest.raises(OutputError, match="already exists"):
        check_target(target, overwrite=False)
    with atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "g").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["g"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_failure_leaves_nothing(tmp_path: Path, exc: BaseException) -> None:
    target = tmp_path / "out"
    with pytest.raises(type(exc)), atomic_output_dir(target, overwrite=False) as tmp:
        (tmp / "half").write_text("x")
        raise exc
    assert list(tmp_path.iterdir()) == []


def test_atomic_failure_keeps_previous_output(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("keep")
    with pytest.raises(RuntimeError), atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("x")
        raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (target / "old").read_text() == "keep"


def test_target_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(OutputError, match="not a folder"):
        check_target(f, overwrite=True)
