"""Opt-in round trip against the real Hugging Face Hub (skipped by default).

    MWAKIT_LIVE_HUB=1 HF_TOKEN=hf_... python -m pytest tests/hub -m live

It pushes a small merged adapter to a private repo (``MWAKIT_LIVE_HUB_REPO``, default
``<you>/mwakit-live-test``, created if missing and left in place), on the branch
``mwakit-live``, then downloads it back through an ``hf://`` reference pinned to the new commit
and checks the bytes. It needs a token with write access.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mwakit import api, hub
from mwakit.cli import main
from mwakit.recipe import HubTarget

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(
        os.environ.get("MWAKIT_LIVE_HUB") != "1", reason="live Hub test: set MWAKIT_LIVE_HUB=1"
    ),
]


def test_push_then_download_round_trip(
    tmp_path: Path, hub_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # tests/conftest.py sets it
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("MWAKIT_HUB_CACHE", str(tmp_path / "cache"))
    repo = os.environ.get("MWAKIT_LIVE_HUB_REPO") or f"{HfApi().whoami()['name']}/mwakit-live-test"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "select": {"run": str(hub_run), "last": 2},
                "device": "cpu",
                "output": {"path": str(tmp_path / "out")},
            }
        )
    )
    res = CliRunner().invoke(main, ["run", "-q", str(recipe)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    url = api.push(out, HubTarget(repo_id=repo, revision="mwakit-live"))
    sha = url.rstrip("/").rsplit("/", 1)[-1]
    assert len(sha) == 40, url
    folder, got = hub.download(hub.parse_hf_ref(f"hf://{repo}@{sha}"))
    assert got == sha
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (folder / name).read_bytes() == (out / name).read_bytes()
    token = os.environ.get("HF_TOKEN")
    if token:
        assert token not in res.output and token not in url
