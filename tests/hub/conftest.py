"""Hub fixtures, all offline: a Hub cache laid out in tmp_path, a fake HTTP layer, a fake HfApi.

- `hub_cache` builds ``models--org--name/{blobs,refs,snapshots/<sha>}`` exactly as
  huggingface_hub's cache stores a download (blobs named by sha256 for LFS files and by git
  sha1 for the others, snapshot files as relative symlinks), and points ``MWAKIT_HUB_CACHE`` at
  it, so downloads go through the real ``snapshot_download`` with ``local_files_only``.
- `http` swaps huggingface_hub's HTTP client for an ``httpx2.MockTransport``: every request is
  recorded and answered by a handler the test sets (by default: a failing test). Nothing can
  reach the network, online mode included.
- `fake_api` replaces the HfApi methods mwakit's push calls and records the calls.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ..conftest import MakeAdapter, trainer_state

REPO = "mwakit-test/tiny-run"
SHA = "0123456789abcdef0123456789abcdef01234567"
SECRET = "hf_SeCrEtT0kenNeverPrinted1234567890"
LOSSES = {10: 1.0, 20: 0.8, 30: 0.5}
BASE_ID = "mwakit-test/tiny-llama"


def _log(step: int, loss: float) -> list[tuple[int, float]]:
    # Loss 2.0 early on, then the checkpoint's loss at every step since the previous save
    # (save_steps 5): the default loss_window, since_save, and loss_window: 1 both read it.
    return [(s, 2.0) for s in range(1, step - 4)] + [(s, loss) for s in range(step - 4, step + 1)]


@pytest.fixture(scope="session")
def hub_run(make_adapter: MakeAdapter, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Trainer run (checkpoint-10/20/30, losses 1.0/0.8/0.5) as it would be uploaded: the
    adapters name a Hub base model, and each checkpoint carries an optimizer state that mwakit
    must never download."""
    run = tmp_path_factory.mktemp("hubrun") / "run"
    for i, (step, loss) in enumerate(LOSSES.items()):
        st = trainer_state(step, _log(step, loss))
        ck = make_adapter(run / f"checkpoint-{step}", seed=i, r=4, lora_alpha=8, state=st)
        cfg_file = ck / "adapter_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["base_model_name_or_path"] = BASE_ID
        cfg_file.write_text(json.dumps(cfg, indent=2))
        (ck / "optimizer.pt").write_bytes(b"not needed")
    return run


def _blob_name(path: str, data: bytes) -> str:
    if path.endswith((".safetensors", ".pt", ".bin")):  # LFS: the blob is named by sha256
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git blob id


def build_cache(
    cache: Path,
    repo_id: str,
    files: dict[str, bytes],
    *,
    sha: str = SHA,
    refs: tuple[str, ...] = ("main",),
) -> Path:
    """Lay out ``files`` (repo path → bytes) as huggingface_hub's cache does; returns the
    snapshot folder."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snap = storage / "snapshots" / sha
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        blob = storage / "blobs" / _blob_name(rel, data)
        blob.write_bytes(data)
        target = snap / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(os.path.relpath(blob, target.parent))
    for ref in refs:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(sha)
    return snap


def run_files(run: Path) -> dict[str, bytes]:
    """Every file of a run folder, keyed by its path inside the repo."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture
def hub_cache(
    tmp_path: Path, hub_run: Path, monkeypatch: pytest.MonkeyPatch, offline: None
) -> Path:
    """The run uploaded as REPO at commit SHA (branch main), in a cache MWAKIT_HUB_CACHE names."""
    cache = tmp_path / "hf-cache"
    build_cache(cache, REPO, run_files(hub_run))
    monkeypatch.setenv("MWAKIT_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 as huggingface_hub sees it (its constant is read at import)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True)
def no_token(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No token anywhere unless a test sets HF_TOKEN (no token file, no OIDC)."""
    from huggingface_hub import constants

    if request.node.get_closest_marker("live"):
        return

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    """A secret token in HF_TOKEN, which must never show up anywhere."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    return SECRET


Handler = Callable[[Any], Any]


@dataclass
class FakeHttp:
    """Answers huggingface_hub's requests with `handler`; records every request."""

    requests: list[Any] = field(default_factory=list)
    handler: Handler | None = None

    def reply(self, status: int, error_code: str | None = None, body: Any = None) -> None:
        """Answer every request with this status (and ``X-Error-Code``) and JSON body."""
        import httpx2

        headers = {"X-Error-Code": error_code} if error_code else {}
        self.handler = lambda request: httpx2.Response(
            status, headers=headers, json=body if body is not None else {"error": "fake"}
        )


@pytest.fixture(autouse=True)
def http(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHttp]:
    """No test reaches the network: huggingface_hub's HTTP client goes to a MockTransport.

    Only tests marked ``live`` (opt-in, see README) keep the real client.
    """
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent, _http

    if request.node.get_closest_marker("live"):
        yield FakeHttp()
        return

    # huggingface_hub fetches (and caches under HF_HOME) an "agent harness" list on its first
    # request; keep that out of the fake and out of the user's home.
    monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", os.devnull)
    fake = FakeHttp()

    def transport(request: Any) -> Any:
        fake.requests.append(request)
        if fake.handler is None:
            raise AssertionError(
                f"unexpected Hub request in a test: {request.method} {request.url}"
            )
        return fake.handler(request)

    _http.set_client_factory(
        lambda: httpx2.Client(
            transport=httpx2.MockTransport(transport),
            event_hooks={"request": [_http.hf_request_event_hook]},
        )
    )
    yield fake
    _http.set_client_factory(_http.default_client_factory)


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Online mode (requests still only reach the `http` fake)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@dataclass
class FakeApi:
    """What mwakit asked the Hub to do."""

    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    uploaded: dict[str, bytes] = field(default_factory=dict)
    fail_upload: Exception | None = None

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def call(self, name: str) -> dict[str, Any]:
        (kwargs,) = [kw for n, kw in self.calls if n == name]
        return kwargs


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    """HfApi.create_repo/create_branch/upload_folder replaced by recorders."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import CommitInfo, RepoUrl

    fake = FakeApi()

    def create_repo(self: Any, repo_id: str, **kw: Any) -> Any:
        fake.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self: Any, repo_id: str, **kw: Any) -> None:
        fake.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

    def upload_folder(self: Any, **kw: Any) -> Any:
        fake.calls.append(("upload_folder", kw))
        if fake.fail_upload is not None:
            raise fake.fail_upload
        folder = Path(kw["folder_path"])
        fake.uploaded = {
            str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()
        }
        oid = "f" * 40
        pr = (
            f"https://huggingface.co/{kw['repo_id']}/discussions/1" if kw.get("create_pr") else None
        )
        return CommitInfo(
            commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/{oid}",
            commit_message=kw.get("commit_message") or "",
            commit_description="",
            oid=oid,
            pr_url=pr,
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return fake


def copy_tree(src: Path, dst: Path) -> Path:
    """Copy a folder (symlinks followed)."""
    shutil.copytree(src, dst)
    return dst
