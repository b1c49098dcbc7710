"""Hub sources through the real huggingface_hub download path, against a cache in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from mwakit import hub
from mwakit.cli import main
from mwakit.errors import HubError

from .conftest import REPO, SHA, FakeHttp, build_cache, run_files

OTHER_SHA = "fedcba9876543210fedcba9876543210fedcba98"


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _recipe(tmp: Path, **kw: Any) -> Path:
    data: dict[str, Any] = {
        "method": "mwa",
        "params": {"metric": "loss", "penalty": 1.0},
        "device": "cpu",
        "output": {"path": str(tmp / "out")},
    }
    data.update(kw)
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(data), encoding="utf-8")
    return p


def _one_error_line(res: Result, *needles: str) -> str:
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_download_from_cache_by_sha_branch_and_default(hub_cache: Path) -> None:
    for rev in (SHA, "main", None):
        folder, sha = hub.download(hub.HfRef(REPO, rev, "checkpoint-20"))
        assert sha == SHA
        assert folder.name == "checkpoint-20" and folder.parent.name == SHA
        assert (folder / "adapter_model.safetensors").is_file()


def test_download_needs_only_the_checkpoint_files() -> None:
    # The patterns snapshot_download gets, filtered by huggingface_hub's own matcher.
    from huggingface_hub.utils import filter_repo_objects

    repo = [
        "README.md",
        "adapter_config.json",
        "checkpoint-10/adapter_config.json",
        "checkpoint-10/adapter_model.safetensors",
        "checkpoint-10/trainer_state.json",
        "checkpoint-10/optimizer.pt",
        "checkpoint-10/rng_state.pth",
        "checkpoint-10/nested/adapter_model.safetensors",
        "checkpoint-100/adapter_model.safetensors",
        "checkpoint-20/adapter_model.safetensors",
        "model-00001-of-00002.safetensors",
        "sub/model-00001-of-00002.safetensors",
    ]
    sub = list(
        filter_repo_objects(
            repo, allow_patterns=hub._patterns(["checkpoint-10"], hub.CHECKPOINT_FILES)
        )
    )
    assert sub == [
        "checkpoint-10/adapter_config.json",
        "checkpoint-10/adapter_model.safetensors",
        "checkpoint-10/trainer_state.json",
    ]
    root = list(
        filter_repo_objects(repo, allow_patterns=hub._patterns([None], hub.CHECKPOINT_FILES))
    )
    assert root == ["adapter_config.json", "model-00001-of-00002.safetensors"]


def test_run_from_hub_pins_sha_in_resolved_recipe_and_card(tmp_path: Path, hub_cache: Path) -> None:
    refs = [f"hf://{REPO}@main/checkpoint-{s}" for s in (10, 20)] + [
        f"hf://{REPO}@{SHA}/checkpoint-30"
    ]
    res = _invoke("run", str(_recipe(tmp_path, checkpoints=refs)))
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    resolved = yaml.safe_load((out / "mwakit.yaml").read_text())
    assert [c["path"] for c in resolved["checkpoints"]] == [
        f"hf://{REPO}@{SHA}/checkpoint-{s}" for s in (10, 20, 30)
    ]
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "mwakit-test/tiny-llama"
    assert front["base_model_relation"] == "adapter"
    assert front["library_name"] == "peft" and front["pipeline_tag"] == "text-generation"
    assert {"mwakit", "merge", "lora", "mwa"} <= set(front["tags"])
    assert f"| `{SHA}` |" in card  # revision column
    assert f"hf://{REPO}@{SHA}/checkpoint-10" in card  # the recipe as run
    assert "](weights.png)" in card and (out / "weights.png").read_bytes()[:4] == b"\x89PNG"
    # Fingerprints: the LFS blob name of each weights file is its sha256.
    blob = (hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / SHA /
            "checkpoint-10" / "adapter_model.safetensors").resolve().name  # fmt: skip
    assert f"`{blob}`" in card
    # The pinned recipe re-runs to the same bytes, from the cache.
    again = tmp_path / "again"
    res = _invoke("run", "-q", str(out / "mwakit.yaml"), "-o", str(again))
    assert res.exit_code == 0, res.output
    assert (again / "adapter_model.safetensors").read_bytes() == (
        out / "adapter_model.safetensors"
    ).read_bytes()


def test_run_matches_the_same_merge_from_local_folders(
    tmp_path: Path, hub_cache: Path, hub_run: Path
) -> None:
    hub_rec = _recipe(tmp_path, select={"run": f"hf://{REPO}", "last": 2})
    assert _invoke("run", "-q", str(hub_rec), "-o", str(tmp_path / "a")).exit_code == 0
    local = _recipe(tmp_path, select={"run": str(hub_run), "last": 2})
    assert _invoke("run", "-q", str(local), "-o", str(tmp_path / "b")).exit_code == 0
    a = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    resolved = yaml.safe_load((tmp_path / "a" / "mwakit.yaml").read_text())
    assert "select" not in resolved
    assert [c["path"] for c in resolved["checkpoints"]] == [
        f"hf://{REPO}@{SHA}/checkpoint-{s}" for s in (20, 30)
    ]


def test_select_on_hub_lists_the_repo_tree_online(
    tmp_path: Path, hub_cache: Path, http: FakeHttp, online: None
) -> None:
    import httpx2

    tree = [
        {"type": "directory", "oid": "1" * 40, "path": p}
        for p in ("checkpoint-10", "checkpoint-20", "checkpoint-30", "logs", "checkpoint-x")
    ] + [{"type": "file", "oid": "2" * 40, "size": 3, "path": "README.md"}]
    http.handler = lambda request: httpx2.Response(200, json=tree)
    assert hub.list_checkpoints(REPO, "main") == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    (req,) = http.requests
    assert f"/api/models/{REPO}/tree/main" in str(req.url)


def test_select_offline_lists_the_cached_snapshot(tmp_path: Path, hub_cache: Path) -> None:
    assert hub.list_checkpoints(REPO) == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    assert hub.list_checkpoints(REPO, SHA) == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]


def test_plan_with_hub_select(tmp_path: Path, hub_cache: Path) -> None:
    res = _invoke("plan", "--json", str(_recipe(tmp_path, select={"run": f"hf://{REPO}@main"})))
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert [c["name"] for c in doc["checkpoints"]] == [
        "checkpoint-10",
        "checkpoint-20",
        "checkpoint-30",
    ]
    assert [c["weight"] for c in doc["checkpoints"]] == pytest.approx([4 / 17, 5 / 17, 8 / 17])


def test_one_commit_under_two_revision_names_is_one_checkpoint(
    tmp_path: Path, hub_cache: Path
) -> None:
    # main resolves to SHA: both references fetch the very same folder, which would count twice.
    rec = _recipe(
        tmp_path,
        checkpoints=[f"hf://{REPO}@main/checkpoint-10", f"hf://{REPO}@{SHA}/checkpoint-10"],
    )
    for cmd in ("validate", "plan"):
        line = _one_error_line(
            _invoke(cmd, str(rec)), "is the same checkpoint as checkpoints.0", "fix:"
        )
        assert f"checkpoints.1 hf://{REPO}@{SHA}/checkpoint-10" in line
    assert not (tmp_path / "out").exists()


def test_offline_with_nothing_cached(tmp_path: Path, offline: None, monkeypatch: Any) -> None:
    monkeypatch.setenv("MWAKIT_HUB_CACHE", str(tmp_path / "empty-cache"))
    rec = _recipe(tmp_path, checkpoints=[f"hf://{REPO}/checkpoint-10"])
    line = _one_error_line(
        _invoke("run", str(rec)),
        REPO,
        "not in the local Hub cache",
        "HF_HUB_OFFLINE",
        "hf download",
    )
    assert "fix:" in line
    rec = _recipe(tmp_path, select={"run": f"hf://{REPO}"})
    _one_error_line(_invoke("plan", str(rec)), "not in the local Hub cache", "fix:")
    assert not (tmp_path / "out").exists()


def test_offline_subfolder_not_cached(tmp_path: Path, hub_cache: Path) -> None:
    rec = _recipe(tmp_path, checkpoints=[f"hf://{REPO}@{SHA}/checkpoint-999"])
    _one_error_line(_invoke("run", str(rec)), "checkpoint-999", "offline", "fix:")


def test_other_commit_not_cached(tmp_path: Path, hub_cache: Path) -> None:
    rec = _recipe(tmp_path, checkpoints=[f"hf://{REPO}@{OTHER_SHA}/checkpoint-10"])
    _one_error_line(_invoke("run", str(rec)), "not in the local Hub cache")


@pytest.mark.parametrize(
    ("status", "code", "with_token", "needles"),
    [
        (404, "RepoNotFound", False, ("repository not found", "hf auth login", "HF_TOKEN")),
        (404, "RepoNotFound", True, ("repository not found", "token")),
        (401, None, False, ("not logged in", "hf auth login", "HF_TOKEN")),
        (403, "GatedRepo", True, ("gated repo", "accept the licence", f"huggingface.co/{REPO}")),
        (404, "RevisionNotFound", False, ("revision not found", "check the revision")),
    ],
    ids=["repo-not-found", "repo-not-found-token", "no-token", "gated", "revision-not-found"],
)
def test_hub_errors_are_one_line_with_the_fix(
    tmp_path: Path,
    http: FakeHttp,
    online: None,
    monkeypatch: Any,
    status: int,
    code: str | None,
    with_token: bool,
    needles: tuple[str, ...],
) -> None:
    monkeypatch.setenv("MWAKIT_HUB_CACHE", str(tmp_path / "cache"))
    if with_token:
        monkeypatch.setenv("HF_TOKEN", "hf_xxxxxxxxxxxxxxxxxxxxxxxx")
    http.reply(status, code)
    rec = _recipe(tmp_path, checkpoints=[f"hf://{REPO}@v2/checkpoint-10"])
    line = _one_error_line(_invoke("run", str(rec)), f"{REPO}@v2", "fix:", *needles)
    assert "hf_xxxx" not in line
    assert http.requests, "the real huggingface_hub code path made the request"
    assert not (tmp_path / "out").exists()


def test_hub_errors_from_listing(tmp_path: Path, http: FakeHttp, online: None) -> None:
    http.reply(404, "RepoNotFound")
    rec = _recipe(tmp_path, select={"run": f"hf://{REPO}"})
    _one_error_line(_invoke("plan", str(rec)), "repository not found", "fix:")


def test_cache_dir_setting_is_honoured(
    tmp_path: Path, hub_run: Path, offline: None, monkeypatch: Any
) -> None:
    cache = tmp_path / "elsewhere"
    build_cache(cache, "org/other", {"adapter_config.json": b"{}"}, sha=OTHER_SHA)
    monkeypatch.setenv("MWAKIT_HUB_CACHE", str(cache))
    folder, sha = hub.download(hub.parse_hf_ref("hf://org/other"))
    assert sha == OTHER_SHA and folder.parent.parent == cache / "models--org--other"


def test_missing_hub_error_class() -> None:
    with pytest.raises(HubError):
        raise hub.missing_folder(hub.HfRef(REPO, None, "x"), SHA)


def test_root_of_repo_as_a_checkpoint(
    tmp_path: Path, hub_run: Path, offline: None, monkeypatch: Any
) -> None:
    cache = tmp_path / "c"
    files = {
        k.split("/", 1)[1]: v
        for k, v in run_files(hub_run).items()
        if k.startswith("checkpoint-20/")
    }
    build_cache(cache, "org/ck20", files, sha=OTHER_SHA)
    monkeypatch.setenv("MWAKIT_HUB_CACHE", str(cache))
    res = _invoke("plan", "--json", str(_recipe(tmp_path, checkpoints=["hf://org/ck20"])))
    assert res.exit_code == 0, res.output
    (c,) = json.loads(res.output)["checkpoints"]
    assert c["name"] == "ck20" and c["step"] == 20


def test_online_download_fetches_only_the_needed_files(
    tmp_path: Path, hub_run: Path, http: FakeHttp, online: None, monkeypatch: Any
) -> None:
    """The whole online path of snapshot_download against a fake Hub: only the three files of
    checkpoint-20 are requested, never optimizer.pt or another checkpoint."""
    import hashlib

    import httpx2

    monkeypatch.setenv("MWAKIT_HUB_CACHE", str(tmp_path / "cache"))
    files = run_files(hub_run)
    oid = {p: hashlib.sha1(b).hexdigest() for p, b in files.items()}

    def handler(request: Any) -> Any:
        path = request.url.path
        if path == f"/api/models/{REPO}/revision/main":
            return httpx2.Response(200, json={"id": REPO, "sha": SHA, "siblings": []})
        if path.startswith(f"/api/models/{REPO}/tree/{SHA}"):
            tree = [
                {"type": "file", "path": p, "size": len(b), "oid": oid[p]} for p, b in files.items()
            ]
            return httpx2.Response(200, json=tree)
        prefix = f"/{REPO}/resolve/{SHA}/"
        if path.startswith(prefix):
            rel = path[len(prefix) :]
            body = files[rel]
            headers = {
                "X-Repo-Commit": SHA,
                "ETag": f'"{oid[rel]}"',
                "Content-Length": str(len(body)),
            }
            return httpx2.Response(
                200, headers=headers, content=b"" if request.method == "HEAD" else body
            )
        return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"})

    http.handler = handler
    folder, sha = hub.download(hub.parse_hf_ref(f"hf://{REPO}/checkpoint-20"))
    assert sha == SHA
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "trainer_state.json",
    ]
    fetched = {
        r.url.path.rsplit(f"/resolve/{SHA}/", 1)[1]
        for r in http.requests
        if f"/resolve/{SHA}/" in r.url.path
    }
    assert fetched == {
        "checkpoint-20/adapter_config.json",
        "checkpoint-20/adapter_model.safetensors",
        "checkpoint-20/trainer_state.json",
    }
    assert (folder / "adapter_model.safetensors").read_bytes() == files[
        "checkpoint-20/adapter_model.safetensors"
    ]


def test_base_model_from_the_hub_is_pinned(tmp_path: Path, offline: None, monkeypatch: Any) -> None:
    import torch
    from safetensors.torch import save_file

    from mwakit.recipe import parse_recipe
    from mwakit.sources import resolve_base

    st = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(st))
    cache = tmp_path / "cache"
    build_cache(
        cache,
        "org/base",
        {"model.safetensors": st.read_bytes(), "config.json": b"{}", "sub/model.safetensors": b"x"},
        sha=OTHER_SHA,
    )
    monkeypatch.setenv("MWAKIT_HUB_CACHE", str(cache))
    r = parse_recipe({"checkpoints": ["a"], "base_model": "hf://org/base@main", "output": "o"})
    base = resolve_base(r)
    assert base is not None and base.revision == OTHER_SHA and base.kind == "full"
    assert base.pinned_ref == f"hf://org/base@{OTHER_SHA}"
    assert [f.name for f in base.files] == ["model.safetensors"]
