"""Atomic output folders: written beside the target, renamed into place only when complete.

The one mechanism every writer of an output folder uses (`atomic_output_dir`). It promises:

- **Inputs are sacred.** An output path that is, or contains, one of the merge's inputs, or lies
  inside a folder holding an input file (a checkpoint or model folder), is refused before
  anything is created (real paths compared, symlinks resolved).
- **Only mwakit's own folders are replaced.** With ``overwrite`` an existing folder is replaced
  only when it is empty or a previous mwakit output: every output holds `MANIFEST`, the list
  of what mwakit wrote; a folder that also holds other files is refused, naming them.
- **Nothing half-written.** The output is written into a hidden temporary folder beside the
  target, every file and folder fsynced, then renamed into place (and the parent fsynced).
  A replaced output is swapped atomically (``renameat2(RENAME_EXCHANGE)`` where the kernel has
  it; else two renames whose half-way state the next run repairs): the old output stays until
  the new one is in place.
- **Faults leave nothing for good.** Temporary folders carry `TEMP_MARKER` (pid, process start
  time, boot id, a hash of the host name); the next run on the same output removes those of
  dead runs — never an unmarked folder, never a live run's — and restores an output a kill
  left moved aside.
- Temporary names fit in NAME_MAX for any legal output name.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from mwakit.errors import OutputError
from mwakit.io.layout import MODEL_SIDE_FILES
from mwakit.io.oserror import output_error
from mwakit.signals import deferred_signals

MANIFEST = ".mwakit-manifest.json"
"""Written into every output: the files and folders mwakit put there."""

TEMP_MARKER = ".mwakit-tmp.json"
"""Written into every temporary folder: who made it, so a later run knows when it is stale."""

# Names a mwakit output held before outputs carried a manifest: such a folder (with its
# mwakit.yaml) is still recognised as mwakit's, so --force keeps working on old outputs.
_LEGACY_NAMES = (
    "README.md",
    "mwakit.yaml",
    "weights.png",
    "adapter_config.json",
    "adapter_model.safetensors",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    *MODEL_SIDE_FILES,
)
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
_WALK_LIMIT = 10_000  # a mwakit output holds a handful of files, a few hundred shards at most
_MARK_LEN = len(".mwakit-tmp-") + 8 + 1  # the suffix plus the leading dot
_TEMP_RE = re.compile(r"\.mwakit-(tmp|old)-[0-9a-f]{8}$")
_FIX_FOREIGN = (
    "move the folder away yourself, or choose another output.path "
    "(--force only replaces an empty folder or a previous mwakit output)"
)


# -- checks ----------------------------------------------------------------------------------


def check_target(target: Path, overwrite: bool, inputs: Iterable[Path] = ()) -> None:
    """Fail early, before any work, if the target cannot or may not be written.

    Args:
        target: The output folder.
        overwrite: Whether an existing output folder may be replaced.
        inputs: Every file and folder the merge reads (checkpoints, the run folder, the base
            model, side files such as Fisher files and pickle sources).

    Raises:
        OutputError: The target is or contains an input; it exists and is not a folder; it
            exists and ``overwrite`` is off; or it holds files mwakit did not write.
    """
    _check_inputs(target, inputs)
    if not os.path.lexists(target):
        _check_creatable(target)
        return
    if not target.is_dir():
        raise OutputError(
            "output path exists and is not a folder",
            where=str(target),
            fix="choose another output.path",
        )
    if not overwrite:
        raise OutputError(
            "output folder already exists",
            where=str(target),
            fix="set output.overwrite: true or pass --force, or choose another output.path",
        )
    _check_replaceable(target)


def _check_creatable(target: Path) -> None:
    # Found before any work: an ancestor that is a file, or a name the file system refuses.
    anc = target.parent
    while not os.path.lexists(anc) and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise output_error(
            OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)), "cannot create output folder",
            str(target),
        )  # fmt: skip
    limit = _name_max(anc)
    for part in target.parts[len(anc.parts) :]:
        if len(os.fsencode(part)) > limit:
            raise output_error(
                OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG)),
                f"cannot create output folder: {len(os.fsencode(part))}-byte name, the limit "
                f"is {limit}",
                str(target),
            )


def _check_inputs(target: Path, inputs: Iterable[Path]) -> None:
    inputs = list(inputs)
    real = Path(os.path.realpath(target))
    # Inside a folder that holds an input file (a checkpoint or model folder, a Hub snapshot's
    # folder): writing there would change the input. A run folder holds no input file itself,
    # so `runs/x/merged` beside its checkpoint-* folders stays allowed.
    for p in inputs:
        if os.path.isfile(p):
            holder = Path(os.path.realpath(Path(p).parent))
            if holder in real.parents:
                raise OutputError(
                    f"output folder is inside the input folder {Path(p).parent}",
                    where=str(target),
                    fix="choose an output.path outside the checkpoint and base model folders "
                    "(mwakit never writes into its inputs)",
                )
    if not os.path.lexists(target):
        return  # an input exists, so a missing path can be none of them
    try:
        st = os.stat(target)
        ident: tuple[int, int] | None = (st.st_dev, st.st_ino)
    except OSError:
        ident = None
    for p in inputs:
        ireal = Path(os.path.realpath(p))
        # Compare spellings first, then device and inode (bind mounts, case-folding disks).
        hit = ireal == real or real in ireal.parents
        if not hit and ident is not None:
            for a in (ireal, *ireal.parents):
                with contextlib.suppress(OSError):
                    sa = os.stat(a)
                    if (sa.st_dev, sa.st_ino) == ident:
                        hit = True
                        break
        if hit:
            what = (
                "output path is an input of this merge"
                if ireal == real
                else f"output folder contains an input of this merge ({p})"
            )
            raise OutputError(
                what,
                where=str(target),
                fix="choose an output.path outside the checkpoints, the run folder and the base "
                "model (mwakit never replaces its inputs)",
            )


def _walk(root: Path, limit: int | None = None) -> list[str]:
    """Every entry under ``root`` as a relative path (folders end with ``/``), sorted; at most
    ``limit`` + 1 of them (enough to tell "more than limit")."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        pre = "" if rel == "." else rel + "/"
        out += [pre + d + "/" for d in dirnames]
        out += [pre + f for f in filenames]
        if limit is not None and len(out) > limit:
            break  # e.g. --force at a home folder: no need to list it all to refuse it
    return sorted(out)


