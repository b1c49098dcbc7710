"""OS errors met while writing an output, as one-line `OutputError`s with a fix."""

from __future__ import annotations

import errno

from mwakit.errors import OutputError

# errno → (what the user sees, how to fix it). The strerror text is kept in the message too,
# so a search for the OS's own words still finds it.
_FIXES: dict[int, tuple[str, str]] = {
    errno.ENOSPC: (
        "the disk is full",
        "free space on that file system, or set output.path (or -o) to a disk with room",
    ),
    errno.EDQUOT: (
        "your disk quota is used up",
        "free space within your quota, or set output.path (or -o) elsewhere",
    ),
    errno.EROFS: (
        "the file system is read-only",
        "set output.path (or -o) to a writable folder",
    ),
    errno.EACCES: (
        "permission denied",
        "set output.path (or -o) to a folder you may write to, or fix its permissions",
    ),
    errno.EPERM: (
        "operation not permitted",
        "set output.path (or -o) to a folder you may write to, or fix its permissions",
    ),
    errno.ENOTDIR: (
        "a parent of the output path is a file, not a folder",
        "move that file away, or choose another output.path",
    ),
    errno.ENAMETOOLONG: (
        "the output name is too long for the file system",
        "choose a shorter output.path",
    ),
    errno.EEXIST: (
        "something appeared at the output path while mwakit was writing",
        "check what created it, move it away, and run again",
    ),
    errno.ENOTEMPTY: (
        "something appeared at the output path while mwakit was writing",
        "check what created it, move it away, and run again",
    ),
    errno.ELOOP: (
        "too many levels of symbolic links in the output path",
        "point output.path at a real folder",
    ),
    errno.EIO: (
        "an I/O error from the disk",
        "check the disk (dmesg), or write to another one",
    ),
}


def output_error(err: OSError, doing: str, where: str) -> OutputError:
    """An `OutputError` for an OS error met while ``doing`` something to the output.

    Args:
        err: The OS error.
        doing: What mwakit was doing, e.g. ``"cannot create the output folder"``.
        where: The path the error concerns.

    Returns:
        The error to raise (``from err``): what happened in plain words plus the OS's own text,
        and a fix for the common causes (disk full, quota, read-only, permissions, a parent
        that is a file, a name too long).
    """
    text = err.strerror or str(err) or type(err).__name__
    known = _FIXES.get(err.errno or -1)
    if known is None:
        return OutputError(
            f"{doing}: {text}",
            where=where,
            fix="check the output folder and its file system, then run again",
        )
    what, fix = known
    return OutputError(f"{doing}: {what} ({text})", where=where, fix=fix)
