"""`mwakit eval` through click's CliRunner: targets, output, one-line errors and exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner, Result

from mwakit.cli import main
from mwakit.evaluate import evaluate

from ..conftest import MakeAdapter, trainer_state

ROWS = [
    {"prompt": "w6 w7", "completion": "w8 w9 </s>"},
    {"text": "w10 w11 w12"},
    {"prompt": "w6", "choices": ["w7", "w8 w9"], "label": 1},
]


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def run_dir(
    make_adapter: MakeAdapter, tok_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Two checkpoints whose adapter config names the tokenizer-carrying base."""
    run = tmp_path_factory.mktemp("cli-eval") / "run"
    for i, step in enumerate((10, 20)):
        st = trainer_state(step, [(s, 2.0 - 0.02 * s) for s in range(1, step + 1)])
        ck = make_adapter(run / f"checkpoint-{step}", seed=i + 1, state=st)
        cfg = json.loads((ck / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(tok_base)
        (ck / "adapter_config.json").write_text(json.dumps(cfg))
    return run


def test_adapter_folder_with_its_base_by_default(run_dir: Path, tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    ck = run_dir / "checkpoint-20"
    res = _invoke("eval", str(ck), "--data", str(data), "--metric", "loss,exact_match,accuracy")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0] == f"target: {ck}"
    assert lines[2].split() == ["metric", "value", "se", "rows"]
    assert [ln.split()[0] for ln in lines[3:]] == ["loss", "exact_match", "accuracy"]
    want = evaluate(ck, data=data, metrics=["loss", "exact_match", "accuracy"])
    assert lines[3].split()[1] == f"{want.metrics['loss']:.6g}"
    assert lines[3].split()[-1] == "3"  # every row has a loss; the choice row its right choice
    assert "tokens scored" in res.stderr


def test_recipe_is_merged_in_memory_json(run_dir: Path, tok_base: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    out = tmp_path / "never-written"
    recipe.write_text(
        yaml.safe_dump({"select": {"run": str(run_dir)}, "output": {"path": str(out)}})
    )
    data = _jsonl(tmp_path / "d.jsonl", ROWS[:2])
    res = _invoke("eval", str(recipe), "--data", str(data), "--metric", "loss,perplexity", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert set(doc) == {"target", "base", "metrics", "se", "rows", "tokens", "seconds"}
    assert doc["base"] == str(tok_base) and doc["rows"] == {"loss": 2, "perplexity": 2}
    assert doc["metrics"]["perplexity"] == pytest.approx(
        2.718281828459045 ** doc["metrics"]["loss"]
    )
    assert not out.exists()


def test_model_folder_and_explicit_base(run_dir: Path, tok_base: Path, tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", ROWS[1:2])
    res = _invoke("eval", str(tok_base), "--data", str(data), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["base"] == str(tok_base)
    # An adapter whose recorded base is elsewhere: --base says where it is.
    moved = tmp_path / "moved"
    shutil.copytree(run_dir / "checkpoint-10", moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(
        json.dumps({**cfg, "base_model_name_or_path": "org/not-here"})
    )
    res = _invoke("eval", str(moved), "--data", str(data))
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [
        f"error: {moved}: the adapters' base_model_name_or_path (org/not-here) is no local "
        "folder — fix: pass --base FOLDER (or --base hf://org/repo)"
    ]
    assert _invoke("eval", str(moved), "--data", str(data), "--base", str(tok_base)).exit_code == 0


@pytest.mark.parametrize(
    ("line", "msg"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "a row must be a JSON object, got list"),
        ('{"prompt": "w6"}', 'a "prompt" row needs a "completion"'),
        ('{"text": 3}', '"text" must be a string, got int'),
        ('{"text": "  "}', '"text" is empty'),
        ('{"messages": [{"role": "user", "content": "w6"}]}', "no assistant turn"),
        ('{"messages": [{"role": "bot", "content": "w6"}]}', "messages[0]: unknown role 'bot'"),
        ('{"prompt": "w6", "choices": ["w7"], "label": 0}', '"choices" must be a list of ≥ 2'),
        ('{"prompt": "w6", "choices": ["w7", "w8"], "label": 2}', '"label" must be an index'),
        ('{"id": 4}', "not an evaluation row (got id)"),
    ],
)
def test_bad_rows_are_one_line_errors(run_dir: Path, tmp_path: Path, line: str, msg: str) -> None:
    data = _jsonl(tmp_path / "d.jsonl", [ROWS[1], line])
    res = _invoke("eval", str(run_dir / "checkpoint-10"), "--data", str(data))
    assert res.exit_code == 1
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {data}:2: {msg}"), err
    assert " — fix: " in err[0]


@pytest.mark.parametrize(
    ("metric", "msg"),
    [
        ("loss,bleu", "error: metrics: unknown metric 'bleu' — fix: use loss, perplexity,"),
        ("no_such_mod:f", "error: no_such_mod:f: cannot import plug-in module 'no_such_mod'"),
    ],
)
def test_bad_metric_names(run_dir: Path, tmp_path: Path, metric: str, msg: str) -> None:
    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    res = _invoke("eval", str(run_dir / "checkpoint-10"), "--data", str(data), "--metric", metric)
    assert res.exit_code == 1
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(msg), err


def test_missing_data_and_target(run_dir: Path, tmp_path: Path) -> None:
    res = _invoke("eval", str(run_dir / "checkpoint-10"), "--data", str(tmp_path / "none.jsonl"))
    assert res.exit_code == 1
    assert res.stderr.startswith(f"error: {tmp_path / 'none.jsonl'}: data file not found")
    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    res = _invoke("eval", str(tmp_path), "--data", str(data))
    assert res.exit_code == 1
    assert "not an adapter folder, a model folder or a recipe file" in res.stderr


def test_tokenizer_from_the_adapter_folder(
    run_dir: Path, tiny_base: Path, tok_base: Path, tmp_path: Path
) -> None:
    from .conftest import save_tokenizer

    ck = tmp_path / "ck"
    shutil.copytree(run_dir / "checkpoint-10", ck)
    save_tokenizer(ck)  # as mwakit run copies it into an adapter output
    data = _jsonl(tmp_path / "d.jsonl", ROWS[1:2])
    res = _invoke("eval", str(ck), "--data", str(data), "--base", str(tiny_base), "--json")
    assert res.exit_code == 0, res.output
    with_tok = _invoke("eval", str(ck), "--data", str(data), "--base", str(tok_base), "--json")
    assert json.loads(res.stdout)["metrics"] == json.loads(with_tok.stdout)["metrics"]
    # Neither has one: the message says where to put it.
    shutil.rmtree(ck)
    shutil.copytree(run_dir / "checkpoint-10", ck)
    res = _invoke("eval", str(ck), "--data", str(data), "--base", str(tiny_base))
    assert res.exit_code == 1
    assert res.stderr.startswith(
        f"error: {tiny_base}: no tokenizer files here, nor in {ck} — fix: save the tokenizer"
    )


def test_full_model_recipe(tok_base: Path, tmp_path: Path) -> None:
    """A full-model recipe is merged in memory and loaded into its base_model."""
    from transformers import AutoModelForCausalLM

    folders = []
    for i in range(2):
        m = AutoModelForCausalLM.from_pretrained(tok_base)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1.0 + 0.1 * (i + 1))
        m.save_pretrained(tmp_path / f"m{i}")
        folders.append(str(tmp_path / f"m{i}"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "method": "linear",
                "checkpoints": [{"path": f, "weight": 1.0} for f in folders],
                "base_model": str(tok_base),
                "output": {"path": str(tmp_path / "out")},
            }
        )
    )
    data = _jsonl(tmp_path / "d.jsonl", ROWS[1:2])
    got = evaluate(recipe, data=data)
    # The linear average of θ·1.1 and θ·1.2 is θ·1.15: score that model directly.
    m = AutoModelForCausalLM.from_pretrained(tok_base)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.15)
    m.save_pretrained(tmp_path / "avg")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_base / f, tmp_path / "avg" / f)
    want = evaluate(tmp_path / "avg", data=data)
    assert got.base == str(tok_base)
    assert got.metrics["loss"] == pytest.approx(want.metrics["loss"], abs=1e-5)
    assert not (tmp_path / "out").exists()
