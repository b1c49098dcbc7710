"""`mwakit run` reports how each dense ΔW was re-factorised and the worst truncation error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from mwakit.cli import main
from mwakit.lowrank import dense_delta
from mwakit.methods import ties
from tests.conftest import shaped_adapter

SHAPES = {"q_proj": (320, 288), "v_proj": (320, 64)}  # (in, out): sketched, dense SVD


def _adapter(folder: Path, seed: int) -> Path:
    return shaped_adapter(folder, seed, SHAPES)


def test_run_line_and_card_report_solvers_and_worst_error(tmp_path: Path) -> None:
    folders = [_adapter(tmp_path / f"a{i}", i) for i in range(3)]
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "method": "ties",
                "params": {"density": 0.5},
                "checkpoints": [{"path": str(f)} for f in folders],
                "lora_space": "delta",
                "delta_rank": 4,
                "output": {"path": str(out)},
            }
        )
    )
    res = CliRunner().invoke(main, ["run", str(recipe)])
    assert res.exit_code == 0, res.output
    line = res.stdout.strip().splitlines()[-1]
    m = re.search(r"truncation error max ([0-9.]+) at (\S+); re-factorised by: (.*)$", line)
    assert m, line
    assert m.group(2) == "base_model.model.model.layers.0.self_attn.q_proj"
    assert m.group(3) == "1 randomized sketch, 1 dense SVD"
    card = (out / "README.md").read_text()
    assert "re-factorised by: 1 randomized sketch, 1 dense SVD" in card
    # The reported worst error is the error of the written q_proj factors.
    merged = load_file(out / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = merged[f"{key}.lora_A.weight"].double(), merged[f"{key}.lora_B.weight"].double()
    assert a.shape == (4, 320) and b.shape == (288, 4)
    deltas = []
    for f in folders:
        t = load_file(f / "adapter_model.safetensors")
        deltas.append(dense_delta(t[f"{key}.lora_A.weight"], t[f"{key}.lora_B.weight"], 2.0))
    want = ties.merge(deltas, [1.0] * 3, ties.Params(density=0.5)).double()
    cfg = json.loads((out / "adapter_config.json").read_text())
    got = (cfg["lora_alpha"] / cfg["r"]) * (b @ a)
    err = float((want - got).norm() / want.norm())
    assert float(m.group(1)) == pytest.approx(err, rel=1e-2)  # printed to 3 digits
