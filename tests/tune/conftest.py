"""Fixtures for tune: a tiny Llama with a tokenizer, a 5-checkpoint LoRA run, VAL/TEST rows."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import MakeAdapter, trainer_state
from tests.evaluate.conftest import BOS, EOS, PAD, WORDS, save_tokenizer

LOSSES = (1.9, 1.5, 1.3, 1.25, 1.32)


@pytest.fixture(scope="session")
def tune_base(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama of the adapters, with the evaluator tests' word tokenizer."""
    out = tmp_path_factory.mktemp("tunebase") / "base"
    shutil.copytree(tiny_base, out)
    cfg = json.loads((out / "generation_config.json").read_text())
    cfg.update(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    (out / "generation_config.json").write_text(json.dumps(cfg))
    return save_tokenizer(out)


@pytest.fixture(scope="session")
def tune_run(make_adapter: MakeAdapter, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """checkpoint-5 … checkpoint-25: real PEFT adapters (random, distinct) with Trainer states
    logging every step (save_steps 5)."""
    run = tmp_path_factory.mktemp("tunerun") / "run"
    for i, loss in enumerate(LOSSES):
        step = 5 * (i + 1)
        rng = random.Random(i)
        log = [(s, loss + rng.uniform(-0.2, 0.2)) for s in range(1, step + 1)]
        make_adapter(run / f"checkpoint-{step}", seed=10 + i, state=trainer_state(step, log))
    return run


def _rows(path: Path, seed: int, n: int) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [WORDS[rng.randrange(len(WORDS))] for _ in range(rng.randint(3, 7))]
        lines.append(json.dumps({"prompt": " ".join(words[:2]), "completion": " ".join(words[2:])}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def val_test(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """12 VAL and 12 TEST prompt/completion rows."""
    d = tmp_path_factory.mktemp("tunedata")
    return _rows(d / "val.jsonl", 1, 12), _rows(d / "test.jsonl", 2, 12)


def write_recipe(tmp: Path, run: Path, **kw: object) -> Path:
    """A recipe over the run's checkpoints."""
    data = {
        "method": "mwa",
        "params": {"metric": "loss", "penalty": 1.0},
        "select": {"run": str(run)},
        "device": "cpu",
        "output": {"path": str(tmp / "merged")},
        **kw,
    }
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(data), encoding="utf-8")
    return p
