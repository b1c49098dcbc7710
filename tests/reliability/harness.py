"""Shared checks for the bad-input and fault suite (issue 8).

Every case asserts the same promises: the exit code, one line on stderr that says what, where
and how to fix it, no traceback, no output folder and no mwakit temp folder left beside it, and
every input byte-for-byte unchanged (hashed before and after).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from click.testing import CliRunner, Result

from mwakit.cli import main

Snapshot = dict[str, tuple[str, int]]


def snapshot(*roots: Path) -> Snapshot:
    """(sha256 or symlink target, mode) of every entry under ``roots``, symlinks not followed."""
    out: Snapshot = {}
    for root in roots:
        entries: Iterable[Path] = (
            [root] if not root.is_dir() or root.is_symlink() else [root, *sorted(root.rglob("*"))]
        )
        for p in entries:
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                digest = "link:" + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                digest = "dir"
            out[str(p)] = (digest, stat.S_IMODE(st.st_mode))
    return out


def leftovers(out: Path) -> list[Path]:
    """mwakit's temporary or half-swapped folders beside the output path ``out``."""
    from mwakit.io.atomic import temp_stem

    parent = out.parent
    if not parent.is_dir():
        return []
    # Long names are cut to fit NAME_MAX with the suffix: look for the stem mwakit uses.
    prefix = f".{temp_stem(out.name)}.mwakit-"
    return [p for p in parent.iterdir() if p.name.startswith(prefix)]


def invoke(*args: str | Path) -> Result:
    """Run the CLI in-process (click's CliRunner); exceptions become exit codes as in a shell."""
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_failure(
    res: Result,
    *,
    code: int = 1,
    needle: str | None = None,
    out: Path | None = None,
    before: Snapshot | None = None,
    inputs: Iterable[Path] = (),
    lines: int | None = 1,
    fix: bool = True,
) -> None:
    """The standard promises of a failed command.

    Args:
        res: The CliRunner result.
        code: Expected exit code (1 failure, 2 usage, 130/143/129 signals).
        needle: Text the message must contain (what went wrong, or where).
        out: The output folder that must not exist afterwards (nor its temp folders).
        before: `snapshot` of ``inputs`` taken before the command.
        inputs: The input roots to compare with ``before``.
        lines: How many lines stderr must have (None: any number, e.g. several recipe problems).
        fix: Whether the message must carry a ``fix:``.
    """
    err = res.stderr
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    got = [ln for ln in err.splitlines() if ln.strip()]
    assert got, "nothing on stderr"
    assert got[0].startswith(("error:", "interrupted")), err
    if lines is not None:
        assert len(got) == lines, err
    if fix:
        assert "fix:" in err, err
    assert "internal error" not in err, err
    if needle is not None:
        assert needle in err, err
    if out is not None:
        assert not out.exists() or (before is not None and str(out) in before), f"{out} was written"
        assert not leftovers(out), leftovers(out)
    if before is not None:
        assert snapshot(*inputs) == before, "an input changed"
