"""``mwakit`` as a real process on a slow disk: each tensor read waits first.

Signal tests need a merge that is still running when the signal arrives; the tiny test adapters
merge in milliseconds. This wraps the real CLI and only slows `InputFiles.read_into` (the one
place input bytes are read, by the torch executor's `PreadReader` and the NumPy one alike) by
``MWAKIT_TEST_READ_DELAY`` seconds (default 0.05). Everything else — signal handling, the
atomic output folder, cleanup — is the shipped code.

``MWAKIT_TEST_KILL_BETWEEN_RENAMES=1`` also makes ``--force`` use the two-rename swap and
SIGKILLs the process right after the first rename (the old output moved aside, the new one not
yet in place): the state a power cut or ``kill -9`` can leave.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from mwakit.io import atomic, files

_DELAY = float(os.environ.get("MWAKIT_TEST_READ_DELAY", "0.05"))
_real_read = files.InputFiles.read_into


def _slow_read(self: files.InputFiles, path: Path, offset: int, out: memoryview) -> None:
    time.sleep(_DELAY)
    _real_read(self, path, offset, out)


files.InputFiles.read_into = _slow_read  # type: ignore[method-assign]

if os.environ.get("MWAKIT_TEST_KILL_BETWEEN_RENAMES") == "1":
    _real_rename = os.rename

    def _rename_then_die(src: str | Path, dst: str | Path) -> None:
        _real_rename(src, dst)
        if str(dst).endswith(f"{os.sep}x"):  # the old output was just moved aside
            os.kill(os.getpid(), signal.SIGKILL)

    atomic._exchange = lambda a, b: False  # type: ignore[assignment]
    atomic.os.rename = _rename_then_die  # type: ignore[assignment]

if __name__ == "__main__":
    from mwakit.cli import main

    sys.exit(main())
