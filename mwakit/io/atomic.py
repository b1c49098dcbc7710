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

    Raises:
        OutputError: The target exists (and overwrite is off) or is a file.
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

    On any exception, KeyboardInterrupt included, the temporary folder is removed and the
    target is left as it was.

    Raises:
        OutputError: The target exists and overwrite is off, or it cannot be created.
    """
    check_target(target, overwrite)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.mwakit-tmp-", dir=parent))
    except OSError as err:
        raise OutputError(
            f"cannot create output folder: {err.strerror}", where=str(target)
        ) from err
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; an output folder should be readable
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.mwakit-old-", dir=parent))
            os.rename(target, old / "x")
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old / "x", target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
