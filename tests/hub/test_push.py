"""Pushes against a fake at the HfApi boundary that records the calls."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from mwakit import api
from mwakit.cli import main
from mwakit.errors import HubError, UsageError
from mwakit.recipe import HubTarget

from .conftest import SECRET, FakeApi

FILES = [
    ".mwakit-manifest.json",
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "mwakit.yaml",
    "weights.png",
]


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _recipe(tmp: Path, run: Path, hub: dict[str, Any] | None = None) -> Path:
    data: dict[str, Any] = {
        "method": "mwa",
        "params": {"metric": "loss", "penalty": 1.0},
        "select": {"run": str(run)},
        "device": "cpu",
        "output": {"path": str(tmp / "out"), **({"hub": hub} if hub else {})},
    }
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(data), encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def merged(hub_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished output folder."""
    tmp = tmp_path_factory.mktemp("merged")
    res = _invoke("run", "-q", str(_recipe(tmp, hub_run)))
    assert res.exit_code == 0, res.output
    return tmp / "out"


def _no_secret(*texts: str, folder: Path | None = None) -> None:
    for t in texts:
        assert SECRET not in t
    if folder is not None:
        for p in folder.rglob("*"):
            if p.is_file():
                assert SECRET.encode() not in p.read_bytes(), p


def test_push_creates_private_repo_and_uploads_one_commit(
    merged: Path, fake_api: FakeApi, token: str
) -> None:
    url = api.push(merged, "me/merged")
    assert url == "https://huggingface.co/me/merged/commit/" + "f" * 40
    assert fake_api.names() == ["create_repo", "upload_folder"]
    assert fake_api.call("create_repo") == {
        "repo_id": "me/merged",
        "private": True,
        "exist_ok": True,
    }
    up = fake_api.call("upload_folder")
    assert up["repo_id"] == "me/merged" and Path(up["folder_path"]) == merged
    assert up["revision"] is None and not up["create_pr"]
    assert "mwakit" in up["commit_message"]
    assert sorted(fake_api.uploaded) == FILES
    assert "token" not in up  # the token is left to huggingface_hub


def test_push_with_revision_creates_the_branch(merged: Path, fake_api: FakeApi, token: str) -> None:
    target = HubTarget(repo_id="me/merged", private=False, revision="v1", commit_message="m1")
    api.push(merged, target)
    assert fake_api.names() == ["create_repo", "create_branch", "upload_folder"]
    assert fake_api.call("create_repo")["private"] is False
    assert fake_api.call("create_branch") == {
        "repo_id": "me/merged",
        "branch": "v1",
        "exist_ok": True,
    }
    up = fake_api.call("upload_folder")
    assert up["revision"] == "v1" and up["commit_message"] == "m1"


def test_push_create_pr_returns_the_pr(merged: Path, fake_api: FakeApi, token: str) -> None:
    url = api.push(merged, HubTarget(repo_id="me/merged", create_pr=True))
    assert url == "https://huggingface.co/me/merged/discussions/1"
    assert fake_api.call("upload_folder")["create_pr"] is True
    with pytest.raises(UsageError, match="create_pr and revision"):
        api.hub_target("me/merged", revision="v1", create_pr=True)


