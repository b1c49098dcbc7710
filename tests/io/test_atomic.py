"""io.atomic: the output folder appears complete or not at all, and never replaces by surprise."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import mwakit.io.atomic as atomic
from mwakit.errors import OutputError
from mwakit.io.atomic import MANIFEST, atomic_output_dir, check_target


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)


def _previous_output(target: Path, *names: str) -> None:
    """A folder mwakit wrote before (so --force may replace it)."""
    with atomic_output_dir(target, overwrite=False) as tmp:
        for n in names:
            (tmp / n).write_text(n)


def test_success_moves_into_place(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_output_dir(target, overwrite=False) as tmp:
        # Written beside the target, under a hidden name; the target does not exist yet.
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".out.mwakit-tmp-")
        assert not target.exists()
        (tmp / "model.safetensors").write_text("x")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f").write_text("y")
    assert (target / "model.safetensors").read_text() == "x"
    assert (target / "sub" / "f").read_text() == "y"
    assert _listing(tmp_path) == ["out"], "no temporary folder left"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    # The manifest lists what mwakit wrote (and nothing of its own bookkeeping).
    manifest = json.loads((target / MANIFEST).read_text())
    assert manifest["files"] == ["model.safetensors", "sub/", "sub/f"]
    assert sorted(p.name for p in target.iterdir()) == [MANIFEST, "model.safetensors", "sub"]


def test_missing_parents_are_created(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out"
    with atomic_output_dir(target, overwrite=False) as tmp:
        (tmp / "f").write_text("x")
    assert (target / "f").read_text() == "x"


def test_relative_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with atomic_output_dir(Path("out"), overwrite=False) as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "out" / "f").read_text() == "x"
    assert _listing(tmp_path) == ["out"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt(), SystemExit(3)])
def test_failure_leaves_nothing(tmp_path: Path, exc: BaseException) -> None:
    target = tmp_path / "out"
    with pytest.raises(type(exc)), atomic_output_dir(target, overwrite=False) as tmp:
        (tmp / "half.safetensors").write_bytes(b"\0" * 1000)
        raise exc
    assert _listing(tmp_path) == [], "neither target nor temporary folder"


def test_overwrite_replaces(tmp_path: Path) -> None:
    target = tmp_path / "out"
    _previous_output(target, "old")
    with atomic_output_dir(target, overwrite=True) as tmp:
        assert (target / "old").read_text() == "old", "the old output stays until the end"
        (tmp / "new").write_text("new")
    assert _listing(target) == ["new"]
    assert _listing(tmp_path) == ["out"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failed_overwrite_keeps_previous_output(tmp_path: Path, exc: BaseException) -> None:
    target = tmp_path / "out"
    _previous_output(target, "old")
    with pytest.raises(type(exc)), atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
        raise exc
    assert _listing(target) == ["old"]
    assert _listing(tmp_path) == ["out"]


def test_failed_swap_restores_previous_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out"
    _previous_output(target, "old")
    real_rename = os.rename
    calls: list[tuple[str, str]] = []
    # The two-rename swap (kernels or file systems without RENAME_EXCHANGE).
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)

    def flaky(src: str | Path, dst: str | Path) -> None:
        calls.append((str(src), str(dst)))
        if len(calls) == 2:  # old moved aside; moving the new one in fails
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", flaky)
    with (
        pytest.raises(OutputError, match="No space left") as exc,
        atomic_output_dir(target, overwrite=True) as tmp,
    ):
        (tmp / "new").write_text("new")
    assert exc.value.where == str(target)
    assert _listing(target) == ["old"]
    assert _listing(tmp_path) == ["out"]


def test_existing_target_refused_before_anything(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep").write_text("keep")
    entered = False
    with (
        pytest.raises(OutputError) as exc,
        atomic_output_dir(target, overwrite=False),
    ):
        entered = True
    assert not entered
    err = exc.value
    assert err.what == "output folder already exists"
    assert err.where == str(target)
    assert err.fix is not None and "--force" in err.fix and "output.overwrite" in err.fix
    assert _listing(tmp_path) == ["out"] and _listing(target) == ["keep"]
    with pytest.raises(OutputError, match="already exists"):
        check_target(target, overwrite=False)
    # Even with overwrite, a folder mwakit did not write is refused, saying what it holds.
    with pytest.raises(OutputError, match=r"not written by mwakit \(it holds keep\)"):
        check_target(target, overwrite=True)
    check_target(tmp_path / "new", overwrite=False)


def test_target_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="not a folder"):
            check_target(target, overwrite)
        with (
            pytest.raises(OutputError, match="not a folder"),
            atomic_output_dir(target, overwrite),
        ):
            pass
    assert target.read_text() == "precious"
    assert _listing(tmp_path) == ["out"]


def test_target_appearing_during_the_run_is_not_replaced(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with (
        pytest.raises(OutputError, match="already exists"),
        atomic_output_dir(target, overwrite=False) as tmp,
    ):
        (tmp / "new").write_text("new")
        target.mkdir()  # someone else's output, made while we ran (empty: rename would win)
    assert _listing(target) == []
    assert _listing(tmp_path) == ["out"]


def test_parent_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with (
        pytest.raises(OutputError, match="cannot create output folder"),
        atomic_output_dir(tmp_path / "file" / "out", overwrite=False),
    ):
        pass
