"""`mwakit eval` on Hub references, from an offline Hub cache (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mwakit.cli import main

from ..conftest import MakeAdapter
from ..hub.conftest import build_cache, run_files


def test_hub_adapter_with_its_hub_base(
    tok_base: Path, make_adapter: MakeAdapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    run = tmp_path / "run"
    ck = make_adapter(run / "checkpoint-20", seed=3)
    cfg = json.loads((ck / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "hf://mwakit-test/tiny-llama"
    (ck / "adapter_config.json").write_text(json.dumps(cfg))
    cache = tmp_path / "hf-cache"
    build_cache(cache, "mwakit-test/tiny-run", run_files(run))
    build_cache(cache, "mwakit-test/tiny-llama", run_files(tok_base))
    monkeypatch.setenv("MWAKIT_HUB_CACHE", str(cache))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "w6 w7 w8"}) + "\n")

    runner = CliRunner()
    hub = runner.invoke(
        main, ["eval", "hf://mwakit-test/tiny-run/checkpoint-20", "--data", str(data), "--json"]
    )
    assert hub.exit_code == 0, hub.output
    local = runner.invoke(
        main, ["eval", str(ck), "--base", str(tok_base), "--data", str(data), "--json"]
    )
    assert local.exit_code == 0, local.output
    assert json.loads(hub.stdout)["base"] == "hf://mwakit-test/tiny-llama"
    assert json.loads(hub.stdout)["metrics"] == json.loads(local.stdout)["metrics"]
