"""Same recipe, same bytes: across runs and across torch thread counts (issue 8).

Each merge runs in child processes with ``MWAKIT_THREADS`` (the merge's thread policy),
``OMP_NUM_THREADS`` and ``torch.set_num_threads`` 1 and 2 (and 2 again): every output tensor
file must have the same sha256. The adapters' 320×288 module is large enough for the randomized
re-factorisation (`mwakit.rsvd`), the 64×320 one gets the dense SVD, so both delta_rank paths
are covered, with the QR + small SVD path of linear merges.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.conftest import shaped_adapter

CHILD = """
import hashlib, json, sys
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[1]))
import mwakit.execute as ex
from mwakit.api import plan
from mwakit.execute import execute
seen = set()
inner = ex.dense_refactor
def spy(*a, **k):
    seen.add(torch.get_num_threads())  # the thread count the merge really computes with
    return inner(*a, **k)
ex.dense_refactor = spy
doc = {"threads": torch.get_num_threads(), "runs": {}}
for spec in sys.argv[3:]:
    name, recipe, out = spec.split("=")
    Path(out).mkdir(parents=True, exist_ok=True)
    # The tensor files exactly as `mwakit run` writes them (card and plot are not merged data).
    stats = execute(plan(recipe), Path(out))
    files = sorted(Path(out).glob("*.safetensors"))
    digest = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    doc["runs"][name] = {"sha256": digest, "solvers": sorted(set(stats.solvers.values()))}
doc["in_merge"] = sorted(seen)
Path(sys.argv[2]).write_text(json.dumps(doc))
"""

MODULES = {"q_proj": (320, 288), "v_proj": (320, 64)}  # name: (in, out)


def _adapter(folder: Path, seed: int) -> Path:
    return shaped_adapter(folder, seed, MODULES, layers=2)


def _model(folder: Path, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def _recipe(path: Path, folders: list[Path], **kw: Any) -> Path:
    data = {
        "checkpoints": [{"path": str(f)} for f in folders],
        "device": "cpu",
        "output": {"path": str(path.with_suffix("")), "overwrite": True},
        **kw,
    }
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def recipes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("determinism")
    adapters = [_adapter(tmp / f"adapter-{i}", i) for i in range(3)]
    models = [_model(tmp / f"model-{i}", i) for i in range(3)]
    base = _model(tmp / "base", 99)
    delta = {"lora_space": "delta", "delta_rank": 4}
    return {
        "linear": _recipe(tmp / "linear.yaml", adapters, method="linear"),
        "task_arithmetic_svd": _recipe(
            tmp / "ta.yaml", adapters, method="task_arithmetic", **delta
        ),
        "ties": _recipe(
            tmp / "ties.yaml", adapters, method="ties", params={"density": 0.5}, **delta
        ),
        "dare_ties": _recipe(
            tmp / "dare.yaml",
            adapters,
            method="dare_ties",
            params={"drop_rate": 0.5, "seed": 3},
            **delta,
        ),
        "full_linear": _recipe(tmp / "full-linear.yaml", models, method="linear"),
        "full_ties": _recipe(
            tmp / "full-ties.yaml",
            models,
            method="ties",
            base_model=str(base),
            params={"density": 0.5},
        ),
    }


def _run(threads: int, recipes: dict[str, Path], out: Path) -> dict[str, Any]:
    n = str(threads)  # MWAKIT_THREADS: execute's thread policy (1 unless told otherwise)
    env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "MWAKIT_THREADS": n}
    result = out / f"hashes-{threads}-{len(list(out.glob('hashes-*')))}.json"
    runs = len(list(out.glob("hashes-*")))
    specs = [f"{name}={path}={out / f'{name}-{threads}-{runs}'}" for name, path in recipes.items()]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(threads), str(result), *specs],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc: dict[str, Any] = json.loads(result.read_text())
    assert doc["threads"] == threads and doc["in_merge"] == [threads]
    return doc["runs"]


@pytest.mark.slow
def test_same_bytes_for_one_and_two_threads_and_twice(
    recipes: dict[str, Path], tmp_path: Path
) -> None:
    one = _run(1, recipes, tmp_path)
    two = _run(2, recipes, tmp_path)
    again = _run(2, recipes, tmp_path)
    assert set(one) == set(recipes)
    for name in recipes:
        assert one[name]["sha256"], name
        assert one[name]["sha256"] == two[name]["sha256"], f"{name}: 1 vs 2 threads"
        assert two[name]["sha256"] == again[name]["sha256"], f"{name}: two runs"
    # The delta_rank merges of task-vector methods went through the randomized sketch (the
    # 320×288 modules) and the dense SVD (the 64×320 ones).
    assert one["ties"]["solvers"] == one["dare_ties"]["solvers"] == ["exact", "randomized"]
    assert one["linear"]["solvers"] == one["task_arithmetic_svd"]["solvers"] == []
