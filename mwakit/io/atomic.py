"""Atomic output folders: written beside the target, renamed into place only when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mwakit.errors import OutputError


def check_target(target: Path, overwrite: bool) -> None:
    """Fail early, before any work, if the target cannot be written.

    Args:
        target: The output folder.
        overwrite: Whether an existing output folder may be replaced.

    Raises:
        OutputError: The target exists and is not a folder (whatever ``overwrite`` says), or
            it exists and ``overwrite`` is off.
    """
    if target.exists() and not target.is_dir():
        raise OutputError(
            "output path exists and is not a folder",
            where=str(target),
            fix="choose another output.path",
        )
    if target.exists() and not overwrite:
        raise OutputError(
            "output folder already exists",
            where=str(target),
            fix="set output.overwrite: true or pass --force, or choose another output.path",
        )


@contextmanager
def atomic_output_dir(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; move it into place on success.

    The folder is created in ``target``'s parent (created if missing) so the final move is a
    rename on one file system. On any exception, KeyboardInterrupt included, the temporary
    folder is removed and the target is left as it was: it never exists half-written.

    Args:
        target: The output folder.
        overwrite: Whether an existing output folder may be replaced.

    Yields:
        The temporary folder to write the output into.

    Raises:
        OutputError: The target exists and overwrite is off (checked before anything is
            created, and again before the move), or the folder cannot be created or moved.
    """
    check_target(target, overwrite)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.mwakit-tmp-", dir=parent))
    except OSError as err:
        raise OutputError(
            f"cannot create output folder: {err.strerror or err}", where=str(target)
        ) from err
    try:
        yield tmp
        # Something may have created the target during a long run; check again so it is
        # never replaced without permission (rename(2) would silently replace an empty one).
        check_target(target, overwrite)
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; an output folder should be readable
            if target.exists():
                _swap(tmp, target, parent)
            else:
                # rename(2) in one folder is atomic: readers see no target or a complete one.
                os.rename(tmp, target)
        except OSError as err:
            raise OutputError(
                f"cannot move the finished output into place: {err.strerror or err}",
                where=str(target),
            ) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap(new: Path, target: Path, parent: Path) -> None:
    # POSIX cannot atomically replace a non-empty folder, so the old one is moved aside first
    # and moved back if the new one cannot go in: the target is always the old or the new.
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.mwakit-old-", dir=parent))
    try:
        os.rename(target, old / "x")
    except BaseException:
        old.rmdir()
        raise
    try:
        os.rename(new, target)
    except BaseException:
        # If even this fails the previous output survives in `old`; never delete it then.
        os.rename(old / "x", target)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)  # the previous output, now replaced
