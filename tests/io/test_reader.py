"""io.reader: pread tensors equal to safetensors' tensors; pickle loading kept safe."""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mwakit.errors import SourceError
from mwakit.io.header import read_header
from mwakit.io.reader import PreadReader, load_pickle_state_dict, pickle_as_safetensors

from .samples import as_bytes, one_of_each, random_tensor


def _sample(tmp: Path) -> Path:
    ts = one_of_each((4, 3, 5))
    ts["scalar"] = torch.tensor(2.5, dtype=torch.bfloat16)
    ts["empty"] = torch.zeros(0, 4)
    ts["big"] = random_tensor(torch.float32, (300, 40), 99)  # spans several pages
    path = tmp / "x.safetensors"
    save_file(ts, path)
    return path


@pytest.mark.filterwarnings("error")  # no warning from the numpy bridge
def test_views_equal_safetensors_bit_for_bit(tmp_path: Path) -> None:
    path = _sample(tmp_path)
    ref = load_file(path)
    h = read_header(path)
    with PreadReader() as r:
        for name, info in h.tensors.items():
            t = r.get(info, path)
            assert t.dtype == ref[name].dtype
            assert t.shape == ref[name].shape
            assert torch.equal(as_bytes(t), as_bytes(ref[name])), name


def test_tensors_own_their_memory_and_buffers_are_recycled(tmp_path: Path) -> None:
    path = _sample(tmp_path)
    h = read_header(path)
    big = h.tensors["big"]  # 48 KB: below the arena threshold, comes from malloc
    before = path.read_bytes()
    with PreadReader() as r:
        t = r.get(big, path)
        t[0, 0] = 12345.0  # the caller's memory: writes never reach the file
        assert r.get(big, path)[0, 0] != 12345.0, "a second get reads the file again"
    assert path.read_bytes() == before
    # Large reads come from the arena; a buffer is reused only once nothing views it.
    n = 3 << 20
    f = tmp_path / "large.safetensors"
    save_file({"a": torch.arange(n // 4, dtype=torch.float32), "b": torch.ones(n // 4)}, f)
    ha = read_header(f)
    with PreadReader() as r:
        a = r.get(ha.tensors["a"], f)
        b = r.get(ha.tensors["b"], f)
        assert a.data_ptr() != b.data_ptr(), "a is alive: its buffer is not handed out again"
        assert torch.equal(a, torch.arange(n // 4, dtype=torch.float32))
        ptr = a.data_ptr()
        view = a.reshape(-1)[10:]  # a view keeps the buffer busy too
        del a
        r.release(f, [ha.tensors["a"]])
        c = r.get(ha.tensors["b"], f)
        assert c.data_ptr() != ptr
        assert float(view[0]) == 10.0, "the live view still holds its data"
        del view, c
        r.release(f, [ha.tensors["a"]])
        d = r.get(ha.tensors["b"], f)
        assert d.data_ptr() == ptr, "idle buffer recycled: no fresh page faults"
        assert torch.equal(d, torch.ones(n // 4)) and torch.equal(b, torch.ones(n // 4))


def test_empty_and_scalar(tmp_path: Path) -> None:
    path = _sample(tmp_path)
    h = read_header(path)
    with PreadReader() as r:
        e = r.get(h.tensors["empty"], path)
        assert e.shape == (0, 4) and e.dtype == torch.float32
        s = r.get(h.tensors["scalar"], path)
        assert s.shape == () and s.item() == 2.5


def _misaligned(path: Path) -> Path:
    # A hand-made (valid) file whose F32 tensor starts at an odd offset; the official writer
    # never does this, but the format allows it.
    doc = {
        "u": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "f": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]},
    }
    raw = json.dumps(doc).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x07" + struct.pack("<2f", 1.5, -2.0))
    return path


def test_misaligned_data_is_copied_aligned(tmp_path: Path) -> None:
    path = _misaligned(tmp_path / "m.safetensors")
    h = read_header(path)
    assert h.tensors["f"].start % 4 == 1
    with PreadReader() as r:
        f = r.get(h.tensors["f"], path)
        assert f.data_ptr() % 4 == 0
        assert f.tolist() == [1.5, -2.0]
        assert r.get(h.tensors["u"], path).tolist() == [7]
    with safe_open(path, "pt") as sf:
        assert torch.equal(sf.get_tensor("f"), f)


def test_prefetch_and_release_keep_views_valid(tmp_path: Path) -> None:
    path = _sample(tmp_path)
    ref = load_file(path)
    h = read_header(path)
    infos = list(h.tensors.values())
    with PreadReader() as r:
        r.prefetch(path, infos)
        r.prefetch(path, [])
        views = {i.name: r.get(i, path) for i in infos}
        # Releasing lets buffers be recycled, never while a tensor of them is alive.
        r.release(path, infos[:1])
        r.release(path, infos)
        r.release(path, [])
        for name, v in views.items():
            assert torch.equal(as_bytes(v), as_bytes(ref[name]))


def test_tensors_outlive_close(tmp_path: Path) -> None:
    path = _sample(tmp_path)
    h = read_header(path)
    r = PreadReader()
    v = r.get(h.tensors["big"], path)
    expected = load_file(path)["big"]
    r.close()
    r.close()
    assert torch.equal(as_bytes(v), as_bytes(expected))
    fds = Path("/proc/self/fd")
    if fds.exists():  # Linux: no descriptor of the file is left open
        assert all(os.path.realpath(p) != str(path) for p in fds.iterdir())


def test_file_changed_after_header(tmp_path: Path) -> None:
    path = _sample(tmp_path)
    h = read_header(path)
    path.write_bytes(path.read_bytes()[: h.tensors["big"].start + 8])
    with PreadReader() as r, pytest.raises(SourceError, match="past the end") as exc:
        r.get(h.tensors["big"], path)
    assert exc.value.where == str(path)


def test_missing_file(tmp_path: Path) -> None:
    path = _sample(tmp_path)
    info = read_header(path).tensors["big"]
    with PreadReader() as r, pytest.raises(SourceError, match="cannot open") as exc:
        r.get(info, tmp_path / "gone.safetensors")
    assert exc.value.where == str(tmp_path / "gone.safetensors")


def test_load_pickle_state_dict(tmp_path: Path) -> None:
    sd = {"a": torch.randn(3, 4), "b": torch.ones(2, dtype=torch.bfloat16)}
    path = tmp_path / "adapter_model.bin"
    torch.save(sd, path)
    out = load_pickle_state_dict(path)
    assert out.keys() == sd.keys()
    for k in sd:
        assert torch.equal(out[k], sd[k])


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (_Evil(), "cannot load pickle weights safely"),  # weights_only refuses the global
        (torch.ones(2), "does not hold a state dict"),
        (None, "cannot load"),  # garbage bytes, written below
    ],
)
def test_load_pickle_refuses(tmp_path: Path, payload: object, needle: str) -> None:
    path = tmp_path / "adapter_model.bin"
    if payload is None:
        path.write_bytes(b"not a pickle at all")
    else:
        torch.save(payload, path)
    with pytest.raises(SourceError, match=needle) as exc:
        load_pickle_state_dict(path)
    assert exc.value.where == str(path)


def test_pickle_as_safetensors(tmp_path: Path) -> None:
    sd = {"a": torch.randn(3, 4), "b": torch.randn(4, 4)[:, 1]}  # a non-contiguous view
    path = tmp_path / "adapter_model.bin"
    torch.save(sd, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = pickle_as_safetensors(path)
    assert out == pickle_as_safetensors(path), "converted once, then reused"
    loaded = load_file(out)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_read_ahead_hands_out_the_same_bytes_and_its_errors(tmp_path: Path) -> None:
    ts = {f"t{i}": torch.randn(300, 1024) for i in range(4)}  # 1.2 MB each: arena buffers
    path = tmp_path / "ra.safetensors"
    save_file(ts, path)
    h = read_header(path)
    infos = [h.tensors[f"t{i}"] for i in range(4)]
    reads: list[int] = []
    with PreadReader() as r:
        real = r.read_into

        def counting(p: Path, offset: int, out: memoryview) -> None:
            reads.append(offset)
            real(p, offset, out)

        r.read_into = counting  # type: ignore[method-assign]
        r.prefetch(path, infos[:2])
        for i in (0, 1):
            assert torch.equal(r.get(infos[i], path), ts[f"t{i}"])
        assert sorted(reads) == [infos[0].start, infos[1].start], "each read once, ahead"
        # A read-ahead that fails (the file shrank) raises at get, in the caller's thread.
        os.truncate(path, infos[3].start + 8)
        r.prefetch(path, infos[2:])
        for i in (2, 3):  # t2 is still in the file, but the file is not the one planned
            with pytest.raises(SourceError, match=r"shrank|changed") as exc:
                r.get(infos[i], path)
            assert exc.value.where == str(path)
        r.prefetch(path, infos[:1])  # left pending: close waits for it, nothing leaks
    big = PreadReader(readahead=1024)  # over budget: only the kernel hint, read at get
    with big:
        big.prefetch(path, infos[:1])
        assert torch.equal(big.get(infos[0], path), ts["t0"])