def test_cli_push_prints_the_commit_url(
    merged: Path, fake_api: FakeApi, token: str, caplog: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    res = _invoke("push", str(merged), "--repo-id", "me/merged", "--public", "-m", "hello")
    assert res.exit_code == 0, res.output
    assert res.output.strip() == "pushed: https://huggingface.co/me/merged/commit/" + "f" * 40
    assert fake_api.call("create_repo")["private"] is False
    assert fake_api.call("upload_folder")["commit_message"] == "hello"
    _no_secret(res.output, caplog.text, folder=merged)


def test_cli_push_errors(merged: Path, fake_api: FakeApi, tmp_path: Path) -> None:
    res = _invoke("push", str(merged), "--repo-id", "me/merged")  # no token
    assert res.exit_code == 1
    assert res.output.count("\n") == 1 and "no Hub token" in res.output
    assert "hf auth login" in res.output and "HF_TOKEN" in res.output
    assert fake_api.calls == []
    res = _invoke("push", str(tmp_path / "nope"), "--repo-id", "me/merged")
    assert res.exit_code == 1 and "nothing to upload" in res.output
    res = _invoke("push", str(merged), "--repo-id", "me/merged", "--revision", "v1", "--create-pr")
    assert res.exit_code == 2 and "create_pr and revision" in res.output
    res = _invoke("push", str(merged), "--repo-id", "not a repo")
    assert res.exit_code == 2 and "repo_id" in res.output
    res = CliRunner().invoke(main, ["push", str(merged)])
    assert res.exit_code == 2 and "--repo-id" in res.output


def test_run_pushes_after_the_output_is_complete(
    tmp_path: Path, hub_run: Path, fake_api: FakeApi, token: str, caplog: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    recipe = _recipe(tmp_path, hub_run, hub={"repo_id": "me/merged", "revision": "exp"})
    res = _invoke("run", str(recipe))
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    assert (
        res.output.splitlines()[-1] == "pushed: https://huggingface.co/me/merged/commit/" + "f" * 40
    )
    assert fake_api.names() == ["create_repo", "create_branch", "upload_folder"]
    assert fake_api.call("create_repo")["private"] is True
    # Everything the folder holds went up in the one commit, byte for byte.
    assert fake_api.uploaded == {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(fake_api.uploaded) == FILES
    # The resolved recipe does not push again when someone re-runs it.
    assert "hub" not in yaml.safe_load((out / "mwakit.yaml").read_text())["output"]
    _no_secret(res.output, caplog.text, folder=out)


def test_run_no_push_and_repo_id(
    tmp_path: Path, hub_run: Path, fake_api: FakeApi, token: str
) -> None:
    recipe = _recipe(tmp_path, hub_run, hub={"repo_id": "me/merged"})
    res = _invoke("run", "--no-push", str(recipe))
    assert res.exit_code == 0 and "pushed" not in res.output
    assert fake_api.calls == []
    res = _invoke("run", "-f", "--repo-id", "me/other", str(recipe))
    assert res.exit_code == 0, res.output
    assert fake_api.call("create_repo")["repo_id"] == "me/other"


def test_run_push_without_target_is_a_usage_error(
    tmp_path: Path, hub_run: Path, fake_api: FakeApi
) -> None:
    res = _invoke("run", "--push", str(_recipe(tmp_path, hub_run)))
    assert res.exit_code == 2, res.output
    assert "output.hub" in res.output and "--repo-id" in res.output
    assert not (tmp_path / "out").exists() and fake_api.calls == []


def test_run_push_without_token_fails_before_merging(
    tmp_path: Path, hub_run: Path, fake_api: FakeApi
) -> None:
    res = _invoke("run", str(_recipe(tmp_path, hub_run, hub={"repo_id": "me/merged"})))
    assert res.exit_code == 1
    assert len(res.output.strip().splitlines()) == 1
    assert "no Hub token" in res.output and "--no-push" in res.output
    assert not (tmp_path / "out").exists() and fake_api.calls == []


def test_failed_upload_keeps_the_output_and_says_how_to_retry(
    tmp_path: Path, hub_run: Path, fake_api: FakeApi, token: str
) -> None:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    request = httpx2.Request("POST", "https://huggingface.co/api/models/me/merged/commit/main")
    response = httpx2.Response(403, request=request)
    fake_api.fail_upload = HfHubHTTPError(f"403 Forbidden (token {SECRET})", response=response)
    res = _invoke("run", str(_recipe(tmp_path, hub_run, hub={"repo_id": "me/merged"})))
    assert res.exit_code == 1
    (line,) = res.output.strip().splitlines()
    out = tmp_path / "out"
    assert "upload failed" in line and "write access" in line
    assert f"mwakit push {out} --repo-id me/merged --private" in line
    assert sorted(p.name for p in out.iterdir()) == FILES
    _no_secret(res.output, folder=out)
    # The retry it suggests works.
    fake_api.fail_upload = None
    res = _invoke("push", str(out), "--repo-id", "me/merged", "--private")
    assert res.exit_code == 0 and "pushed: " in res.output


def test_hub_error_never_carries_the_token(merged: Path, fake_api: FakeApi, token: str) -> None:
    fake_api.fail_upload = RuntimeError(f"boom {SECRET}")
    with pytest.raises(RuntimeError):  # not a Hub error: propagates as an internal error
        api.push(merged, "me/merged")
    import httpx2

    fake_api.fail_upload = httpx2.ConnectError(f"no route {SECRET}")
    with pytest.raises(HubError) as exc:
        api.push(merged, "me/merged")
    assert SECRET not in exc.value.message and "cannot reach the Hub" in exc.value.message
