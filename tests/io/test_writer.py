"""io.writer: a header-first streaming writer whose files safetensors reads bit-exactly."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mwakit.errors import OutputError
from mwakit.io.filelayout import planned_size
from mwakit.io.header import DTYPE_SIZES, dtype_code, read_header
from mwakit.io.writer import Entry, StreamingWriter

from .samples import ALL_DTYPES, as_bytes, one_of_each, random_tensor


def _entries(ts: dict[str, torch.Tensor]) -> list[Entry]:
    return [(k, dtype_code(str(v.dtype)), tuple(v.shape)) for k, v in ts.items()]


def _tensors() -> dict[str, torch.Tensor]:
    ts = one_of_each((3, 7))
    ts["scalar"] = torch.tensor(-1.25, dtype=torch.bfloat16)
    ts["empty"] = torch.zeros(0, 4)
    ts["z.odd"] = random_tensor(torch.int8, (3,), 50)  # odd sizes push later tensors off 8 bytes
    return ts


def _assert_loads_exactly(path: Path, ts: dict[str, torch.Tensor]) -> None:
    with safe_open(path, "pt") as f:
        assert set(f.keys()) == set(ts)
        for k, v in ts.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape, k
            assert torch.equal(as_bytes(got), as_bytes(v)), k


@pytest.mark.parametrize("order", ["plan", "reversed", "shuffled"])
def test_any_write_order_loads_bit_exactly(tmp_path: Path, order: str) -> None:
    ts = _tensors()
    names = list(ts)
    if order == "reversed":
        names.reverse()
    elif order == "shuffled":
        random.Random(7).shuffle(names)
    path = tmp_path / "out.safetensors"
    with StreamingWriter(path, _entries(ts), {"merge": "linear"}) as w:
        for k in names:
            w.write(k, ts[k])
    _assert_loads_exactly(path, ts)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "merge": "linear"}
    assert path.stat().st_size == planned_size(_entries(ts), {"merge": "linear"})


def test_byte_identical_to_official_writer(tmp_path: Path) -> None:
    ts = _tensors()
    ref = tmp_path / "ref.safetensors"
    save_file(ts, ref, metadata={"format": "pt"})
    ours = tmp_path / "ours.safetensors"
    with StreamingWriter(ours, _entries(ts), None) as w:
        for k in reversed(list(ts)):
            w.write(k, ts[k])
    assert ours.read_bytes() == ref.read_bytes()


def test_layout_is_alignment_then_name(tmp_path: Path) -> None:
    ts = _tensors()
    path = tmp_path / "out.safetensors"
    with StreamingWriter(path, _entries(ts)) as w:
        for k, v in ts.items():
            w.write(k, v)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0 and raw[8 + n - 1 : 8 + n] in (b"}", b" ")
    h = read_header(path)
    sizes = [DTYPE_SIZES[i.dtype] for i in h.tensors.values()]  # in file offset order
    assert sizes == sorted(sizes, reverse=True), "alignment descending"
    for a, b in zip(list(h.tensors.values()), list(h.tensors.values())[1:], strict=False):
        if a.dtype == b.dtype:
            assert a.name < b.name, "then by name"
    for info in h.tensors.values():
        assert info.start % DTYPE_SIZES[info.dtype] == 0, "every tensor aligned for its dtype"


def test_metadata(tmp_path: Path) -> None:
    ts = {"a": torch.ones(2)}
    for given_meta, expected in [
        (None, {"format": "pt"}),
        ({}, {"format": "pt"}),
        ({"format": "np", "x": "1"}, {"format": "np", "x": "1"}),  # a given format is kept
    ]:
        path = tmp_path / "m.safetensors"
        with StreamingWriter(path, _entries(ts), given_meta) as w:
            w.write("a", ts["a"])
        assert read_header(path).metadata == expected


def test_awkward_inputs_are_written_correctly(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    ts = {
        "transposed": base.t(),  # non-contiguous
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),  # stride 0
        "grad": torch.ones(2, 2, requires_grad=True) * 3,  # part of an autograd graph
        "slice": base[:, 1],
    }
    path = tmp_path / "a.safetensors"
    with StreamingWriter(path, _entries(ts)) as w:
        for k, v in ts.items():
            w.write(k, v)
    _assert_loads_exactly(path, {k: v.detach() for k, v in ts.items()})


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    with StreamingWriter(path, []):
        pass
    assert load_file(path) == {}
    assert path.stat().st_size == planned_size([])


def _writer(tmp_path: Path) -> StreamingWriter:
    return StreamingWriter(
        tmp_path / "w.safetensors",
        [("a", "F32", (2, 3)), ("b", "BF16", (4,)), ("c", "I64", ())],
    )


def test_write_errors(tmp_path: Path) -> None:
    w = _writer(tmp_path)
    with pytest.raises(OutputError, match=r"is torch\.float16 .* planned float32"):
        w.write("a", torch.ones(2, 3, dtype=torch.float16))
    with pytest.raises(OutputError, match=r"\[3, 2\], planned float32 \[2, 3\]"):
        w.write("a", torch.ones(3, 2))
    with pytest.raises(OutputError, match="not in the planned layout"):
        w.write("zzz", torch.ones(1))
    w.write("a", torch.ones(2, 3))
    with pytest.raises(OutputError, match="written twice") as exc:
        w.write("a", torch.ones(2, 3))
    assert exc.value.where == str(tmp_path / "w.safetensors")
    with pytest.raises(OutputError, match=r"2 planned tensor\(s\) never written, e\.g\. b, c"):
        w.close()
    w.close()  # idempotent once closed
    with pytest.raises(OutputError, match="after close"):
        w.write("b", torch.ones(4, dtype=torch.bfloat16))


def test_missing_list_is_capped(tmp_path: Path) -> None:
    w = StreamingWriter(tmp_path / "w.safetensors", [(f"t{i}", "F32", (1,)) for i in range(8)])
    with pytest.raises(OutputError, match="t0, t1, t2, t3, t4 and 3 more"):
        w.close()


def test_exception_inside_with_is_not_masked(tmp_path: Path) -> None:
    # The caller's error matters, not the "never written" one that would follow from it.
    with pytest.raises(RuntimeError, match="boom"), _writer(tmp_path) as w:
        w.write("a", torch.ones(2, 3))
        raise RuntimeError("boom")


@pytest.mark.parametrize(
    ("entries", "metadata", "needle"),
    [
        ([("a", "F32", (1,)), ("a", "F16", (2,))], None, "planned twice"),
        ([("a", "C64", (1,))], None, "unknown dtype code"),
        ([("a", "F32", (-1,))], None, "invalid shape"),
        ([("__metadata__", "F32", (1,))], None, "__metadata__"),
        ([("a", "F32", (1,))], {"n": 1}, "must be strings"),
    ],
)
def test_bad_plans_fail_before_the_file_exists(
    tmp_path: Path, entries: list[Entry], metadata: dict[str, str] | None, needle: str
) -> None:
    path = tmp_path / "w.safetensors"
    with pytest.raises(OutputError, match=needle):
        StreamingWriter(path, entries, metadata)
    assert not path.exists()
    with pytest.raises(OutputError, match=needle):
        planned_size(entries, metadata)


def test_unwritable_path(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="cannot write") as exc:
        StreamingWriter(tmp_path / "no" / "such" / "w.safetensors", [("a", "F32", (1,))])
    assert "no/such" in (exc.value.where or "")


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    specs=st.lists(
        st.tuples(
            st.sampled_from(ALL_DTYPES),
            st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=3),
        ),
        min_size=1,
        max_size=8,
    ),
    seed=st.integers(min_value=0, max_value=2**16),
    rnd=st.randoms(use_true_random=False),
)
def test_round_trip_property(
    tmp_path: Path,
    specs: list[tuple[torch.dtype, list[int]]],
    seed: int,
    rnd: random.Random,
) -> None:
    ts = {f"t{i}": random_tensor(d, tuple(s), seed + i) for i, (d, s) in enumerate(specs)}
    path = tmp_path / "p.safetensors"
    names = list(ts)
    rnd.shuffle(names)
    with StreamingWriter(path, _entries(ts), {"seed": str(seed)}) as w:
        for k in names:
            w.write(k, ts[k])
    _assert_loads_exactly(path, ts)
    h = read_header(path)
    assert h.metadata == {"format": "pt", "seed": str(seed)}
    assert path.stat().st_size == planned_size(_entries(ts), {"seed": str(seed)})
    assert json.loads(path.read_bytes()[8 : h.data_start])["__metadata__"]["seed"] == str(seed)
    ref = tmp_path / "ref.safetensors"
    save_file({k: v.contiguous() for k, v in ts.items()}, ref, metadata={"format": "pt"})
    ours = tmp_path / "ours.safetensors"
    with StreamingWriter(ours, _entries(ts)) as w:
        for k in names:
            w.write(k, ts[k])
    assert ours.read_bytes() == ref.read_bytes(), "byte-identical to the official writer"


def _big_tensors() -> dict[str, torch.Tensor]:
    # Tensors of many 4 KiB blocks at unaligned offsets (odd sizes between them), tiny ones
    # that share a block with their neighbours, and a file whose size is no block multiple.
    g = torch.Generator().manual_seed(3)
    return {
        "a.big": torch.randn(300_001, generator=g),
        "b.bf16": torch.randn(123_457, generator=g).to(torch.bfloat16),
        "c.tiny": torch.randn(3, generator=g),
        "d.odd": torch.randint(-100, 100, (4097,), dtype=torch.int8, generator=g),
        "e.half": torch.randn(77, 1031, generator=g).to(torch.float16),
        "f.one": torch.tensor([7], dtype=torch.int64),
    }


@pytest.mark.parametrize("direct", [None, False])
@pytest.mark.parametrize("synced", [False, True])
@pytest.mark.parametrize("from_buffer", [False, True])
def test_large_tensors_byte_identical_direct_or_buffered(
    tmp_path: Path, direct: bool | None, synced: bool, from_buffer: bool
) -> None:
    from mwakit.io.durable import BackgroundSync

    ts = _big_tensors()
    names = list(ts)
    random.Random(5).shuffle(names)
    ours = tmp_path / "ours.safetensors"
    with BackgroundSync() as s:
        w = StreamingWriter(ours, _entries(ts), None, s if synced else None, direct=direct)
        with w:
            for k in names:
                t = ts[k]
                if from_buffer:
                    t = w.buffer(k).copy_(t)
                w.write(k, t)
    ref = tmp_path / "ref.safetensors"
    save_file(ts, ref, metadata={"format": "pt"})
    assert ours.read_bytes() == ref.read_bytes()


def test_a_buffer_is_written_from_where_it_lies(tmp_path: Path) -> None:
    ts = _big_tensors()
    with StreamingWriter(tmp_path / "o.safetensors", _entries(ts)) as w:
        if not w._direct:
            pytest.skip("this file system has no direct I/O")
        for k, t in ts.items():
            buf = w.buffer(k).copy_(t)
            fresh = w._arena.fresh_bytes
            w.write(k, buf)
            assert w._arena.fresh_bytes == fresh, f"{k}: copied into a staging buffer"
    assert load_file(tmp_path / "o.safetensors").keys() == ts.keys()


def test_a_file_system_refusing_direct_writes_gets_buffered_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import fcntl
    import os

    real = os.pwrite
    refused: list[int] = []

    def pwrite(fd: int, data: object, pos: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, pos)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "pwrite", pwrite)
    ts = _big_tensors()
    path = tmp_path / "o.safetensors"
    with StreamingWriter(path, _entries(ts)) as w:
        for k, t in ts.items():
            w.write(k, t)
    if not getattr(os, "O_DIRECT", 0):
        pytest.skip("no direct I/O here")
    assert len(refused) == 1  # refused once, then buffered for good
    _assert_loads_exactly(path, ts)
