"""A base model on the Hub (``hf://org/repo``), from an offline Hub cache: baked the same as
the local folder, named in the card's ``base_model``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mwakit.bake import bake
from tests.bake.reference import build_adapter, load_folder
from tests.hub.conftest import SHA, build_cache, run_files

BASE_ID = "mwakit-test/tiny-llama"


@pytest.fixture
def hub_base(tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hf-cache"
    build_cache(cache, BASE_ID, run_files(tiny_base))
    monkeypatch.setenv("MWAKIT_HUB_CACHE", str(cache))
    return f"hf://{BASE_ID}"


def test_bake_into_a_hub_base(hub_base: str, tiny_base: Path, tmp_path: Path) -> None:
    adapter = build_adapter(tiny_base, tmp_path / "adapter", use_dora=True)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = BASE_ID  # as a Trainer run on the Hub model writes it
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    res = bake(adapter, hub_base, tmp_path / "hub")
    local = bake(adapter, tiny_base, tmp_path / "local")
    a, b = load_folder(res.path), load_folder(local.path)
    assert sorted(a) == sorted(b) and all(a[k].equal(b[k]) for k in a)
    assert res.warnings == []  # the adapter names this very base
    card = (res.path / "README.md").read_text()
    assert f"base_model: {BASE_ID}\nbase_model_relation: merge" in card
    assert local.warnings and "names base" in local.warnings[0]  # a local copy: said once
    assert f"--base hf://{BASE_ID}@{SHA} " in card  # pinned to the commit it resolved to