def _read_manifest(folder: Path) -> set[str] | None:
    try:
        doc = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = doc["files"]
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            return None
        return set(files)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_legacy(entries: list[str]) -> bool:
    names = [e for e in entries if e != TEMP_MARKER]
    return "mwakit.yaml" in names and all(
        any(fnmatch(n, pat) for pat in _LEGACY_NAMES) for n in names
    )


def _check_replaceable(target: Path) -> None:
    try:
        entries = _walk(target, _WALK_LIMIT)
    except OSError as err:
        raise output_error(err, "cannot look into the existing output folder", str(target)) from err
    if not entries:
        return  # an empty folder holds nothing to lose
    listed = _read_manifest(target)
    if listed is None:
        if _is_legacy(entries):
            return
        shown = ", ".join(entries[:5]) + (
            f" and {len(entries) - 5} more" if len(entries) > 5 else ""
        )
        raise OutputError(
            f"output folder exists and was not written by mwakit (it holds {shown})",
            where=str(target),
            fix=_FIX_FOREIGN,
        )
    foreign = [e for e in entries if e not in listed and e not in (MANIFEST, TEMP_MARKER)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        raise OutputError(
            f"output folder holds {len(foreign)} file(s) mwakit did not write: {shown}",
            where=str(target),
            fix="move them out of the folder (mwakit never deletes what it did not write), "
            "or choose another output.path",
        )


# -- single files ----------------------------------------------------------------------------


def replace_file(target: Path, write: Callable[[Path], object], *, suffix: str = "") -> None:
    """Write one file atomically: ``write(tmp)`` beside ``target``, then rename over it.

    A failure (or an interrupt) removes the temporary file and leaves ``target`` as it was.
    The temporary name starts with a dot and the target's name (cut to 64 characters, so a
    long name still fits) and ends with ``suffix`` (writers that pick a format by extension).

    Raises:
        OSError: From creating, writing or renaming (the caller says what it was writing).
    """
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.name[:64]}.mwakit-tmp-", suffix=suffix, dir=target.parent
    )
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- temporary folders -----------------------------------------------------------------------


