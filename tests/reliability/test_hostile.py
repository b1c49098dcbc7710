"""Hostile files (issue 8 §5): nothing escapes its folder, nothing planted is merged, no pickle
runs code, no token shows up in a message, a traceback or an output."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mwakit.io.reader import _private_cache

from .harness import assert_clean_failure, invoke, snapshot
from .io_fixtures import full_recipe, model_src, models, recipe, run, run_src, shards

__all__ = ["model_src", "models", "run", "run_src"]

SECRET = "hf_PlantedSecretT0kenNeverShown987654"


# -- symlinks and names out of the folder ------------------------------------------------------


def test_side_file_symlinked_to_a_secret_is_refused(tmp_path: Path, models: Path) -> None:
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN PRIVATE KEY-----")
    (models / "a" / "tokenizer.json").symlink_to(secret)
    out = tmp_path / "out"
    before = snapshot(models)
    res = invoke("run", full_recipe(tmp_path, models, out))
    assert_clean_failure(
        res, needle="side file tokenizer.json is a symlink", out=out, before=before,
        inputs=[models],
    )  # fmt: skip
    assert "outside the checkpoint folder" in res.stderr


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink-out"])
def test_shard_names_cannot_leave_the_model_folder(tmp_path: Path, models: Path, kind: str) -> None:
    a = models / "a"
    index_file = a / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    first = shards(a)[0]
    if kind == "symlink-out":
        (a / first).unlink()
        (a / first).symlink_to(models / "b" / first)
    else:
        name = str(models / "b" / first) if kind == "absolute" else f"../b/{first}"
        index["weight_map"] = {
            k: (name if v == first else v) for k, v in index["weight_map"].items()
        }
        index_file.write_text(json.dumps(index))
    out = tmp_path / "out"
    before = snapshot(models)
    res = invoke("run", full_recipe(tmp_path, models, out))
    needle = "is a symlink to" if kind == "symlink-out" else "points outside the folder"
    assert_clean_failure(res, needle=needle, out=out, before=before, inputs=[models])


def test_hub_snapshot_links_into_blobs_still_work(tmp_path: Path, models: Path) -> None:
    from tests.hub.conftest import build_cache

    cache = tmp_path / "hf"
    snaps = []
    for name in ("a", "b"):
        files = {p.name: p.read_bytes() for p in (models / name).iterdir()}
        snaps.append(build_cache(cache, f"org/{name}", files, sha=f"{ord(name):040x}"))
    assert (snaps[0] / "config.json").is_symlink()
    assert os.readlink(snaps[0] / "config.json").startswith("../../blobs/")
    out = tmp_path / "out"
    r = full_recipe(tmp_path, models, out)
    doc = (
        r.read_text()
        .replace(str(models / "a"), str(snaps[0]))
        .replace(str(models / "b"), str(snaps[1]))
    )
    r.write_text(doc)
    res = invoke("run", r)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"model_max_length": 64}
    assert not (out / "config.json").is_symlink()


# -- pickles ---------------------------------------------------------------------------------


def _as_pickle(folder: Path) -> Path:
    st = folder / "adapter_model.safetensors"
    torch.save(load_file(st), folder / "adapter_model.bin")
    st.unlink()
    return folder / "adapter_model.bin"


def _pickle_recipe(tmp: Path, run: Path, out: Path) -> Path:
    return recipe(tmp, out, select={"run": str(run)}, allow_pickle=True)


def _reference(tmp: Path, run: Path) -> bytes:
    """The merge of the genuine adapters (safetensors), to compare against."""
    ref_out = tmp / "ref-out"
    res = invoke("run", recipe(tmp / "ref", ref_out, select={"run": str(run)}))
    assert res.exit_code == 0, res.output
    return (ref_out / "adapter_model.safetensors").read_bytes()


@pytest.fixture
def ref_dir(tmp_path: Path) -> Path:
    (tmp_path / "ref").mkdir()
    return tmp_path


def test_planted_file_at_the_old_shared_temp_path_is_ignored(
    ref_dir: Path, run: Path, tmp_path: Path
) -> None:
    expected = _reference(ref_dir, run)
    for ck in sorted(run.iterdir()):
        pk = _as_pickle(ck)
        st = pk.stat()
        key = hashlib.sha256(f"{pk.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
        planted = Path(tempfile.gettempdir()) / "mwakit-pickle" / key[:16]
        planted.mkdir(parents=True, exist_ok=True)
        sd = {k: torch.zeros_like(v) for k, v in torch.load(pk, weights_only=True).items()}
        save_file(sd, planted / "adapter_model.safetensors")
    out = tmp_path / "out"
    res = invoke("run", _pickle_recipe(tmp_path, run, out))
    assert res.exit_code == 0, res.output
    assert (out / "adapter_model.safetensors").read_bytes() == expected
    cache = _private_cache()
    assert cache.stat().st_mode & 0o777 == 0o700


def test_planted_or_stale_cache_entry_is_rebuilt_not_merged(
    ref_dir: Path, run: Path, tmp_path: Path
) -> None:
    expected = _reference(ref_dir, run)
    cache = _private_cache()
    for ck in sorted(run.iterdir()):
        pk = _as_pickle(ck)
        sha = hashlib.sha256(pk.read_bytes()).hexdigest()
        sd = {k: torch.full_like(v, 7.0) for k, v in torch.load(pk, weights_only=True).items()}
        # Forged metadata naming the source, but no digest of the file itself that matches.
        save_file(sd, cache / f"{sha}.safetensors", metadata={"mwakit_source_sha256": sha})
        (cache / f"{sha}.sha256").write_text("0" * 64)
    out = tmp_path / "out"
    res = invoke("run", _pickle_recipe(tmp_path, run, out))
    assert res.exit_code == 0, res.output
    assert (out / "adapter_model.safetensors").read_bytes() == expected


def test_cache_folder_someone_else_may_write_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "shared-cache"
    (root / "pickle").mkdir(parents=True)
    os.chmod(root / "pickle", 0o777)
    try:
        os.chown(root / "pickle", 65534, 65534)  # "nobody" owns it
    except PermissionError:
        pytest.skip("needs root to hand a folder to another user")
    monkeypatch.setenv("MWAKIT_CACHE", str(root))
    folder = _private_cache()
    assert folder != root / "pickle"
    st = folder.stat()
    assert st.st_uid == os.getuid() and st.st_mode & 0o777 == 0o700
    # A cache folder of ours that is too open is closed down instead.
    (root / "mine").mkdir()
    os.chmod(root / "mine", 0o777)
    monkeypatch.setenv("MWAKIT_CACHE", str(root / "mine"))
    (root / "mine" / "pickle").mkdir()
    os.chmod(root / "mine" / "pickle", 0o777)
    assert _private_cache() == root / "mine" / "pickle"
    assert (root / "mine" / "pickle").stat().st_mode & 0o777 == 0o700


class _RunsCode:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.path}",))


def test_malicious_pickle_is_refused_in_one_line_without_running(tmp_path: Path, run: Path) -> None:
    pwned = tmp_path / "pwned"
    ck = run / "checkpoint-20"
    pk = _as_pickle(ck)
    torch.save({"x": _RunsCode(pwned)}, pk)
    _as_pickle(run / "checkpoint-10")
    out = tmp_path / "out"
    before = snapshot(run)
    res = invoke("run", _pickle_recipe(tmp_path, run, out))
    assert_clean_failure(
        res, needle="cannot load pickle weights safely, refused", out=out, before=before,
        inputs=[run],
    )  # fmt: skip
    assert "unsupported global" in res.stderr.lower() and "system" in res.stderr
    assert "weights_only" not in res.stderr, "never advise turning the safety off"
    assert not pwned.exists(), "the payload did not run"


# -- tokens ----------------------------------------------------------------------------------


@pytest.fixture
def secret_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    return SECRET


def _failing_hub(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoUrl

    def create_repo(self: Any, repo_id: str, **kw: Any) -> Any:
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self: Any, **kw: Any) -> Any:
        raise exc

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def _leaky_error() -> BaseException:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    request = httpx2.Request(
        "POST", "https://huggingface.co/api/models/me/x/commit/main",
        headers={"authorization": f"Bearer {SECRET}"},
    )  # fmt: skip
    response = httpx2.Response(500, request=request)
    try:
        raise RuntimeError(f"proxy said: bad header 'Bearer {SECRET}'")
    except RuntimeError as inner:
        try:
            raise HfHubHTTPError(
                f"500 Server Error (Bearer {SECRET})", response=response
            ) from inner
        except HfHubHTTPError as err:
            return err


@pytest.mark.parametrize("debug", [False, True])
def test_no_token_in_a_failed_push_message_or_debug_trace(
    tmp_path: Path, run: Path, monkeypatch: pytest.MonkeyPatch, secret_token: str, debug: bool
) -> None:
    _failing_hub(monkeypatch, _leaky_error())
    out = tmp_path / "out"
    r = recipe(
        tmp_path,
        out,
        select={"run": str(run)},
        output={"path": str(out), "hub": {"repo_id": "me/x"}},
    )
    res = invoke(*(["--debug"] if debug else []), "run", r)
    assert res.exit_code == 1
    text = res.output
    if debug:
        assert res.exc_info is not None
        text += "".join(traceback.format_exception(*res.exc_info))
        assert "upload failed" in text and "***" in text
    else:
        assert "upload failed" in res.stderr and "mwakit push" in res.stderr
    assert SECRET not in text
    for p in out.rglob("*"):  # the folder was written (the push failed after)
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), p


def test_no_token_in_an_internal_error_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from mwakit.cli import _handle_errors

    monkeypatch.setenv("HF_TOKEN", SECRET)
    import click
    from click.testing import CliRunner

    @click.command()
    @_handle_errors
    def boom() -> None:
        raise KeyError(f"token={SECRET}")

    res = CliRunner().invoke(boom, [])
    assert res.exit_code == 1 and "internal error" in res.stderr
    assert SECRET not in res.output and "***" in res.stderr


def test_cli_output_never_echoes_the_token_from_a_path(tmp_path: Path, secret_token: str) -> None:
    # A user pasting the token into a path by mistake: the error line shows *** instead.
    bad = tmp_path / f"{SECRET}" / "recipe.yaml"
    res = invoke("validate", bad)
    assert res.exit_code != 0
    assert SECRET not in res.output


def test_copy_of_the_private_cache_is_never_in_the_output(tmp_path: Path, run: Path) -> None:
    # The converted copy is an input like any other: -o at the cache folder itself is refused.
    for ck in run.iterdir():
        _as_pickle(ck)
    cache = _private_cache()
    res = invoke("run", _pickle_recipe(tmp_path, run, cache), "--force")
    assert_clean_failure(res)  # refused (as not a mwakit output, or as an input): kept
    assert "output.path" in res.stderr
    assert cache.is_dir()
    shutil.rmtree(tmp_path / "run")
