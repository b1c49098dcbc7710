"""`mwakit validate` is the whole plan without tensor bytes: it fails exactly where `plan` (and
so `run`) fails, with the same message, and reports every problem at once. `--schema-only`
keeps the fast check of the recipe file alone, which catches what the recipe decides alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .harness import assert_clean_failure, invoke, snapshot
from .inputs import adapter, recipe, run_of_adapters

Build = Callable[[list[Path], Path], dict[str, Any]]


def _ck(paths: list[Path]) -> list[str]:
    return [str(p) for p in paths]


def _other_base(cks: list[Path], tmp: Path) -> dict[str, Any]:
    odd = adapter(tmp / "odd" / "checkpoint-5", seed=9, base="org/another-base")
    return {"checkpoints": [*_ck(cks[:2]), str(odd)]}


def _int_factor(cks: list[Path], tmp: Path) -> dict[str, Any]:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    odd = adapter(tmp / "odd" / "checkpoint-5", seed=9, tensors={key: torch_int((4, 16))})
    return {"checkpoints": [*_ck(cks[:1]), str(odd)]}


def torch_int(shape: tuple[int, ...]) -> Any:
    import torch

    return torch.randint(-3, 3, shape, dtype=torch.int32)


# name: (recipe data, text of the message, whether the recipe alone decides it)
CASES: dict[str, tuple[Build, str, bool]] = {
    "missing path": (
        lambda c, t: {"checkpoints": [str(c[0]), str(t / "nope" / "checkpoint-9")]},
        "checkpoint folder not found",
        False,
    ),
    "unknown metric": (
        lambda c, t: {
            "checkpoints": _ck(c),
            "params": {"metric": "eval_accuracy", "higher_is_better": True},
        },
        "metric 'eval_accuracy' not found",
        False,
    ),
    "rank penalty > 1": (
        lambda c, t: {"checkpoints": _ck(c), "params": {"transform": "rank", "penalty": 2}},
        "must be in [0, 1]",
        True,
    ),
    "ties on factors": (
        lambda c, t: {"checkpoints": _ck(c), "method": "ties"},
        "acts on ΔW, not on LoRA factors",
        False,
    ),
    "ties concatenated": (
        lambda c, t: {"checkpoints": _ck(c), "method": "ties", "lora_space": "delta"},
        "cannot be concatenated",
        True,
    ),
    "fisher in delta": (
        lambda c, t: {"checkpoints": _ck(c), "method": "fisher", "lora_space": "delta"},
        "works on LoRA factors only",
        True,
    ),
    "slerp of three": (
        lambda c, t: {
            "checkpoints": _ck(c),
            "method": "slerp",
            "lora_space": "delta",
            "delta_rank": 4,
        },
        "takes exactly 2 checkpoints",
        True,
    ),
    "model_stock of one": (
        lambda c, t: {
            "select": {"run": str(c[0].parent), "last": 1},
            "method": "model_stock",
            "lora_space": "delta",
            "delta_rank": 4,
        },
        "takes at least 2 checkpoints, select.last keeps 1",
        True,
    ),
    "weight with mwa": (
        lambda c, t: {"checkpoints": [{"path": str(c[0]), "weight": 3}, str(c[1])]},
        "computes its own weights",
        True,
    ),
    "different bases": (_other_base, "come from different base models", False),
    "listed twice": (
        lambda c, t: {"checkpoints": [str(c[0]), str(c[1]), f"{c[0].parent}/./{c[0].name}"]},
        "is the same checkpoint as checkpoints.0",
        False,
    ),
    "integer lora_A": (_int_factor, "factors must be floating point", False),
}


@pytest.fixture
def cks(tmp_path: Path) -> list[Path]:
    return run_of_adapters(tmp_path / "run", 3)


@pytest.mark.parametrize("case", sorted(CASES))
def test_validate_fails_where_plan_fails(case: str, cks: list[Path], tmp_path: Path) -> None:
    build, needle, _ = CASES[case]
    r = recipe(tmp_path, build(cks, tmp_path))
    before = snapshot(tmp_path)
    res = invoke("validate", r)
    assert_clean_failure(res, needle=needle, out=tmp_path / "out", before=before, inputs=[tmp_path])
    # Same inputs, same verdict, same words: plan (and run) go through the very same checks.
    planned = invoke("plan", r)
    assert planned.exit_code == 1 and planned.stderr == res.stderr
    ran = invoke("run", r)
    assert ran.exit_code == 1 and ran.stderr == res.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", sorted(CASES))
def test_schema_only_sees_what_the_recipe_decides(
    case: str, cks: list[Path], tmp_path: Path
) -> None:
    build, needle, decides = CASES[case]
    res = invoke("validate", "--schema-only", recipe(tmp_path, build(cks, tmp_path)))
    if decides:
        assert_clean_failure(res, needle=needle)
    else:
        # It needs the checkpoints: the fast check cannot know, and says what it checked.
        assert res.exit_code == 0, res.output
        assert "schema only: no checkpoint was read" in res.stdout


def test_every_problem_is_reported_at_once(cks: list[Path], tmp_path: Path) -> None:
    odd = adapter(tmp_path / "odd" / "checkpoint-5", seed=9, base="org/another-base")
    r = recipe(
        tmp_path,
        {
            "checkpoints": [
                str(cks[0]),
                str(tmp_path / "gone-1"),
                str(odd),
                str(tmp_path / "gone-2"),
            ],
            "params": {"metric": "eval_loss"},
        },
    )
    before = snapshot(tmp_path)
    res = invoke("validate", r)
    assert_clean_failure(res, out=tmp_path / "out", before=before, inputs=[tmp_path], lines=4)
    head, *problems = res.stderr.splitlines()
    assert head == f"error: {r}: 3 problems"
    assert "checkpoint folder not found" in problems[0] and "(also in " in problems[0]
    assert str(tmp_path / "gone-2") in problems[0]
    assert "metric 'eval_loss' not found" in problems[1]
    assert "org/another-base" in problems[2] and "org/tiny-base" in problems[2]
    assert all(" — fix: " in p for p in problems)
    assert invoke("plan", r).stderr == res.stderr


def test_validate_ok_summarises_the_plan_and_warns(cks: list[Path], tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    r = recipe(tmp_path, {"checkpoints": _ck(cks), "lora_space": "delta", "delta_rank": 1000})
    res = invoke("validate", r)
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(
        f"ok: {r}: method mwa, 3 adapters, lora space delta (re-factorised to rank"
    )
    warnings = res.stderr.splitlines()
    # delta_rank beyond a module's full rank is cut to it (min(out, in) = 16), and said once.
    assert any("delta_rank 1000 is more than 2 module(s) can hold" in w for w in warnings)
    assert any("output folder" in w and "will refuse it" in w for w in warnings)
    doc = json.loads(invoke("plan", "--json", r).stdout)
    assert {t["rank"] for t in doc["tensors"] if t["kind"] == "lora"} == {16}