def temp_stem(name: str, name_max: int = 255) -> str:
    """The part of ``name`` that prefixes its temporary folders, cut to fit ``name_max`` bytes.

    The cut is deterministic (a later run finds the same stem) and on bytes, so any legal name,
    however long or multi-byte, gives legal temporary names.
    """
    raw = os.fsencode(name)
    limit = max(1, name_max - _MARK_LEN)
    return name if len(raw) <= limit else os.fsdecode(raw[:limit])


def _name_max(parent: Path) -> int:
    try:
        return int(os.pathconf(parent, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _host_id() -> str:
    # A hash, not the name: markers may end up in an output that is pushed to the Hub.
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:16]


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _marker(target_name: str, kind: str) -> dict[str, Any]:
    pid = os.getpid()
    return {
        "mwakit_temp": kind,
        "target": target_name,
        "pid": pid,
        "start": _proc_start(pid),
        "boot": _boot_id(),
        "host": _host_id(),
        "created": time.time(),
    }


def _write_marker(folder: Path, doc: dict[str, Any]) -> None:
    path = folder / TEMP_MARKER
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, json.dumps(doc).encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((folder / TEMP_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("pid"), int):
        return None
    return doc


def _alive(doc: dict[str, Any]) -> bool:
    """Whether the run that wrote a marker may still be running (when unsure: yes)."""
    if doc.get("host") != _host_id():
        return True  # another machine sharing this disk: its processes cannot be seen
    boot = _boot_id()
    if boot is not None and doc.get("boot") not in (None, boot):
        return False  # written before the last reboot
    pid = int(doc["pid"])
    if pid == os.getpid():
        return True  # this process's own: another writer in it may be using it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    start = _proc_start(pid)
    return not (start is not None and doc.get("start") is not None and start != doc["start"])


def _temp_entries(target: Path) -> list[Path]:
    parent = target.parent
    prefix = "." + temp_stem(target.name, _name_max(parent)) + ".mwakit-"
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    return [
        parent / n
        for n in sorted(names)
        if n.startswith(prefix) and _TEMP_RE.search(n[1:]) is not None
    ]


def recover(target: Path) -> None:
    """Repair what killed runs left beside ``target``: restore, then remove, stale folders.

    Only folders whose marker names ``target`` and a process that is gone are touched. A
    previous output moved aside by a ``--force`` swap that was cut between its two renames is
    moved back when the target is missing, so the user is never left without an output folder.

    Raises:
        OutputError: A stale folder cannot be moved back (the message says where it is).
    """
    stale = []
    for entry in _temp_entries(target):
        doc = _read_marker(entry)
        if doc is None or doc.get("target") != target.name or _alive(doc):
            continue  # not ours to judge: never delete an unmarked or live run's folder
        stale.append((doc, entry))
    for doc, entry in stale:  # moved-aside outputs first: they may be the only copy
        moved = entry / "x"
        if doc.get("mwakit_temp") == "old" and os.path.lexists(moved):
            if not os.path.lexists(target):
                try:
                    os.rename(moved, target)
                except OSError as err:
                    raise output_error(
                        err, f"cannot restore the previous output from {entry}", str(target)
                    ) from err
                _fsync_dir(target.parent)
            else:
                shutil.rmtree(moved, ignore_errors=True)
    for _, entry in stale:
        shutil.rmtree(entry, ignore_errors=True)
    marker = target / TEMP_MARKER
    if target.is_dir() and not target.is_symlink():
        doc = _read_marker(target)
        if doc is not None and not _alive(doc):
            with contextlib.suppress(OSError):
                marker.unlink()  # left by a run killed just after its final rename


def _make_temp(target: Path, kind: str) -> Path:
    parent = target.parent
    stem = temp_stem(target.name, _name_max(parent))
    for _ in range(100):
        tmp = parent / f".{stem}.mwakit-{kind}-{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp, 0o700)
        except FileExistsError:
            continue
        try:
            _write_marker(tmp, _marker(target.name, kind))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(parent))


# -- durability ------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # some platforms cannot open folders; nothing to sync there
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    # Data first, then the folders that name it, bottom up: after the final rename a crash
    # leaves the complete output or none, never a folder of empty files.
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue  # a link holds no data of its own; its folder's fsync records it
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _write_manifest(tmp: Path) -> None:
    from mwakit import __version__

    files = [e for e in _walk(tmp) if e not in (TEMP_MARKER, MANIFEST)]
    doc = {"written_by": f"mwakit {__version__}", "files": files}
    (tmp / MANIFEST).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


# -- the swap --------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # this kernel or file system cannot exchange: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


def _replace(new: Path, target: Path) -> None:
    parent = target.parent
    # The old output gets a marker too ("replaced": only ever deleted, never restored), so
    # whichever folder a kill leaves under a temporary name is recognised as stale.
    _write_marker(target, _marker(target.name, "replaced"))
    try:
        swapped = _exchange(new, target)
    except BaseException:
        with contextlib.suppress(OSError):
            (target / TEMP_MARKER).unlink()
        raise
    if swapped:
        _fsync_dir(parent)
        shutil.rmtree(new, ignore_errors=True)  # now the previous output
        return
    with contextlib.suppress(OSError):
        (target / TEMP_MARKER).unlink()
    # POSIX cannot replace a non-empty folder atomically: move the old one aside, move the new
    # one in. A kill between the two renames leaves the old one in `old/x`; `recover` puts it
    # back. If the second rename fails, the old one goes back now.
    old = _make_temp(target, "old")
    try:
        os.rename(target, old / "x")
    except BaseException:
        shutil.rmtree(old, ignore_errors=True)
        raise
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old / "x", target)
        shutil.rmtree(old, ignore_errors=True)
        raise
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)  # the previous output, now replaced


