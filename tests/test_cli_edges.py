"""The CLI's rough edges, as a new user meets them: --set, --debug anywhere, --plot formats,
init on make_run.py's layout, offline Hub errors, inspect on full models, re-running an output
folder from anywhere, tokenizer files in adapter outputs, and messages a person would write."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from safetensors.torch import load_file

from mwakit.cli import main

from .conftest import MakeAdapter, tiny_llama, trainer_state
from .test_cli import _invoke, _recipe

LOSSES = {10: 1.0, 20: 0.8, 30: 0.5}


def _tokenizer(folder: Path) -> None:
    """A real fast tokenizer saved as the Trainer saves its processing class."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, **{f"t{i}": i + 2 for i in range(30)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def project(make_adapter: MakeAdapter, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """make_run.py's layout: PROJECT/run/checkpoint-10/20/30 (adapters with trainer_state.json
    and the tokenizer files a Trainer saves) beside PROJECT/full/checkpoint-30 (a full model)."""
    root = tmp_path_factory.mktemp("proj") / "tiny"
    for i, (step, loss) in enumerate(LOSSES.items()):
        st = trainer_state(step, [(s, 2.0) for s in range(1, step)] + [(step, loss)])
        ck = make_adapter(root / "run" / f"checkpoint-{step}", seed=i, state=st)
        _tokenizer(ck)
    tiny_llama().save_pretrained(root / "full" / "checkpoint-30")
    return root


def _one_line(res: Result) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.output
    return lines[0]


# -- --set ----------------------------------------------------------------------------------


def test_set_changes_plan_run_and_validate(project: Path, tmp_path: Path) -> None:
    r = _recipe(tmp_path, project / "run")
    # loss_window=1: the loss logged at each checkpoint (the default averages the interval).
    sets = ["--set", "params.penalty=2", "--set", "select.last=2", "--set", "loss_window=1"]
    res = _invoke("plan", "--json", str(r), *sets)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["params"]["penalty"] == 2.0  # a YAML number, not the string "2"
    assert [c["step"] for c in doc["checkpoints"]] == [20, 30]
    # power transform, p = 2, q = 1/loss (the loss logged at the step, loss_window 1):
    # w ∝ (1/0.8)² : (1/0.5)² = 1.5625 : 4.
    assert doc["checkpoints"][1]["weight"] == pytest.approx(4 / 5.5625, abs=1e-12)
    res = _invoke("validate", str(r), "--set", "select.last=1")
    assert res.exit_code == 0 and "1 adapter," in res.stdout, res.output
    out = tmp_path / "set-out"
    res = _invoke("run", "-q", str(r), "--set", f"output.path={out}", "--set", "select.last=1")
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((out / "mwakit.yaml").read_text())["checkpoints"][0]["path"].endswith(
        "checkpoint-30"
    )


def test_set_value_errors_are_located_at_the_set(project: Path, tmp_path: Path) -> None:
    r = _recipe(tmp_path, project / "run")
    res = _invoke("validate", str(r), "--set", "params.penalty=-1")
    assert res.exit_code == 1
    line = _one_line(res)
    assert "--set params.penalty: Input should be greater than or equal to 0" in line
    assert "fix:" in line
    # Several problems: each on its line, the --set one located at the --set.
    res = _invoke("validate", str(r), "--set", "params.penalty=x", "--set", "dtype=int3")
    assert res.exit_code == 1
    assert "--set params.penalty:" in res.stderr and "--set dtype:" in res.stderr


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("penalty", "'penalty' is not KEY=VALUE"),
        ("=2", "'=2' is not KEY=VALUE"),
        ("params..penalty=2", "has an empty part"),
        ("params.penalty=[1", "is not valid YAML"),
        ("params.penalty.x=1", "params.penalty is float 1.0, not a mapping"),
    ],
)
def test_malformed_set_is_a_usage_error(
    project: Path, tmp_path: Path, item: str, message: str
) -> None:
    r = _recipe(tmp_path, project / "run")
    res = _invoke("plan", str(r), "--set", item)
    assert res.exit_code == 2
    assert message in _one_line(res)


def test_tune_takes_set_and_checks_it_before_any_data(project: Path, tmp_path: Path) -> None:
    r = _recipe(tmp_path, project / "run")
    data = str(tmp_path / "never-read.jsonl")
    res = _invoke("tune", str(r), "--data", data, "--set", "params.penalty=-1")
    assert res.exit_code == 1
    assert "--set params.penalty: Input should be greater than or equal to 0" in _one_line(res)
    res = _invoke("tune", str(r), "--data", data, "--set", "penalty")
    assert res.exit_code == 2 and "is not KEY=VALUE" in _one_line(res)


def test_set_indexes_lists_and_creates_blocks(tmp_path: Path) -> None:
    from mwakit.overrides import apply_sets

    data = {"checkpoints": [{"path": "a"}, {"path": "b"}], "output": {"path": "o"}}
    out = apply_sets(
        data,
        ["checkpoints.1.weight=0.25", "checkpoints.-1.path=c", "weighting.mwa.penalty=1e-3"],
    )
    assert out["checkpoints"][1] == {"path": "c", "weight": 0.25}
    assert out["weighting"] == {"mwa": {"penalty": 1e-3}}
    assert data["checkpoints"][1] == {"path": "b"}  # the document itself is not changed
    res = _invoke("validate", "--schema-only", str(_recipe(tmp_path, tmp_path)), "--set", "x=1")
    assert res.exit_code == 1 and "--set x: unknown key" in _one_line(res)


# -- --debug, --plot ------------------------------------------------------------------------


def test_debug_after_the_command(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.yaml")
    res = CliRunner().invoke(main, ["plan", missing, "--debug"])
    assert res.exit_code != 0 and res.exception is not None
    assert not isinstance(res.exception, SystemExit)  # the traceback, not the one line
    res = CliRunner().invoke(main, ["plan", missing])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)


@pytest.mark.parametrize(
    ("ext", "magic"), [("svg", b"<?xml"), ("pdf", b"%PDF"), ("png", b"\x89PNG")]
)
def test_plot_format_follows_the_extension(
    project: Path, tmp_path: Path, ext: str, magic: bytes
) -> None:
    plot = tmp_path / f"w.{ext.upper()}"
    res = _invoke("plan", str(_recipe(tmp_path, project / "run")), "--plot", str(plot))
    assert res.exit_code == 0, res.output
    assert plot.read_bytes().startswith(magic)
    assert not [p for p in tmp_path.iterdir() if "mwakit-tmp" in p.name]


@pytest.mark.parametrize("fmt", ["svg", "pdf"])
def test_plot_files_are_the_same_bytes_twice(tmp_path: Path, fmt: str) -> None:
    from mwakit.plot import draw

    data = {"name": "loss", "xs": [1.0, 2.0], "ws": [0.4, 0.6], "labels": ["a", "b"], "title": "t"}
    one = draw(data, tmp_path / f"1.{fmt}", fmt).read_bytes()
    assert one == draw(data, tmp_path / f"2.{fmt}", fmt).read_bytes()


@pytest.mark.parametrize("name", ["w.jpg", "weights"])
def test_plot_with_another_extension_is_refused(project: Path, tmp_path: Path, name: str) -> None:
    res = _invoke("plan", str(_recipe(tmp_path, project / "run")), "--plot", str(tmp_path / name))
    assert res.exit_code == 2
    line = _one_line(res)
    assert "mwakit draws png, svg, pdf" in line and "fix: end the file name with .png" in line
    assert not (tmp_path / name).exists()


# -- messages --------------------------------------------------------------------------------


def test_plan_and_run_read_as_a_person_writes(project: Path, tmp_path: Path) -> None:
    r = _recipe(tmp_path, project / "run")
    res = _invoke("plan", str(r))
    assert res.exit_code == 0
    assert "lora space: factors (A and B merged, same rank)" in res.stdout
    assert "(factors)" not in res.stdout and "0.0 MB" not in res.stdout
    assert "write 16.4 kB" in res.stdout  # 14 modules × (8·32 + 32·8 + …) float32 bytes
    res = _invoke("run", str(r), "--set", "select.last=1")
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("merged 1 checkpoint with mwa into ")
    assert "16.4 kB written" in res.stdout and "1 checkpoints" not in res.stdout


def test_rslora_mixed_with_plain_lora_warns_once(make_adapter: MakeAdapter, tmp_path: Path) -> None:
    a = make_adapter(tmp_path / "a", seed=0)
    b = make_adapter(tmp_path / "b", seed=1, use_rslora=True)
    r = tmp_path / "r.yaml"
    r.write_text(
        yaml.safe_dump(
            {
                "method": "linear",
                "checkpoints": [str(a), str(b)],
                "output": {"path": str(tmp_path / "o")},
            }
        )
    )
    res = _invoke("plan", str(r))
    assert res.exit_code == 0, res.output
    warnings = [ln for ln in res.stdout.splitlines() if "scalings differ" in ln]
    assert warnings == [
        "warning: scalings differ across checkpoints in 14 LoRA modules (e.g. "
        "base_model.model.model.layers.0.mlp.down_proj); rsLoRA (α/√r) and plain LoRA (α/r) "
        "adapters are mixed; each B is rescaled by s_i/s_out before averaging"
    ]


def test_unweighted_plot_is_not_titled_against_checkpoint(
    make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    from mwakit import api
    from mwakit.plot import plot_caption, plot_data

    a = make_adapter(tmp_path / "a", seed=0)
    b = make_adapter(tmp_path / "b", seed=1)
    r = tmp_path / "r.yaml"
    r.write_text(
        yaml.safe_dump(
            {
                "method": "linear",
                "checkpoints": [str(a), str(b)],
                "output": {"path": str(tmp_path / "o")},
            }
        )
    )
    p = api.plan(r)
    assert plot_data(p)["title"] == "linear: weight of each checkpoint, in the recipe's order"
    assert plot_data(p)["name"] == "checkpoint (position in the recipe)"
    assert "against" not in plot_caption(p)


# -- init ------------------------------------------------------------------------------------


def test_init_finds_the_run_one_level_down(project: Path, tmp_path: Path) -> None:
    res = _invoke("init", str(project), "--output", str(tmp_path / "o"))
    assert res.exit_code == 0, res.output
    doc = yaml.safe_load(res.stdout)
    assert doc["name"] == "tiny-mwa"
    assert doc["checkpoints"] == [str(project / "run" / f"checkpoint-{s}") for s in LOSSES]
    r = tmp_path / "r.yaml"
    r.write_text(res.stdout)
    assert _invoke("validate", str(r)).exit_code == 0


def test_init_with_two_runs_one_level_down_asks(make_adapter: MakeAdapter, tmp_path: Path) -> None:
    for name in ("a", "b"):
        make_adapter(tmp_path / "proj" / name / "checkpoint-1")
    res = _invoke("init", str(tmp_path / "proj"))
    assert res.exit_code == 2
    line = _one_line(res)
    assert "2 subfolders hold checkpoint-<step>/ folders" in line
    assert f"mwakit init {tmp_path / 'proj' / 'a'}" in line


def test_init_hub_unreachable_is_one_fast_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    from mwakit import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_reached", set())
    for v in hub._PROXY_ENV:
        monkeypatch.delenv(v, raising=False)

    def no_dns(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(hub.socket, "create_connection", no_dns)
    start = time.monotonic()
    res = _invoke("init", "hf://some-org/some-run")
    assert time.monotonic() - start < 5
    assert res.exit_code == 1
    line = _one_line(res)
    assert line.startswith("error: some-org/some-run: cannot reach the Hub: huggingface.co")
    assert "Retry" not in res.output and "fix: check your network" in line


# -- inspect ---------------------------------------------------------------------------------


def test_inspect_full_models_sharded_or_not(tmp_path: Path) -> None:
    model = tiny_llama()
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    n = sum(p.numel() for p in model.state_dict().values())
    res = _invoke("inspect", str(tmp_path / "one"))
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0] == (
        f"{tmp_path / 'one'}: full model, LlamaForCausalLM (layers=2, hidden=16, vocab=64)"
    )
    assert lines[1].startswith("  weights: model.safetensors; 21 tensors, ")
    assert "no training state" in lines[-1] and "None" not in res.stdout
    doc = json.loads(_invoke("inspect", "--json", str(tmp_path / "sharded")).stdout)
    assert doc["kind"] == "model" and doc["sharded"] and len(doc["files"]) > 1
    assert doc["parameters"] == n and doc["tensors"] == 21 and doc["dtypes"] == ["F32"]
    assert doc["config"]["num_hidden_layers"] == 2
    text = _invoke("inspect", str(tmp_path / "sharded")).stdout
    assert f"{len(doc['files'])} shards + model.safetensors.index.json" in text


def test_inspect_mwakit_outputs_and_full_runs(project: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    r = _recipe(tmp_path, project / "run", output={"path": str(out)})
    assert _invoke("run", "-q", str(r)).exit_code == 0
    res = _invoke("inspect", str(out))
    assert res.exit_code == 0, res.output
    assert "  merged by mwakit with mwa from 3 checkpoints (recipe as run: mwakit.yaml)" in (
        res.stdout
    )
    assert "rank 4 (14 modules)" in res.stdout and "{'4'" not in res.stdout
    assert "step: None" not in res.stdout and "no training state" in res.stdout
    res = _invoke("inspect", str(project / "full"))
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(f"{project / 'full'}: run with 1 checkpoint (full models)")
    res = _invoke("inspect", str(project / "run" / "checkpoint-10"))
    assert "  step 10; metrics: " in res.stdout


def test_inspect_mwakit_full_output(tmp_path: Path) -> None:
    from mwakit import api
    from mwakit.recipe import parse_recipe

    for i in range(2):
        tiny_llama().save_pretrained(tmp_path / f"m{i}")
    recipe = parse_recipe(
        {
            "method": "linear",
            "checkpoints": [str(tmp_path / "m0"), str(tmp_path / "m1")],
            "device": "cpu",
            "output": {"path": str(tmp_path / "out"), "shard_size": "20KB"},
        }
    )
    api.run(recipe)
    res = _invoke("inspect", str(tmp_path / "out"))
    assert res.exit_code == 0, res.output
    assert "full model, LlamaForCausalLM" in res.stdout
    assert "merged by mwakit with linear from 2 checkpoints" in res.stdout
    assert "shards + model.safetensors.index.json" in res.stdout


# -- re-running an output folder, tokenizer files ---------------------------------------------


def test_output_folder_reruns_elsewhere_with_the_same_bytes(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = tmp_path / "a"
    shutil.copytree(project / "run", a / "runs" / "tiny")
    out = a / "out" / "tiny-mwa"
    r = _recipe(tmp_path, a / "runs" / "tiny", output={"path": str(out)})
    assert _invoke("run", "-q", str(r)).exit_code == 0
    text = (out / "mwakit.yaml").read_text()
    resolved = yaml.safe_load(text)
    assert resolved["relative_to"] == "recipe"
    assert resolved["output"]["path"] == "../tiny-mwa-rerun"
    assert [c["path"] for c in resolved["checkpoints"]] == [
        f"../../runs/tiny/checkpoint-{s}" for s in LOSSES
    ]
    assert str(a) not in text
    card = (out / "README.md").read_text()
    assert "mwakit run mwakit.yaml   # in this folder; writes ../tiny-mwa-rerun" in card
    # Another machine: the run and the output moved together; re-run inside the copied folder,
    # as the card says.
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    shutil.rmtree(a)
    monkeypatch.chdir(b / "out" / "tiny-mwa")
    res = _invoke("run", "-q", "mwakit.yaml")
    assert res.exit_code == 0, res.output
    again = b / "out" / "tiny-mwa-rerun"
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (again / f).read_bytes() == (b / "out" / "tiny-mwa" / f).read_bytes()
    assert not (b / "out" / "tiny-mwa" / "out").exists()  # no nested output
    # And from any other directory, through the recipe's path.
    monkeypatch.chdir(tmp_path)
    res = _invoke("validate", str(again / "mwakit.yaml"))
    assert res.exit_code == 0, res.output


def test_adapter_output_carries_the_tokenizer(project: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    assert _invoke("run", "-q", str(_recipe(tmp_path, project / "run"))).exit_code == 0
    ck = project / "run" / "checkpoint-30"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (ck / name).read_bytes()
    tok = AutoTokenizer.from_pretrained(out)
    assert (
        tok("t1 t2 t3")["input_ids"] == AutoTokenizer.from_pretrained(ck)("t1 t2 t3")["input_ids"]
    )
    assert load_file(out / "adapter_model.safetensors")  # the adapter is there too


def test_tokenizer_link_out_of_a_checkpoint_is_refused(
    make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    ck = make_adapter(tmp_path / "ck")
    secret = tmp_path / "secret.txt"
    secret.write_text("token")
    os.symlink(secret, ck / "tokenizer.json")
    r = tmp_path / "r.yaml"
    r.write_text(
        yaml.safe_dump(
            {"method": "linear", "checkpoints": [str(ck)], "output": {"path": str(tmp_path / "o")}}
        )
    )
    res = _invoke("run", str(r))
    assert res.exit_code == 1
    assert "tokenizer file tokenizer.json is a symlink to" in _one_line(res)
    assert not (tmp_path / "o").exists()
