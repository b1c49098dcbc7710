"""Termination signals unwind like Ctrl-C, so every cleanup (the atomic output folder) runs.

Python turns SIGINT into KeyboardInterrupt; SIGTERM (what ``kill``, systemd, Slurm and
Kubernetes send) and SIGHUP (a closed terminal) kill the process outright by default, leaving
temporary folders behind. Under `terminate_on_signals` they raise `Terminated`, a
KeyboardInterrupt, instead: ``finally`` blocks and context managers run, and the CLI exits with
128 + the signal number (143, 129) and one line.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by a signal (SIGTERM, SIGHUP).

    A KeyboardInterrupt subclass, so code that cleans up after Ctrl-C cleans up after it too.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(self.name)

    @property
    def exit_code(self) -> int:
        """The shell's convention for death by a signal: 128 + its number."""
        return 128 + self.signum


def _signals() -> list[signal.Signals]:
    return [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s]


@contextmanager
def terminate_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise `Terminated` in the main thread.

    A second signal while the first unwinds is ignored, so the cleanup it triggered is not cut
    short. The previous handlers come back on exit. Outside the main thread (where Python
    cannot set handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if fired:
            return  # already unwinding: let the cleanup finish
        fired.append(signum)
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in _signals()}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def deferred_signals() -> Callable[[], None]:
    """Hold SIGINT, SIGTERM and SIGHUP back from this (main) thread until the returned
    function is called; one that arrived meanwhile is then delivered.

    For a few statements that must not be cut apart (a folder created and the ``try`` that
    removes it on failure entered): a signal between them would skip the cleanup. Where
    signals cannot be masked (not the main thread, no ``pthread_sigmask``) nothing is held.
    """
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None or threading.current_thread() is not threading.main_thread():
        return lambda: None
    held = {signal.SIGINT, *_signals()}
    before = mask(signal.SIG_BLOCK, held)

    def release() -> None:
        mask(signal.SIG_SETMASK, before)

    return release


@contextmanager
def signals_held() -> Iterator[None]:
    """`deferred_signals` over a block: what arrives during it is delivered at its end.

    For imports made while other threads may import too: a signal whose handler raises inside
    importlib's locking can leave the global import lock held, and every other thread's next
    import then waits forever (seen: the card's thread, while the CLI waited for it to finish).
    """
    release = deferred_signals()
    try:
        yield
    finally:
        release()
