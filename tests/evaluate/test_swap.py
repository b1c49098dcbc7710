"""Swapping candidates into one loaded model scores exactly what a fresh load scores.

The reference for each adapter is PEFT's own loading (`PeftModel.from_pretrained` on a freshly
loaded base) and the Trainer's loss (`labels=` → mean NLL per row); the Evaluator keeps one
model and swaps tensors (or re-creates the adapter slot when the structure changes).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import mwakit
from mwakit.errors import PlanError
from mwakit.evaluate import Evaluator, load_rows
from mwakit.evaluate.target import resolve_target
from mwakit.memory import merge_in_memory
from mwakit.recipe import parse_recipe

from ..conftest import MakeAdapter, trainer_state

TEXTS = ["w6 w9 w12 w15 w18", "w7 w8 w9", "w40 w50 w60 w70 w80 w90 w100", "w11 w11 w11 w11"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> list:
    f = tmp_path_factory.mktemp("rows") / "val.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return load_rows(f)


def _reference_loss(base: Path, adapter: Path | None) -> float:
    """Token-weighted mean NLL from a freshly loaded model and transformers' own loss."""
    from make_run import load_base
    from peft import PeftModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = load_base(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for t in TEXTS:
            ids = torch.tensor([tok(t)["input_ids"]])
            n = ids.shape[1] - 1
            total += float(model(input_ids=ids, labels=ids).loss) * n
            count += n
    return total / count


@pytest.fixture(scope="module")
def adapters(
    make_adapter: MakeAdapter, tok_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("swap")
    kw = {"modules_to_save": ["lm_head"]}
    return {
        "a": make_adapter(root / "a", seed=1, **kw),
        "b": make_adapter(root / "b", seed=2, **kw),
        # Same shapes as a/b, other scaling: PEFT must read rsLoRA and the patterns.
        "c": make_adapter(
            root / "c",
            seed=3,
            use_rslora=True,
            alpha_pattern={"v_proj": 32},
            lora_alpha=16,
            **kw,
        ),
        "d": make_adapter(root / "d", seed=4, r=8, rank_pattern={"q_proj": 2}),
        "dora": make_adapter(root / "dora", seed=5, use_dora=True),
    }


def test_swaps_equal_fresh_loads(tok_base: Path, adapters: dict[str, Path], rows: list) -> None:
    ev = Evaluator(tok_base, metrics=["loss"])
    order = ["a", "b", "c", "a", "d", "dora", "b", None]
    got = {}
    for name in order:
        adapter = None if name is None else resolve_target(adapters[name], tok_base).adapter
        got[name] = ev.score(rows, adapter).metrics["loss"]
    for name in dict.fromkeys(order):
        want = _reference_loss(tok_base, None if name is None else adapters[name])
        assert got[name] == pytest.approx(want, abs=1e-6), name
    # a → b is the same structure (tensors copied in place); every other change of structure
    # (c's scaling, d's ranks, DoRA, back to a and b) re-creates the adapter slot.
    assert (ev.model.swaps, ev.model.rebuilds) == (7, 6)
    assert len({round(v, 4) for v in got.values()}) == 6  # the candidates really differ


def test_in_memory_recipe_scores_as_the_written_adapter(
    tok_base: Path, adapters: dict[str, Path], rows: list, tmp_path: Path
) -> None:
    for name, loss in (("a", 1.5), ("b", 1.2)):
        st = trainer_state(10, [(s, loss) for s in range(1, 11)])
        (adapters[name] / "trainer_state.json").write_text(json.dumps(st))
    recipe = parse_recipe(
        {
            "method": "mwa",
            "params": {"penalty": 1.0},
            "checkpoints": [{"path": str(adapters[n])} for n in ("a", "b")],
            "lora_space": "delta",
            "delta_rank": 6,
            "output": {"path": str(tmp_path / "out")},
            "device": "cpu",
        }
    )
    ev = Evaluator(tok_base, metrics=["loss"])
    mem = ev.score(rows, merge_in_memory(recipe)).metrics["loss"]
    written = mwakit.run(recipe).path
    assert mem == pytest.approx(_reference_loss(tok_base, written), abs=1e-6)


def test_full_model_candidate_and_restore(
    tok_base: Path, adapters: dict[str, Path], rows: list, tmp_path: Path
) -> None:
    from make_run import bake_full_model
    from safetensors.torch import load_file

    from mwakit.memory import MergedAdapter

    full = bake_full_model(adapters["d"], tok_base, tmp_path / "full")
    ev = Evaluator(tok_base, metrics=["loss"])
    base_loss = ev.score(rows).metrics["loss"]
    a = resolve_target(adapters["a"], tok_base).adapter
    ev.score(rows, a)
    merged = MergedAdapter(load_file(full / "model.safetensors"), {}, "full")
    full_loss = ev.score(rows, merged).metrics["loss"]
    assert full_loss == pytest.approx(_reference_loss(tok_base, adapters["d"]), abs=1e-5)
    # Back to the base and to an adapter: the base weights were restored.
    assert ev.score(rows).metrics["loss"] == pytest.approx(base_loss, abs=1e-7)
    assert ev.score(rows, a).metrics["loss"] == pytest.approx(
        _reference_loss(tok_base, adapters["a"]), abs=1e-6
    )


def test_an_adapter_that_does_not_fit(
    tok_base: Path, adapters: dict[str, Path], rows: list
) -> None:
    ev = Evaluator(tok_base, metrics=["loss"])
    a = resolve_target(adapters["a"], tok_base).adapter
    assert a is not None
    key = next(k for k in a.tensors if "lora_A" in k)
    partial = dataclasses.replace(a, tensors={k: v for k, v in a.tensors.items() if k != key})
    with pytest.raises(PlanError, match=r"do not fit the model.*missing"):
        ev.score(rows, partial)
    renamed = dict(a.tensors)
    renamed[key.replace("layers.0", "layers.7")] = renamed.pop(key)
    with pytest.raises(PlanError, match="is not in the model"):
        ev.score(rows, dataclasses.replace(a, tensors=renamed))
