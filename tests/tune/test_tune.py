"""`tune` end to end on a real (tiny) model: baselines, searches, best.yaml, resume, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from mwakit.cli import main
from mwakit.errors import OutputError, UsageError
from mwakit.evaluate import Evaluator, load_rows
from mwakit.memory import MergedAdapter, merge_in_memory
from mwakit.recipe import load_recipe
from mwakit.tune import tune
from mwakit.tune.scoring import ScorerSpec
from tests.tune.conftest import write_recipe

HASH = ScorerSpec("tests.tune.helpers:HashScorer")


@pytest.mark.slow
def test_tune_chooses_and_best_yaml_reproduces_the_scored_candidate(
    tune_base: Path, tune_run: Path, val_test: tuple[Path, Path], tmp_path: Path
) -> None:
    val, test = val_test
    out = tmp_path / "best.yaml"
    seen: list[int] = []
    res = tune(
        write_recipe(tmp_path, tune_run),
        data=val,
        test=test,
        base=tune_base,
        searches="penalty,last,greedy,weights,groups",
        budget=6,
        out=out,
        on_trial=lambda t, done, total: seen.append(done),
    )
    assert set(res.baselines) == {"last", "best_single", "uniform"}
    assert res.baselines["last"].name == "checkpoint-25"
    assert set(res.searches) == {"penalty", "last", "greedy", "weights", "groups"}
    # The recipe as written (MWA p = 1) is scored too, with its checkpoints made absolute.
    assert res.given is not None and res.given.recipe["params"]["penalty"] == 1.0
    assert all(Path(c["path"]).is_absolute() for c in res.given.recipe["checkpoints"])
    groups = [t for t in res.trials if t.kind == "groups"]
    assert any(isinstance(t.recipe["params"]["penalty"], list) for t in groups)
    assert any(t.recipe.get("rules", [{}])[0].get("match") == "*self_attn*" for t in groups)
    assert all(e.test is not None for e in res.baselines.values()) and res.best.test is not None
    # TEST only for the baselines and the chosen one: at most 4 test trials.
    tests = [t for t in res.trials if t.split == "test"]
    assert 1 <= len(tests) <= 4
    best_val = min(t.score.value for t in res.trials if t.split == "val")
    assert res.best.val.value <= res.baselines["uniform"].val.value
    assert res.best.val.value >= best_val  # the simpler-within-1-SE rule may pick another
    assert seen == list(range(1, len(res.trials) + 1))
    # best.yaml is a plain recipe with its tuning block; `mwakit run` writes the very tensors
    # that were scored.
    doc = yaml.safe_load(out.read_text())
    assert doc["tuning"]["chosen"] == res.best.name and doc["tuning"]["metric"] == "loss"
    assert doc["tuning"]["data"]["val"]["rows"] == 12
    assert out.with_suffix(".png").is_file() and res.plot == out.with_suffix(".png")
    recipe = load_recipe(out)
    mem = merge_in_memory(recipe)
    code, text = _invoke("run", "-q", str(out), "-o", str(tmp_path / "adapter"))
    assert code == 0, text
    written = tmp_path / "adapter"
    disk = load_file(written / "adapter_model.safetensors")
    assert set(disk) == set(mem.tensors)
    for k, t in disk.items():
        torch.testing.assert_close(mem.tensors[k], t, atol=1e-6, rtol=0)
    # Scoring the written adapter gives the chosen candidate's VAL score.
    cfg = json.loads((written / "adapter_config.json").read_text())
    ev = Evaluator(tune_base, metrics=["loss"])
    again = ev.score(load_rows(val), MergedAdapter(disk, cfg)).metrics["loss"]
    assert again == pytest.approx(res.best.val.value, abs=1e-6)
    card = (written / "README.md").read_text()
    assert "## Tuning" in card and res.best.name in card and "sha256" in card
    # --json's document has the top-level keys.
    j = res.to_json()
    assert {"baselines", "best", "trials"} <= set(j)
    assert set(j["baselines"]["uniform"]) >= {"val", "test"} and j["best"]["recipe"] == doc


def test_resume_from_a_partial_trial_log(
    tune_run: Path, val_test: tuple[Path, Path], tmp_path: Path
) -> None:
    val, _ = val_test
    log = tmp_path / "trials.jsonl"
    kw = dict(data=val, searches="penalty,greedy", budget=6, trial_log=log, scorer=HASH)
    first = tune(write_recipe(tmp_path, tune_run), **kw)  # type: ignore[arg-type]
    lines = log.read_text().splitlines()
    assert len(lines) == 1 + len(first.trials)
    # Interrupted: half the trials made it, the next line was cut mid-write.
    keep = lines[: 1 + len(first.trials) // 2]
    log.write_text("\n".join(keep) + "\n" + lines[len(keep)][:20])
    new: list[str] = []
    second = tune(
        write_recipe(tmp_path, tune_run),
        on_trial=lambda t, d, n: new.append(t.key),
        **kw,  # type: ignore[arg-type]
    )
    assert second.resumed == len(keep) - 1
    assert len(new) == len(first.trials) - second.resumed
    assert second.best == first.best and second.to_json()["trials"] == first.to_json()["trials"]
    # Another metric is another tune: its log is refused.
    with pytest.raises(UsageError, match="another tune"):
        tune(write_recipe(tmp_path, tune_run), **{**kw, "metric": "perplexity"})  # type: ignore[arg-type]


def _invoke(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args))
    return res.exit_code, res.output


def test_cli_tune_json_and_table(
    tune_base: Path, tune_run: Path, val_test: tuple[Path, Path], tmp_path: Path
) -> None:
    val, test = val_test
    rec = str(write_recipe(tmp_path, tune_run))
    code, out = _invoke(
        "tune", rec, "--data", str(val), "--test", str(test), "--base", str(tune_base),
        "--search", "last", "--budget", "3", "--json",
    )  # fmt: skip
    assert code == 0, out
    doc = json.loads(out)
    assert set(doc["baselines"]) == {"last", "best_single", "uniform"}
    assert doc["best"]["test"] is not None and doc["trials"]
    code, out = _invoke(
        "tune", rec, "--data", str(val), "--base", str(tune_base), "--search", "last",
        "--budget", "3", "--out", str(tmp_path / "b.yaml"), "--cache-memory", "0",
    )  # fmt: skip
    assert code == 0, out
    assert "baseline: uniform" in out and "chose" in out and f"wrote {tmp_path / 'b.yaml'}" in out
    assert (tmp_path / "b.yaml").is_file()


@pytest.mark.parametrize(
    ("extra", "needle", "code"),
    [
        (["--search", "nope"], "unknown search 'nope'", 2),
        (["--budget", "0"], "--budget must be at least 1", 2),
        (["--metric", "bleu"], "bleu", 1),
        (["--cache-memory", "lots"], "--cache-memory: size 'lots' needs a number and a unit", 2),
    ],
)
def test_cli_tune_errors_are_one_line(
    tune_run: Path,
    tune_base: Path,
    val_test: tuple[Path, Path],
    tmp_path: Path,
    extra: list[str],
    needle: str,
    code: int,
) -> None:
    rec = str(write_recipe(tmp_path, tune_run))
    got, out = _invoke("tune", rec, "--data", str(val_test[0]), "--base", str(tune_base), *extra)
    assert got == code, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out


def test_cli_tune_bad_row_is_one_line_naming_it(
    tune_run: Path, tune_base: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "val.jsonl"
    bad.write_text('{"text": "w6 w7"}\n{"prompt": 3}\n', encoding="utf-8")
    rec = str(write_recipe(tmp_path, tune_run))
    got, out = _invoke("tune", rec, "--data", str(bad), "--base", str(tune_base))
    assert got == 1 and out.count("\n") == 1 and f"{bad}:2" in out, out


def test_cli_tune_missing_data_and_one_checkpoint(
    tune_run: Path, val_test: tuple[Path, Path], tmp_path: Path
) -> None:
    rec = str(write_recipe(tmp_path, tune_run))
    got, out = _invoke("tune", rec, "--data", str(tmp_path / "nope.jsonl"))
    assert got == 2 and out.count("\n") == 1 and "VAL data file not found" in out, out
    one = str(write_recipe(tmp_path, tune_run, select={"run": str(tune_run), "last": 1}))
    got, out = _invoke("tune", one, "--data", str(val_test[0]))
    assert got == 2 and out.count("\n") == 1 and "at least 2 checkpoints" in out, out


def test_unusable_out_and_trial_log(
    tune_run: Path, tune_base: Path, val_test: tuple[Path, Path], tmp_path: Path
) -> None:
    rec = str(write_recipe(tmp_path, tune_run))
    args = ["tune", rec, "--data", str(val_test[0]), "--base", str(tune_base)]
    for opt in ("--out", "--trial-log"):  # click refuses a folder: usage, exit 2
        got, out = _invoke(*args, opt, str(tmp_path))
        assert got == 2 and "is a directory" in out, out
    kw: dict[str, Any] = dict(data=val_test[0], scorer=HASH, searches="last", budget=1)
    with pytest.raises(OutputError, match="--out is a folder"):
        tune(rec, out=tmp_path, **kw)
    with pytest.raises(UsageError, match="cannot use the trial log"):
        tune(rec, trial_log=tmp_path, **kw)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        tune(rec, out=tmp_path / "file" / "best.yaml", **kw)


def test_searches_run_in_order_with_their_prerequisites() -> None:
    from mwakit.tune.run import _searches

    assert _searches("greedy,penalty") == ["penalty", "greedy"]
    assert _searches(["weights"]) == ["penalty", "weights"]
    assert _searches("groups, last") == ["penalty", "last", "groups"]
    with pytest.raises(UsageError, match="no search given"):
        _searches([])


def test_best_yaml_of_a_recipe_relative_to_its_folder(
    tune_run: Path, val_test: tuple[Path, Path], tmp_path: Path
) -> None:
    # relative_to: recipe — the run and the output are named from the recipe's folder; the
    # tune's best.yaml, written elsewhere, must still point at the same places.
    conf = tmp_path / "conf"
    conf.mkdir()
    run_link = tmp_path / "run"
    run_link.symlink_to(tune_run)
    rec = conf / "recipe.yaml"
    rec.write_text(
        yaml.safe_dump(
            {
                "relative_to": "recipe",
                "select": {"run": "../run"},
                "output": {"path": "../merged"},
                "device": "cpu",
            }
        )
    )
    out = tmp_path / "elsewhere" / "best.yaml"
    tune(rec, data=val_test[0], scorer=HASH, searches="last", budget=2, out=out, plot=False)
    doc = yaml.safe_load(out.read_text())
    assert "relative_to" not in doc
    assert Path(doc["output"]["path"]) == (tmp_path / "merged").resolve()
    assert all(Path(c["path"]).is_absolute() for c in doc["checkpoints"])
    assert load_recipe(out).output.path == doc["output"]["path"]
