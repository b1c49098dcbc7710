"""io.header: header-only reads that agree with safetensors and refuse what it refuses."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from mwakit.errors import SourceError
from mwakit.io.header import (
    DTYPE_NAMES,
    DTYPE_SIZES,
    MAX_HEADER,
    dtype_code,
    is_float_code,
    read_header,
)

from .samples import ALL_DTYPES, one_of_each


def _sample(tmp: Path, metadata: dict[str, str] | None = None) -> Path:
    ts = one_of_each((3, 5))
    ts["scalar"] = torch.tensor(2.5)
    ts["empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    ts["vec"] = torch.arange(7, dtype=torch.int32)
    path = tmp / "x.safetensors"
    save_file(ts, path, metadata=metadata)
    return path


def _craft(path: Path, doc: dict[str, Any], data: bytes, pad: bool = True) -> Path:
    raw = json.dumps(doc).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_dtype_tables_agree_with_torch() -> None:
    assert set(DTYPE_NAMES) == set(DTYPE_SIZES)
    for code, name in DTYPE_NAMES.items():
        dt = getattr(torch, name)
        assert torch.empty((), dtype=dt).element_size() == DTYPE_SIZES[code]
        assert dtype_code(name) == code
        assert dtype_code(str(dt)) == code  # "torch.bfloat16" works too
        assert is_float_code(code) == dt.is_floating_point
    with pytest.raises(KeyError):
        dtype_code("complex64")


def test_header_matches_safe_open(tmp_path: Path) -> None:
    path = _sample(tmp_path, {"format": "pt", "k": "v"})
    h = read_header(path)
    assert h.path == path
    assert h.metadata == {"format": "pt", "k": "v"}
    raw = path.read_bytes()
    assert h.data_start == 8 + struct.unpack("<Q", raw[:8])[0]
    with safe_open(path, "pt") as f:
        assert list(h.tensors) == list(f.offset_keys()), "file offset order"
        for k in f.keys():  # noqa: SIM118 - safe_open is not a dict
            info, sl = h.tensors[k], f.get_slice(k)
            assert info.name == k
            assert list(info.shape) == list(sl.get_shape())
            assert info.dtype == sl.get_dtype()
            t = f.get_tensor(k)
            assert info.numel == t.numel()
            assert info.nbytes == t.numel() * t.element_size()
            # Absolute offsets: the bytes there are the tensor's bytes.
            assert raw[info.start : info.end] == t.reshape(-1).view(torch.uint8).numpy().tobytes()


def test_no_metadata_is_none(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(2)}, path)
    assert read_header(path).metadata is None
    assert read_header(path).tensors["a"].shape == (2,)


def test_empty_file_list(tmp_path: Path) -> None:
    path = _craft(tmp_path / "e.safetensors", {"__metadata__": {"format": "pt"}}, b"")
    h = read_header(path)
    assert h.tensors == {} and h.metadata == {"format": "pt"}


def test_header_only_read_ignores_garbage_data(tmp_path: Path) -> None:
    path = _sample(tmp_path)
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    raw[8 + n :] = b"\xff" * (len(raw) - 8 - n)  # garbage data, intact header
    path.write_bytes(bytes(raw))
    assert len(read_header(path).tensors) == len(ALL_DTYPES) + 3


def test_header_only_read_of_huge_sparse_file(tmp_path: Path) -> None:
    # 8 GiB of data that was never written: reading it would take seconds and the memory of
    # the test machine; a header-only read is instant.
    size = 2 * 2**30
    path = _craft(
        tmp_path / "big.safetensors",
        {"w": {"dtype": "F32", "shape": [2**30, 2], "data_offsets": [0, size * 4]}},
        b"",
    )
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size + size * 4)
    assert read_header(path).tensors["w"].nbytes == size * 4


def _entry(dtype: Any = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# Each case writes a bad file; every one must fail as one SourceError naming the file.
CORRUPT: list[tuple[str, Callable[[Path], object], str]] = [
    ("empty", lambda p: p.write_bytes(b""), "only 0 bytes"),
    ("five bytes", lambda p: p.write_bytes(b"\x01" * 5), "only 5 bytes"),
    ("over max", lambda p: p.write_bytes(struct.pack("<Q", MAX_HEADER + 1)), "does not fit"),
    ("past eof", lambda p: p.write_bytes(struct.pack("<Q", 64) + b"{}"), "does not fit"),
    ("not json", lambda p: p.write_bytes(struct.pack("<Q", 8) + b"{nope!!}"), "not JSON"),
    ("not utf8", lambda p: p.write_bytes(struct.pack("<Q", 8) + b"\xff" * 8), "not JSON"),
    ("not object", lambda p: _craft(p, [], b""), "not a JSON object"),  # type: ignore[arg-type]
    ("entry list", lambda p: _craft(p, {"a": [1]}, b""), "not an object"),
    ("bad dtype", lambda p: _craft(p, {"a": _entry("F33")}, bytes(8)), "unknown dtype"),
    ("dtype list", lambda p: _craft(p, {"a": _entry(["F32"])}, bytes(8)), "unknown dtype"),
    ("neg shape", lambda p: _craft(p, {"a": _entry(shape=(-1, -2))}, bytes(8)), "shape"),
    ("float shape", lambda p: _craft(p, {"a": _entry(shape=(2.0,))}, bytes(8)), "shape"),
    ("no offsets", lambda p: _craft(p, {"a": {"dtype": "F32", "shape": [2]}}, bytes(8)), "data_"),
    ("str offsets", lambda p: _craft(p, {"a": _entry(offsets=("0", "8"))}, bytes(8)), "data_"),
    ("3 offsets", lambda p: _craft(p, {"a": _entry(offsets=(0, 4, 8))}, bytes(8)), "data_"),
    ("size", lambda p: _craft(p, {"a": _entry(offsets=(0, 12))}, bytes(12)), "do not fit"),
    (
        "hole",
        lambda p: _craft(p, {"a": _entry(offsets=(4, 12))}, bytes(12)),
        "starts at data offset 4, expected 0",
    ),
    (
        "overlap",
        lambda p: _craft(p, {"a": _entry(), "b": _entry(offsets=(4, 12))}, bytes(12)),
        "starts at data offset 4, expected 8",
    ),
    ("truncated", lambda p: _craft(p, {"a": _entry()}, bytes(5)), "past the end"),
    ("trailing", lambda p: _craft(p, {"a": _entry()}, bytes(9)), "1 trailing bytes"),
    (
        "duplicate",
        lambda p: p.write_bytes(
            struct.pack("<Q", 120)
            + (b'{"a":%s,"a":%s}' % ((json.dumps(_entry()).encode(),) * 2)).ljust(120)
            + bytes(8)
        ),
        "names 'a' twice",
    ),
    ("meta list", lambda p: _craft(p, {"__metadata__": ["x"]}, b""), "__metadata__"),
    ("meta int", lambda p: _craft(p, {"__metadata__": {"x": 1}}, b""), "__metadata__"),
]


@pytest.mark.parametrize(
    ("corrupt", "needle"), [c[1:] for c in CORRUPT], ids=[c[0] for c in CORRUPT]
)
def test_corrupt_files_fail_cleanly(
    tmp_path: Path, corrupt: Callable[[Path], object], needle: str
) -> None:
    path = tmp_path / "bad.safetensors"
    corrupt(path)
    with pytest.raises(SourceError, match=needle) as exc:
        read_header(path)
    err = exc.value
    assert err.where == str(path)
    assert err.fix
    assert "\n" not in err.message, "one line"
    if needle == "names 'a' twice":
        # The one deliberate difference: safe_open keeps the last of two equal keys when the
        # result still tiles the data; the format forbids duplicates, and we refuse them.
        return
    # What we refuse, the official loader refuses too: no valid file is rejected.
    with pytest.raises(Exception), safe_open(path, "pt"):  # noqa: B017 - any error will do
        pass


def test_truncated_real_file(tmp_path: Path) -> None:
    path = _sample(tmp_path)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(SourceError, match="truncated") as exc:
        read_header(path)
    assert str(path) in exc.value.message


def test_missing_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot read") as exc:
        read_header(tmp_path / "nope.safetensors")
    assert exc.value.where == str(tmp_path / "nope.safetensors")
    with pytest.raises(SourceError, match="cannot read"):
        read_header(tmp_path)  # a folder


@settings(max_examples=150, deadline=None, database=None)
@given(data=st.binary(max_size=64))
def test_arbitrary_bytes_never_crash(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    path.write_bytes(data)
    try:
        read_header(path)
    except SourceError as err:
        assert err.where == str(path)


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(pos=st.integers(min_value=0), byte=st.integers(min_value=0, max_value=255))
def test_mutated_headers_agree_with_safe_open(tmp_path: Path, pos: int, byte: int) -> None:
    src = tmp_path / "src.safetensors"
    if not src.exists():
        save_file(
            {"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)},
            src,
            metadata={"format": "pt"},
        )
    raw = bytearray(src.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    raw[pos % (8 + n)] = byte  # one changed byte in the length or the JSON
    path = tmp_path / "m.safetensors"
    path.write_bytes(bytes(raw))
    try:
        h = read_header(path)
    except SourceError:
        return
    # Whatever we accept, the official loader accepts, with the same entries.
    with safe_open(path, "pt") as f:
        assert set(h.tensors) == set(f.keys())
        for k, info in h.tensors.items():
            assert info.dtype == f.get_slice(k).get_dtype()
            assert list(info.shape) == list(f.get_slice(k).get_shape())


def test_read_header_never_touches_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _sample(tmp_path)
    h_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    reads: list[int] = []
    real_open = Path.open

    def spy(self: Path, *args: Any, **kwargs: Any) -> Any:
        f = real_open(self, *args, **kwargs)
        real_read = f.read

        def read(n: int = -1) -> bytes:
            reads.append(n)
            return real_read(n)

        f.read = read
        return f

    monkeypatch.setattr(Path, "open", spy)
    read_header(path)
    assert reads == [8, h_len], "exactly the length prefix and the JSON header"
    assert os.path.getsize(path) > 8 + h_len


def test_remembered_headers_parse_once_while_the_file_is_unchanged(tmp_path: Path) -> None:
    from mwakit.io import header as H

    path = _sample(tmp_path)
    parsed: list[Path] = []
    orig = H._parse

    def counting(p: Path) -> H.FileHeader:
        parsed.append(p)
        return orig(p)

    memo: H.HeaderMemo = {}
    H._parse = counting  # type: ignore[assignment]
    try:
        first = read_header(path)  # outside the block: always parsed, nothing kept
        with H.remembered_headers(memo):
            a = read_header(path)
            b = read_header(path)
        assert len(parsed) == 2 and a is b and a == first
        assert read_header(path) is not a, "outside the block nothing is remembered"
        # Touched (same bytes): parsed again; replaced by another layout: the new header.
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        with H.remembered_headers(memo):
            c = read_header(path)
            save_file({"only": torch.zeros(3)}, path)
            d = read_header(path)
            path.unlink()
            with pytest.raises(SourceError, match="cannot read"):
                read_header(path)
    finally:
        H._parse = orig  # type: ignore[assignment]
    assert c is not a and c == a
    assert list(d.tensors) == ["only"]
    assert len(parsed) == 6
