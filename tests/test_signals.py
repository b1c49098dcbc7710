"""signals: termination signals unwind; deferred_signals holds them over a critical step."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from mwakit.io import atomic
from mwakit.signals import Terminated, deferred_signals, terminate_on_signals


def test_a_signal_held_back_is_delivered_on_release() -> None:
    release = deferred_signals()
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(1000):  # held: unmasked, the handler would raise in this loop (outside
        pass  # the pytest.raises below, failing the test)
    with pytest.raises(KeyboardInterrupt):
        release()
        for _ in range(1000):  # the handler runs at the next bytecode boundaries
            pass


def test_sigterm_held_back_unwinds_as_terminated() -> None:
    with terminate_on_signals():
        release = deferred_signals()
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(Terminated):
            release()
            for _ in range(1000):
                pass


def test_ctrl_c_right_after_the_folder_is_made_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The signal arrives the instant the temporary folder exists, before the block that
    # removes it on failure is entered: it is held until then, and the folder goes.
    real = atomic._make_temp

    def make_then_interrupt(target: Path, kind: str) -> Path:
        tmp = real(target, kind)
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # unmasked, the handler would raise here, inside _make_temp
            pass
        return tmp

    monkeypatch.setattr(atomic, "_make_temp", make_then_interrupt)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), atomic.atomic_output_dir(out, False):
        for _ in range(1000):
            pass
    assert os.listdir(tmp_path) == []
