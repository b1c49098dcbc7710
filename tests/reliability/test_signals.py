"""Signals and kills (issue 8 §4), on real processes: SIGINT, SIGTERM and SIGHUP clean up and
exit 130/143/129 with one line; after SIGKILL — mid-merge or between the two renames of
--force — the next run repairs what was left, and never touches a live run's folder."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from .harness import invoke, snapshot
from .io_fixtures import recipe, run, run_src, spawn, temp_dirs, wait_for

__all__ = ["run", "run_src"]


def _start(
    tmp_path: Path, run: Path, *extra: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], Path]:
    out = tmp_path / "out"
    proc = spawn("run", recipe(tmp_path, out, select={"run": str(run)}), *extra, env=env)
    # The temporary folder appears once the plan is made and streaming starts.
    wait_for(lambda: bool(temp_dirs(out)), proc, "the merge to start")
    return proc, out


@pytest.mark.parametrize(
    ("sig", "code", "line"),
    [
        (signal.SIGINT, 130, "interrupted: stopped, no partial output left"),
        (signal.SIGTERM, 143, "interrupted by SIGTERM: stopped, no partial output left"),
        (signal.SIGHUP, 129, "interrupted by SIGHUP: stopped, no partial output left"),
    ],
)
def test_signal_cleans_up_like_ctrl_c(
    tmp_path: Path, run: Path, sig: signal.Signals, code: int, line: str
) -> None:
    before = snapshot(run)
    proc, out = _start(tmp_path, run)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, (stdout, stderr)
    assert stderr.strip().splitlines() == [line]
    assert "Traceback" not in stderr
    assert not out.exists() and temp_dirs(out) == []
    assert snapshot(run) == before


def test_live_folder_kept_then_sigkill_leftover_removed_by_the_next_run(
    tmp_path: Path, run: Path
) -> None:
    # A slow disk (1 s per read) so the first run is still alive when the second one finishes,
    # however loaded the machine is; it is killed, never waited for.
    proc, out = _start(tmp_path, run, env={"MWAKIT_TEST_READ_DELAY": "1"})
    (theirs,) = temp_dirs(out)
    other = tmp_path / "other"
    other.mkdir()
    # Another run on the same output while the first is alive: its folder is left alone.
    res = invoke("run", recipe(other, out, select={"run": str(run)}))
    assert res.exit_code == 0, res.output
    assert theirs.is_dir()
    proc.kill()  # a kill cannot clean up ...
    proc.wait(timeout=60)
    assert temp_dirs(out) == [theirs]
    res = invoke("run", recipe(other, out, select={"run": str(run)}), "--force")
    assert res.exit_code == 0, res.output  # ... the next run on that output does
    assert not theirs.exists() and temp_dirs(out) == []
    assert (out / "adapter_model.safetensors").is_file()


def test_kill_between_the_two_renames_of_force_then_rerun(tmp_path: Path, run: Path) -> None:
    out = tmp_path / "out"
    r = recipe(tmp_path, out, select={"run": str(run)})
    assert invoke("run", r).exit_code == 0
    old = (out / "adapter_model.safetensors").read_bytes()
    r2 = recipe(tmp_path, out, select={"run": str(run)}, params={"metric": "loss", "penalty": 4.0})
    env = {"MWAKIT_TEST_KILL_BETWEEN_RENAMES": "1", "MWAKIT_TEST_READ_DELAY": "0"}
    proc = spawn("run", r2, "--force", env=env)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "killed with the old output moved aside and the new one not in"
    assert len(temp_dirs(out)) == 2
    # The next run puts the previous output back before anything else: never no output.
    res = invoke("run", r2)
    assert res.exit_code == 1 and "already exists" in res.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == old
    assert temp_dirs(out) == []
    res = invoke("run", r2, "--force")
    assert res.exit_code == 0, res.output
    assert (out / "adapter_model.safetensors").read_bytes() != old