# -- the context manager ---------------------------------------------------------------------


def _inside(path: object, folder: Path) -> bool:
    if not isinstance(path, str | bytes | os.PathLike):
        return False
    try:
        p = Path(os.fsdecode(path)).resolve()
    except (OSError, ValueError):
        return False
    f = folder.resolve()
    return p == f or f in p.parents


@contextmanager
def atomic_output_dir(target: Path, overwrite: bool, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; move it into place on success.

    The folder is created in ``target``'s parent (created if missing) so the final move is a
    rename on one file system. On any exception, KeyboardInterrupt and termination signals
    included, the temporary folder is removed and the target is left as it was: it never exists
    half-written. Stale folders of killed runs on the same target are cleaned up first.

    Args:
        target: The output folder.
        overwrite: Whether an existing empty folder or previous mwakit output may be replaced.
        inputs: Every file and folder the merge reads: the target may be none of them,
            contain none of them, and lie inside no folder that holds an input file.

    Yields:
        The temporary folder to write the output into. An ``OSError`` raised about a path in
        it becomes an `OutputError` with a fix.

    Raises:
        OutputError: The target is or holds an input, exists and may not be replaced (checked
            before anything is created, and again before the move), or the folder cannot be
            created, written or moved (disk full, read-only, permissions, …).
    """
    inputs = list(inputs)
    if target.is_symlink() and target.is_dir():
        # A link to a folder elsewhere (a bigger disk, say): write there, keep the link.
        target = Path(os.path.realpath(target))
    check_target(target, overwrite, inputs)
    parent = target.parent
    if parent.is_dir():
        recover(target)
        check_target(target, overwrite, inputs)  # recovery may have restored an output
    # A signal between creating the folder and entering the ``try`` that removes it would leave
    # it behind: signals wait until then (one that came meanwhile is raised inside the try).
    release = deferred_signals()
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = _make_temp(target, "tmp")
    except OSError as err:
        release()
        raise output_error(err, "cannot create output folder", str(target)) from err
    except BaseException:
        release()
        raise
    try:
        release()
        try:
            yield tmp
        except OSError as err:
            # Disk full, quota and read-only errors carry no file name when a buffered write
            # fails at flush, but can only concern what is being written.
            if err.errno in _WRITE_ERRNOS or _inside(err.filename, tmp):
                raise output_error(err, "cannot write the output", str(target)) from err
            raise
        # Something may have created the target during a long run; check again so it is
        # never replaced without permission (rename(2) would silently replace an empty one).
        check_target(target, overwrite, inputs)
        try:
            _write_manifest(tmp)
            os.chmod(tmp, 0o755)  # made 0700; an output folder should be readable
            _fsync_tree(tmp)
            if target.is_dir():
                _replace(tmp, target)
            else:
                # rename(2) in one folder is atomic: readers see no target or a complete one.
                os.rename(tmp, target)
                _fsync_dir(parent)
            with contextlib.suppress(OSError):
                (target / TEMP_MARKER).unlink()
            _fsync_dir(target)
        except OSError as err:
            raise output_error(
                err, "cannot move the finished output into place", str(target)
            ) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
