"""Inputs for the I/O, signal and hostile-file cases: real adapters, real full models, recipes.

Built once per session and copied per test (a tiny adapter is ~100 KB), so a case may damage
its own copy freely. Test modules import the fixtures they use from here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import MakeAdapter, trainer_state

ROOT = Path(__file__).resolve().parents[2]
LOSSES = {10: 1.0, 20: 0.5}


def _log(step: int, loss: float) -> list[tuple[int, float]]:
    # Loss 2.0 early on, then the checkpoint's loss at every step since the previous save
    # (save_steps 5): the default loss_window, since_save, and loss_window: 1 both read it.
    return [(s, 2.0) for s in range(1, step - 4)] + [(s, loss) for s in range(step - 4, step + 1)]


@pytest.fixture(scope="session")
def run_src(make_adapter: MakeAdapter, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Trainer-style run: checkpoint-10 and checkpoint-20 with trainer_state.json."""
    run = tmp_path_factory.mktemp("rel-run") / "run"
    for i, (step, loss) in enumerate(LOSSES.items()):
        st = trainer_state(step, _log(step, loss))
        make_adapter(run / f"checkpoint-{step}", seed=i, r=4, lora_alpha=8, state=st)
    return run


@pytest.fixture
def run(run_src: Path, tmp_path: Path) -> Path:
    """This test's own copy of the run."""
    return Path(shutil.copytree(run_src, tmp_path / "run"))


@pytest.fixture(scope="session")
def model_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny full models (3 shards each, with an index) and side files, plus their base."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("rel-models")
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    for i, name in enumerate(("base", "a", "b")):
        torch.manual_seed(i)
        model = LlamaForCausalLM(cfg)
        model.save_pretrained(root / name, safe_serialization=True, max_shard_size="8KB")
        (root / name / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    return root


@pytest.fixture
def models(model_src: Path, tmp_path: Path) -> Path:
    """This test's own copy of the full models."""
    return Path(shutil.copytree(model_src, tmp_path / "models"))


def recipe(tmp: Path, out: Path | None = None, **kw: Any) -> Path:
    """Write a recipe: MWA over ``select`` / ``checkpoints`` given in ``kw``, output ``out``."""
    data: dict[str, Any] = {
        "method": "mwa",
        "params": {"metric": "loss", "penalty": 1.0},
        "device": "cpu",
        "output": {"path": str(out or tmp / "out")},
    }
    data.update(kw)
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(data), encoding="utf-8")
    return p


def full_recipe(tmp: Path, models: Path, out: Path | None = None, **kw: Any) -> Path:
    """A linear merge of the two full models (explicit weights)."""
    return recipe(
        tmp,
        out,
        method="linear",
        params={},
        checkpoints=[
            {"path": str(models / "a"), "weight": 0.25},
            {"path": str(models / "b"), "weight": 0.75},
        ],
        **kw,
    )


def shards(folder: Path) -> list[str]:
    """The shard names of a model folder's index, in index order."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return list(dict.fromkeys(index["weight_map"].values()))


# -- subprocesses ---------------------------------------------------------------------------

SLOW_CLI = Path(__file__).with_name("slow_cli.py")


def spawn(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``mwakit`` in a real process (through `slow_cli`, a disk that takes a while per read)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(
        [sys.executable, str(SLOW_CLI), *map(str, args)],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(cond: Any, proc: subprocess.Popen[str], what: str, timeout: float = 60.0) -> None:
    """Poll ``cond()`` until true; fail with the process's output if it exits first."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process exited ({proc.returncode}) before {what}: {out}{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def temp_dirs(out: Path) -> list[Path]:
    """mwakit's temporary folders beside ``out`` (any stem length)."""
    if not out.parent.is_dir():
        return []
    return [p for p in out.parent.iterdir() if ".mwakit-tmp-" in p.name or ".mwakit-old-" in p.name]
