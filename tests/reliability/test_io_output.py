"""Output folders (issue 8 §1, §4, §6): inputs are sacred, --force replaces only mwakit's own
outputs, stale folders of killed runs are repaired, names fit NAME_MAX, OS errors have a fix."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import mwakit.io.atomic as atomic
from mwakit.errors import OutputError
from mwakit.io.atomic import MANIFEST, TEMP_MARKER, atomic_output_dir, recover, temp_stem

from .harness import assert_clean_failure, invoke, leftovers, snapshot
from .io_fixtures import full_recipe, model_src, models, recipe, run, run_src, temp_dirs

__all__ = ["model_src", "models", "run", "run_src"]  # fixtures used below


def _ok(res: object) -> None:
    assert getattr(res, "exit_code", None) == 0, getattr(res, "output", res)


# -- inputs are sacred ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "needle"),
    [
        ("checkpoint", "output path is an input"),
        ("run", "output path is an input"),  # the select.run folder
        ("parent", "contains an input"),  # a folder holding the whole run
        ("symlink", "output path is an input"),  # a link to a checkpoint
    ],
)
def test_force_never_replaces_an_input(tmp_path: Path, run: Path, where: str, needle: str) -> None:
    ckpt = run / "checkpoint-20"
    if where == "symlink":
        out = tmp_path / "link"
        out.symlink_to(ckpt)
    else:
        out = {"checkpoint": ckpt, "run": run, "parent": tmp_path}[where]
    before = snapshot(run)
    r = recipe(
        tmp_path, out, select={"run": str(run)}, output={"path": str(out), "overwrite": True}
    )
    res = invoke("run", r, "--force")
    assert_clean_failure(res, needle=needle, before=before, inputs=[run])
    assert not leftovers(out)


@pytest.mark.parametrize("inside", ["checkpoint-20/merged", "checkpoint-20/a/b"])
def test_output_inside_a_checkpoint_folder_is_refused(
    tmp_path: Path, run: Path, inside: str
) -> None:
    out = run / inside
    before = snapshot(run)
    res = invoke("run", recipe(tmp_path, out, select={"run": str(run)}))
    assert_clean_failure(res, needle="inside the input folder", before=before, inputs=[run])


def test_output_beside_the_checkpoints_of_a_run_is_fine(tmp_path: Path, run: Path) -> None:
    out = run / "merged"  # the Trainer's output_dir: select only sees checkpoint-* folders
    _ok(invoke("run", recipe(tmp_path, out, select={"run": str(run)})))
    assert (out / "adapter_model.safetensors").is_file()


def test_force_never_replaces_the_base_model(tmp_path: Path, models: Path) -> None:
    before = snapshot(models)
    r = recipe(
        tmp_path,
        models / "base",
        method="task_arithmetic",
        params={},
        base_model=str(models / "base"),
        checkpoints=[str(models / "a"), str(models / "b")],
    )
    res = invoke("run", r, "--force")
    assert_clean_failure(res, needle="output path is an input", before=before, inputs=[models])


def test_foreign_folder_is_refused_naming_what_it_holds(tmp_path: Path, run: Path) -> None:
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    (out / "thesis.tex").write_text("years of work")
    before = snapshot(run, out)
    res = invoke("run", recipe(tmp_path, out, select={"run": str(run)}), "--force")
    assert_clean_failure(
        res, needle="not written by mwakit (it holds notes/, thesis.tex)", before=before,
        inputs=[run, out],
    )  # fmt: skip
    assert "move the folder away yourself" in res.stderr


def test_user_file_added_to_an_output_is_never_deleted(tmp_path: Path, run: Path) -> None:
    r = recipe(tmp_path, select={"run": str(run)})
    _ok(invoke("run", r))
    out = tmp_path / "out"
    (out / "my-eval.json").write_text("{}")
    before = snapshot(run, out)
    res = invoke("run", r, "--force")
    assert_clean_failure(
        res, needle="holds 1 file(s) mwakit did not write: my-eval.json", before=before,
        inputs=[run, out],
    )  # fmt: skip


def test_force_replaces_a_previous_output_atomically(tmp_path: Path, run: Path) -> None:
    r = recipe(tmp_path, select={"run": str(run)})
    _ok(invoke("run", r))
    out = tmp_path / "out"
    ino = out.stat().st_ino
    old = (out / "adapter_model.safetensors").read_bytes()
    r2 = recipe(tmp_path, select={"run": str(run)}, params={"metric": "loss", "penalty": 3.0})
    res = invoke("run", r2, "--force")
    _ok(res)
    assert out.stat().st_ino != ino, "a new folder took the old one's place"
    assert (out / "adapter_model.safetensors").read_bytes() != old
    manifest = json.loads((out / MANIFEST).read_text())
    assert "adapter_model.safetensors" in manifest["files"] and "README.md" in manifest["files"]
    assert not (out / TEMP_MARKER).exists()
    assert temp_dirs(out) == []


@pytest.mark.parametrize("kind", ["empty", "legacy"])
def test_force_replaces_an_empty_folder_or_an_old_mwakit_output(
    tmp_path: Path, run: Path, kind: str
) -> None:
    r = recipe(tmp_path, select={"run": str(run)})
    out = tmp_path / "out"
    if kind == "empty":
        out.mkdir()
    else:  # written by a mwakit release without a manifest
        _ok(invoke("run", r))
        (out / MANIFEST).unlink()
    _ok(invoke("run", r, "--force"))
    assert (out / "adapter_model.safetensors").is_file() and (out / MANIFEST).is_file()


def test_output_through_a_symlink_lands_where_it_points(tmp_path: Path, run: Path) -> None:
    real = tmp_path / "bigdisk" / "out"
    real.mkdir(parents=True)
    link = tmp_path / "out"
    link.symlink_to(real)
    r = recipe(tmp_path, link, select={"run": str(run)})
    for _ in range(2):  # the second run replaces the first one's output, through the link
        _ok(invoke("run", r, "--force"))
        assert link.is_symlink() and (real / "adapter_model.safetensors").is_file()
        assert temp_dirs(real) == [] and temp_dirs(link) == []


def test_output_path_that_is_a_file(tmp_path: Path, run: Path) -> None:
    out = tmp_path / "out"
    out.write_text("precious")
    before = snapshot(run, out)
    res = invoke("run", recipe(tmp_path, out, select={"run": str(run)}), "--force")
    assert_clean_failure(res, needle="not a folder", before=before, inputs=[run, out])


# -- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [240, 255])
def test_long_output_names_work(tmp_path: Path, run: Path, length: int) -> None:
    out = tmp_path / ("é" * ((length - 1) // 2) + "x" * (1 + (length - 1) % 2))
    assert len(os.fsencode(out.name)) == length
    _ok(invoke("run", recipe(tmp_path, out, select={"run": str(run)})))
    assert (out / "adapter_model.safetensors").is_file()
    assert temp_dirs(out) == []
    # The stem is cut on bytes to fit NAME_MAX with the suffix, and the same every time.
    stem = temp_stem(out.name)
    assert len(os.fsencode(f".{stem}.mwakit-tmp-12345678")) <= 255
    assert stem == temp_stem(out.name)


def test_too_long_name_is_one_line_with_a_fix(tmp_path: Path, run: Path) -> None:
    out = tmp_path / ("x" * 256)
    res = invoke("run", recipe(tmp_path, out, select={"run": str(run)}))
    assert_clean_failure(res, needle="too long", before=snapshot(run), inputs=[run])
    assert "choose a shorter output.path" in res.stderr


def test_parent_is_a_file(tmp_path: Path, run: Path) -> None:
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" / "out"
    res = invoke("run", recipe(tmp_path, out, select={"run": str(run)}))
    assert_clean_failure(res, needle="is a file, not a folder", before=snapshot(run), inputs=[run])


# -- durability -----------------------------------------------------------------------------


def test_every_file_and_folder_is_fsynced_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename
    events: list[str] = []

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        events.append("fsync")
        real_fsync(fd)

    def rename(a: str | Path, b: str | Path) -> None:
        events.append(f"rename {Path(b).name}")
        real_rename(a, b)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "rename", rename)
    target = tmp_path / "out"
    with atomic_output_dir(target, overwrite=False) as tmp:
        (tmp / "a.safetensors").write_bytes(b"x" * 100)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.json").write_text("{}")
    i = events.index("rename out")
    before = {Path(p).name for p in synced[: events[:i].count("fsync")]}
    assert {"a.safetensors", "b.json", MANIFEST, "sub"} <= before
    assert any(n.startswith(".out.mwakit-tmp-") for n in before), "the folder itself"
    assert str(tmp_path) in synced[events[:i].count("fsync") :], "the parent, after the rename"


def test_exchange_keeps_the_old_output_until_the_new_one_is_in(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_output_dir(target, overwrite=False) as tmp:
        (tmp / "v").write_text("1")
    seen: list[str] = []
    real = atomic._exchange

    def watch(a: Path, b: Path) -> bool:
        seen.append((b / "v").read_text())  # still the old output, right up to the swap
        ok = real(a, b)
        seen.append((b / "v").read_text())
        return ok

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(atomic, "_exchange", watch)
        with atomic_output_dir(target, overwrite=True) as tmp:
            (tmp / "v").write_text("2")
    if seen[1] == "1":
        pytest.skip("this file system cannot exchange (the two-rename swap is tested below)")
    assert seen == ["1", "2"]
    assert (target / "v").read_text() == "2" and leftovers(target) == []


# -- stale folders of killed runs -------------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _plant(out: Path, kind: str, **over: object) -> Path:
    folder = out.parent / f".{temp_stem(out.name)}.mwakit-{kind}-{os.urandom(4).hex()}"
    folder.mkdir()
    doc = {**atomic._marker(out.name, kind), "pid": _dead_pid(), **over}
    (folder / TEMP_MARKER).write_text(json.dumps(doc))
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    return folder


def test_stale_temp_folder_of_a_dead_run_is_removed(tmp_path: Path, run: Path) -> None:
    out = tmp_path / "out"
    stale = _plant(out, "tmp")
    _ok(invoke("run", recipe(tmp_path, out, select={"run": str(run)})))
    assert not stale.exists() and temp_dirs(out) == []


@pytest.mark.parametrize("case", ["unmarked", "live", "other-target", "other-host", "reused-pid"])
def test_stale_cleanup_touches_only_dead_runs_of_this_output(tmp_path: Path, case: str) -> None:
    out = tmp_path / "out"
    live: subprocess.Popen[bytes] | None = None
    if case == "unmarked":
        folder = tmp_path / ".out.mwakit-tmp-0badc0de"
        folder.mkdir()
    elif case == "live":
        live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        folder = _plant(out, "tmp", pid=live.pid, start=atomic._proc_start(live.pid))
    elif case == "other-target":
        folder = _plant(out, "tmp", target="out2")
    elif case == "other-host":
        folder = _plant(out, "tmp", host="0" * 16)
    else:  # the pid is alive but belongs to a newer process: the run that wrote it is gone
        folder = _plant(out, "tmp", pid=os.getppid(), start="1")
    try:
        recover(out)
    finally:
        if live is not None:
            live.kill()
            live.wait()
    assert folder.exists() == (case != "reused-pid")


def test_half_swap_is_restored_so_an_output_always_exists(tmp_path: Path) -> None:
    # A kill between the two renames of --force: the old output sits in old/x, no target.
    target = tmp_path / "out"
    with atomic_output_dir(target, overwrite=False) as tmp:
        (tmp / "v").write_text("old")
    old = _plant(target, "old")
    os.rename(target, old / "x")
    new = _plant(target, "tmp")  # the complete new output, never moved in
    recover(target)
    assert (target / "v").read_text() == "old"
    assert not old.exists() and not new.exists()
    # Swap done but the old copy not yet deleted: it goes, the new output stays.
    old2 = _plant(target, "old")
    (old2 / "x").mkdir()
    recover(target)
    assert not old2.exists() and (target / "v").read_text() == "old"


# -- OS errors with a fix -----------------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_on_a_small_tmpfs(tmp_path: Path, models: Path) -> None:
    before = snapshot(models)
    with _tmpfs(tmp_path / "small", "size=64k") as disk:
        out = disk / "out"
        res = invoke("run", full_recipe(tmp_path, models, out, output={"path": str(out)}))
        assert_clean_failure(res, needle="the disk is full", before=before, inputs=[models])
        assert "fix: free space" in res.stderr
        assert os.listdir(disk) == [], "nothing left on the full disk"


def test_read_only_output_disk(tmp_path: Path, run: Path) -> None:
    before = snapshot(run)
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as disk:
        res = invoke("run", recipe(tmp_path, disk / "out", select={"run": str(run)}))
        assert_clean_failure(res, needle="read-only", before=before, inputs=[run])
        assert "writable folder" in res.stderr


@pytest.mark.parametrize(
    ("code", "needle"),
    [
        (errno.ENOSPC, "the disk is full"),
        (errno.EDQUOT, "disk quota"),
        (errno.EACCES, "permission denied"),
        (errno.EROFS, "read-only"),
    ],
)
def test_os_errors_while_writing_map_to_one_line(
    tmp_path: Path, run: Path, monkeypatch: pytest.MonkeyPatch, code: int, needle: str
) -> None:
    # Root ignores permissions and quotas here, so the OS error is raised at the write itself.
    from mwakit.executors import factors
    from mwakit.io import writer

    def refuse(fd: int, size: int) -> None:
        raise OSError(code, os.strerror(code))

    # Both writers: the torch one's and the NumPy factor average's.
    monkeypatch.setattr(writer, "reserve", refuse)
    monkeypatch.setattr(factors, "reserve", refuse)
    out = tmp_path / "out"
    res = invoke("run", recipe(tmp_path, out, select={"run": str(run)}))
    assert_clean_failure(res, needle=needle, out=out, before=snapshot(run), inputs=[run])


def test_enospc_at_a_card_file_is_mapped_too(
    tmp_path: Path, run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A plain OSError about a file in the temporary folder (not from mwakit's writer).
    import mwakit.api as api

    def full(p: object, tmp: Path, *a: object, **k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "README.md"))

    monkeypatch.setattr(api, "write_card", full)
    out = tmp_path / "out"
    res = invoke("run", recipe(tmp_path, out, select={"run": str(run)}))
    assert_clean_failure(
        res, needle="the disk is full", out=out, before=snapshot(run), inputs=[run]
    )


def test_unwritable_existing_output_reported(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_output_dir(target, overwrite=False) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(OutputError) as exc, atomic_output_dir(target / "v" / "deeper", False):
        pass
    assert "fix:" in exc.value.message and "not a folder" in exc.value.message
