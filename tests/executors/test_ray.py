"""executor: ray — shards merged by Ray tasks equal the local executor's, byte for byte."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mwakit
from mwakit import card
from mwakit.cli import main
from mwakit.errors import TensorError, UsageError
from mwakit.executors import parse_executor
from mwakit.executors.ray import FAULT_ENV, connect, shard_groups
from mwakit.recipe import parse_recipe
from tests.test_execute import write_adapter
from tests.test_full_models import _model

WEIGHTS = ("*.safetensors", "*.index.json", "config.json", "adapter_config.json")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("ray-full")
    folders = [root / f"m{i}" for i in range(3)]
    for i, f in enumerate(folders):
        _model(f, i, shard="20KB" if i == 1 else None)
    return folders


def _recipe(out: Path, folders: list[Path], **kw: Any) -> Any:
    return parse_recipe(
        {
            "checkpoints": [{"path": str(f)} for f in folders],
            "output": {"path": str(out), "overwrite": True, "shard_size": "6KB"},
            "device": "cpu",
            **kw,
        }
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for pat in WEIGHTS for p in sorted(folder.glob(pat))}


@pytest.mark.parametrize(
    "kw",
    [
        {"method": "linear"},
        # DARE's masks are drawn per tensor from the seed: the same in any process.
        {"method": "dare_ties", "params": {"drop_rate": 0.5, "seed": 3}, "base_model": "m0"},
    ],
    ids=["linear", "dare_ties"],
)
def test_full_model_shards_equal_the_local_executor_byte_for_byte(
    ray_cluster: Any, models: list[Path], tmp_path: Path, kw: dict[str, Any]
) -> None:
    if "base_model" in kw:
        kw = {**kw, "base_model": str(models[0])}
    local = mwakit.run(_recipe(tmp_path / "local", models[1:], **kw)).path
    res = mwakit.run(_recipe(tmp_path / "ray", models[1:], executor="ray", **kw))
    assert res.plan.recipe.executor == "ray"
    ours, theirs = _files(res.path), _files(local)
    assert sum(n.startswith("model-") for n in ours) > 2  # several shards, so several tasks
    assert ours == theirs
    assert res.stats.tasks == len(res.plan.tasks)
    assert "executor: ray" in (res.path / "mwakit.yaml").read_text()
    index = json.loads((res.path / "model.safetensors.index.json").read_text())
    got = {k: v for p in res.path.glob("model-*.safetensors") for k, v in load_file(p).items()}
    assert set(index["weight_map"]) == set(got) == {o.key for o in res.plan.outputs}


def test_adapter_is_one_task_and_equal(
    ray_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MWAKIT_CACHE", "off")
    folders = [tmp_path / f"c{i}" for i in range(3)]
    for i, f in enumerate(folders):
        write_adapter(f, modules=4, seed=i)
    local = mwakit.run(_recipe(tmp_path / "local", folders, method="linear")).path
    real = card.sha256_file

    def driver_hash(path: Path) -> str:
        assert not path.name.endswith(".safetensors"), "the driver read a weights file"
        return real(path)

    monkeypatch.setattr(card, "sha256_file", driver_hash)
    ray_out = mwakit.run(_recipe(tmp_path / "ray", folders, method="linear"), executor="ray")
    assert _files(ray_out.path) == _files(local)
    assert len(shard_groups(ray_out.plan)) == 1
    # The weights' fingerprints were computed by Ray tasks: the same card table.
    table = [ln for ln in (local / "README.md").read_text().splitlines() if "`" in ln]
    fps = [ln for ln in table if ln.count("|") == 5 and "safetensors" in ln]
    assert fps and all(ln in (ray_out.path / "README.md").read_text() for ln in fps)


def test_a_killed_worker_is_retried(
    ray_cluster: Any, models: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flag = tmp_path / "crashed"
    monkeypatch.setenv(FAULT_ENV, f"exit-once:{flag}")
    res = mwakit.run(_recipe(tmp_path / "ray", models[1:], method="linear", executor="ray"))
    assert flag.exists()  # one worker did die (os._exit) on its first attempt
    local = mwakit.run(_recipe(tmp_path / "local", models[1:], method="linear")).path
    assert _files(res.path) == _files(local)


def test_a_task_error_fails_the_merge_and_leaves_nothing(
    ray_cluster: Any, models: list[Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in models[2].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    sd = load_file(bad / "model.safetensors")
    key = sorted(sd)[-1]
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = math.nan
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "ray"
    with pytest.raises(TensorError, match="NaN or Inf"):
        mwakit.run(_recipe(out, [models[1], bad], method="linear", executor="ray"))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("text", "want"),
    [("local", ("local", None)), ("ray", ("ray", None)), ("ray=auto", ("ray", "auto"))],
)
def test_parse_executor(text: str, want: tuple[str, str | None]) -> None:
    assert parse_executor(text) == want


@pytest.mark.parametrize("bad", ["dask", "local=x", "ray="])
def test_bad_executor_is_a_usage_error(bad: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown executor"):
        parse_executor(bad)


def test_cli_bad_executor_is_one_line_exit_2(tmp_path: Path) -> None:
    folders = [tmp_path / f"c{i}" for i in range(2)]
    for i, f in enumerate(folders):
        write_adapter(f, modules=2, seed=i)
    rec = tmp_path / "r.yaml"
    rec.write_text(
        json.dumps(
            {
                "method": "linear",
                "checkpoints": [str(f) for f in folders],
                "output": {"path": str(tmp_path / "out")},
                "device": "cpu",
            }
        )
    )
    res = CliRunner().invoke(main, ["run", str(rec), "--executor", "dask"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        "error: --executor: unknown executor 'dask' — fix: use local, ray, or ray=ADDRESS "
        "(e.g. ray=auto, ray=ray://head:10001)"
    ]
    assert not (tmp_path / "out").exists()


def test_without_ray_installed_the_error_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    folders = [tmp_path / f"c{i}" for i in range(2)]
    for i, f in enumerate(folders):
        write_adapter(f, modules=2, seed=i)
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=r"pip install 'mwakit\[ray\]'"):
        mwakit.run(_recipe(out, folders, method="linear", executor="ray"))
    assert not out.exists()


def test_address_needs_the_ray_executor() -> None:
    from mwakit.errors import RecipeError

    with pytest.raises(RecipeError, match="executor_address applies only with executor: ray"):
        parse_recipe({"checkpoints": ["a"], "output": {"path": "o"}, "executor_address": "auto"})


class _FakeRay:
    """Ray's ``init`` at the boundary: it logs the token notice a new local cluster gets."""

    def __init__(self) -> None:
        self.kwargs: dict[str, Any] = {}

    def is_initialized(self) -> bool:
        return bool(self.kwargs)

    def init(self, **kwargs: Any) -> None:
        logging.getLogger(TOKEN_LOGGER).warning(
            "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled."
        )
        self.kwargs = kwargs


TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"


def test_starting_a_local_cluster_holds_back_rays_token_notice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = _FakeRay()
    before = logging.getLogger(TOKEN_LOGGER).level
    # Ray may stop its loggers propagating to the root: capture at the logger itself.
    with caplog.at_level(logging.WARNING, logger=TOKEN_LOGGER):
        assert connect(fake, None) is True
        assert connect(fake, None) is False  # already connected: nothing started
    assert "Token authentication" not in caplog.text
    assert fake.kwargs["address"] is None and fake.kwargs["log_to_driver"] is False
    assert logging.getLogger(TOKEN_LOGGER).level == before  # held back for init only
