"""`MergeCallback` on real `transformers.Trainer` (and TRL `SFTTrainer`) runs of the tiny Llama.

The callback's output must be what ``mwakit run`` writes for the equivalent recipe, byte for
byte in adapter_model.safetensors.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from mwakit.cli import main
from mwakit.errors import RecipeError, UsageError
from mwakit.integrations import MergeCallback

from .conftest import Train, build_trainer

WEIGHTS = "adapter_model.safetensors"


def _importable(name: str) -> bool:
    # A real import, not find_spec: an editable install elsewhere can make find_spec answer
    # for a module this tree does not have, whose import then fails.
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


HAS_TUNE = _importable("mwakit.tune")


def _cli_run(recipe: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    res = CliRunner().invoke(main, ["run", str(path)])
    assert res.exit_code == 0, res.output
    return Path(recipe["output"]["path"])


@pytest.mark.slow
def test_outputs_equal_mwakit_run_of_the_same_recipe(train: Train, tmp_path: Path) -> None:
    run = tmp_path / "run"
    recipe_file = tmp_path / "merge.yaml"
    # A recipe with no run and no output: the callback fills both in.
    recipe_file.write_text(
        "method: linear\nselect: {last: 2}\nlora_space: delta\n", encoding="utf-8"
    )
    by_keywords = MergeCallback(
        method="mwa", metric="eval_loss", penalty=2.0, last=3, output_dir=tmp_path / "kw"
    )
    by_recipe = MergeCallback(recipe=recipe_file)
    train(run, [by_keywords, by_recipe], steps=8, save_steps=2)

    assert sorted(p.name for p in run.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
        "checkpoint-8",
    ]
    assert by_keywords.result is not None and by_recipe.result is not None
    assert [c.name for c in by_keywords.result.plan.checkpoints] == [
        "checkpoint-4",
        "checkpoint-6",
        "checkpoint-8",
    ]
    # MWA on eval_loss, read from each checkpoint's trainer_state.json: not uniform.
    assert len(set(by_keywords.result.plan.weights)) == 3
    assert by_recipe.result.path == run / "merged"

    kw_cli = _cli_run(
        {
            "method": "mwa",
            "params": {"metric": "eval_loss", "penalty": 2.0},
            "select": {"run": str(run), "last": 3},
            "output": {"path": str(tmp_path / "kw-cli")},
        },
        tmp_path / "kw.yaml",
    )
    recipe_cli = _cli_run(
        {
            "method": "linear",
            "select": {"run": str(run), "last": 2},
            "lora_space": "delta",
            "output": {"path": str(tmp_path / "recipe-cli")},
        },
        tmp_path / "r.yaml",
    )
    for ours, cli in ((tmp_path / "kw", kw_cli), (run / "merged", recipe_cli)):
        assert (ours / WEIGHTS).read_bytes() == (cli / WEIGHTS).read_bytes()
        assert (ours / "adapter_config.json").read_text() == (
            cli / "adapter_config.json"
        ).read_text()


@pytest.mark.slow
def test_sft_trainer(tmp_path: Path, tiny_base: Path, word_tokenizer: Any) -> None:
    import torch
    from datasets import Dataset
    from make_run import _one_thread, _preserved_rng, _quiet, load_base, lora_config
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from .conftest import WORDS, _common

    words = WORDS[:16]
    texts = [" ".join(words[(i + k) % 16] for k in range(8)) for i in range(32)]
    run = tmp_path / "sft"
    cb = MergeCallback(method="mwa", metric="loss", penalty=1.0, last=2)
    with _quiet(), _preserved_rng(), _one_thread():
        torch.manual_seed(0)
        # 5 steps, a checkpoint every 2: the Trainer also saves the last step (checkpoint-5).
        args = SFTConfig(**_common(run, steps=5, save_steps=2, evaluate=False), max_length=16)
        trainer = SFTTrainer(
            model=load_base(tiny_base),
            args=args,
            train_dataset=Dataset.from_dict({"text": texts}),
            processing_class=word_tokenizer,
            peft_config=lora_config(r=4, lora_alpha=8, lora_dropout=0.0),
            callbacks=[cb],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    assert cb.result is not None and cb.result.path == run / "merged"
    assert [c.name for c in cb.result.plan.checkpoints] == ["checkpoint-4", "checkpoint-5"]
    cli = _cli_run(
        {
            "method": "mwa",
            "params": {"metric": "loss", "penalty": 1.0},
            "select": {"run": str(run), "last": 2},
            "output": {"path": str(tmp_path / "cli")},
        },
        tmp_path / "sft.yaml",
    )
    assert (run / "merged" / WEIGHTS).read_bytes() == (cli / WEIGHTS).read_bytes()


def test_warns_when_save_total_limit_keeps_fewer_than_last(tmp_path: Path, tiny_base: Path) -> None:
    with pytest.warns(UserWarning, match=r"save_total_limit=2 keeps only 2 .* last=5"):
        build_trainer(tmp_path / "run", tiny_base, [MergeCallback(last=5)], save_total_limit=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=r"(?!MergeCallback)")  # only ours matter here
        build_trainer(tmp_path / "ok", tiny_base, [MergeCallback(last=2)], save_total_limit=2)


def test_warns_when_the_recipe_names_another_run(tmp_path: Path, tiny_base: Path) -> None:
    cb = MergeCallback(recipe={"select": {"run": "runs/other", "last": 2}})
    with pytest.warns(UserWarning, match="select.run runs/other is not the Trainer's output_dir"):
        build_trainer(tmp_path / "run", tiny_base, [cb])
    select = cb.recipe_for(tmp_path / "run").select
    assert select is not None and select.run == str(tmp_path / "run") and select.last == 2


def test_warns_when_the_metric_is_never_evaluated(tmp_path: Path, tiny_base: Path) -> None:
    with pytest.warns(UserWarning, match="eval_strategy='no'"):
        build_trainer(tmp_path, tiny_base, [MergeCallback(metric="eval_loss")], evaluate=False)


def test_refuses_a_trainer_that_saves_nothing(tmp_path: Path, tiny_base: Path) -> None:
    with pytest.raises(UsageError, match="saves no checkpoints"):
        build_trainer(tmp_path, tiny_base, [MergeCallback()], save_strategy="no")


def test_only_the_main_process_merges(tmp_path: Path) -> None:
    from transformers import TrainerControl, TrainerState

    cb = MergeCallback(output_dir=tmp_path / "out")
    args = type("Args", (), {"output_dir": str(tmp_path / "missing-run")})()
    cb.on_train_end(args, TrainerState(is_world_process_zero=False), TrainerControl())
    assert cb.result is None and not (tmp_path / "out").exists()


def test_recipe_problems_fail_at_construction(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="penalty"):
        MergeCallback(penalty=-1.0)
    with pytest.raises(RecipeError, match="unknown method"):
        MergeCallback(method="nope")
    listed = tmp_path / "listed.yaml"
    listed.write_text("method: linear\ncheckpoints: [a, b]\noutput: out\n", encoding="utf-8")
    with pytest.raises(UsageError, match="lists checkpoints"):
        MergeCallback(recipe=listed)
    with pytest.raises(UsageError, match="computes its own weights"):
        MergeCallback(method="slerp", metric="eval_loss")


def test_keywords_map_onto_the_recipe(tmp_path: Path) -> None:
    recipe = MergeCallback(method="ties", metric="eval_loss", penalty=1.5, last=4).recipe_for(
        tmp_path / "run"
    )
    assert recipe.method == "ties"
    assert recipe.weighting is not None
    assert recipe.weighting.mwa == {"metric": "eval_loss", "penalty": 1.5}
    assert recipe.select is not None and recipe.select.run == str(tmp_path / "run")
    assert recipe.select.last == 4 and recipe.output.path == str(tmp_path / "run" / "merged")


@pytest.mark.skipif(HAS_TUNE, reason="mwakit.tune is installed: tune= is accepted")
def test_tune_without_mwakit_tune_is_refused_at_construction() -> None:
    for tune in (True, {}, {"searches": "penalty"}):
        with pytest.raises(UsageError, match="tune is not available"):
            MergeCallback(tune=tune)
    assert MergeCallback(tune=False).result is None  # no tune asked for: accepted


def test_eval_rows_from_tokenised_and_text_rows(word_tokenizer: Any) -> None:
    import torch

    from mwakit.integrations import eval_rows

    tok = word_tokenizer
    ids = tok("w1 w2 w3 w4")["input_ids"]
    rows = [
        # prompt w1 w2 (labels masked), completion w3 w4, one pad token at the end.
        {
            "input_ids": torch.tensor([*ids, 0]),
            "labels": torch.tensor([-100, -100, ids[2], ids[3], -100]),
            "attention_mask": torch.tensor([1, 1, 1, 1, 0]),
        },
        {"input_ids": ids, "labels": ids},
        # TRL's prompt-completion layout: completion_mask instead of labels.
        {"input_ids": ids, "completion_mask": [0, 1, 1, 1]},
        {"text": "w5 w6"},
        {"prompt": "w7", "completion": "w8"},
    ]
    assert eval_rows(rows, tok) == [
        {"prompt": "w1 w2", "completion": "w3 w4"},
        {"text": "w1 w2 w3 w4"},
        {"prompt": "w1", "completion": "w2 w3 w4"},
        {"text": "w5 w6"},
        {"prompt": "w7", "completion": "w8"},
    ]
    with pytest.raises(UsageError, match="no tokenizer"):
        eval_rows([{"input_ids": ids}])
    with pytest.raises(UsageError, match="neither text fields"):
        eval_rows([{"pixels": [1]}], tok)


def test_an_existing_output_is_refused_before_training(tmp_path: Path, tiny_base: Path) -> None:
    from mwakit.errors import OutputError

    (tmp_path / "run" / "merged").mkdir(parents=True)
    with pytest.raises(OutputError, match=r"already exists.*overwrite=True"):
        build_trainer(tmp_path / "run", tiny_base, [MergeCallback()])
    build_trainer(tmp_path / "run", tiny_base, [MergeCallback(overwrite=True)])


HAS_EVAL = _importable("mwakit.evaluate")


@pytest.mark.slow
@pytest.mark.skipif(not (HAS_TUNE and HAS_EVAL), reason="needs mwakit.tune and mwakit.evaluate")
def test_tune_on_the_trainers_eval_dataset(
    tmp_path: Path, tiny_base: Path, word_tokenizer: Any
) -> None:
    import torch
    from make_run import _one_thread, _preserved_rng, _quiet, load_base, lora_config
    from peft import get_peft_model
    from transformers import PrinterCallback, Trainer

    from .conftest import WORDS, training_args

    def rows(n: int, seed: int) -> list[dict[str, list[int]]]:
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            start = int(torch.randint(0, 16, (1,), generator=g))
            text = " ".join(WORDS[(start + k) % 16] for k in range(8))
            ids = word_tokenizer(text)["input_ids"]
            out.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * len(ids)})
        return out

    run = tmp_path / "run"
    cb = MergeCallback(last=3, tune={"searches": "penalty", "budget": 3})
    with _quiet(), _preserved_rng(), _one_thread():
        torch.manual_seed(0)
        model = get_peft_model(load_base(tiny_base), lora_config(lora_dropout=0.0))
        trainer = Trainer(
            model=model,
            args=training_args(run, steps=6, save_steps=2, evaluate=True),
            train_dataset=rows(32, 0),
            eval_dataset=rows(8, 1),
            processing_class=word_tokenizer,
            callbacks=[cb],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    tuned = run / "mwakit-tuned.yaml"
    assert tuned.is_file() and cb.result is not None and cb.result.path == run / "merged"
    # The written adapter is what `mwakit run` of the chosen recipe writes.
    chosen = yaml.safe_load(tuned.read_text(encoding="utf-8"))
    # The eval rows it scored on stay beside it: the tuning record names that file.
    data = run / "mwakit-tune-eval.jsonl"
    assert len(data.read_text(encoding="utf-8").splitlines()) == 8
    assert chosen["tuning"]["data"]["val"]["path"] == str(data)
    chosen["output"] = {"path": str(tmp_path / "cli")}
    cli = _cli_run(chosen, tmp_path / "chosen.yaml")
    assert (run / "merged" / WEIGHTS).read_bytes() == (cli / WEIGHTS).read_bytes()
