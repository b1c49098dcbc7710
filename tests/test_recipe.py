"""Recipe schema: every problem reported at once, each with its location."""

from __future__ import annotations

from pathlib import Path

import pytest

from mwakit.errors import RecipeError
from mwakit.recipe import dump_recipe, load_recipe, parse_recipe

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"


def _base(**kw: object) -> dict[str, object]:
    data: dict[str, object] = {
        "method": "mwa",
        "checkpoints": [{"path": "a"}, {"path": "b"}],
        "output": {"path": "out"},
    }
    data.update(kw)
    return data


def _problems(data: object) -> list[str]:
    with pytest.raises(RecipeError) as exc:
        parse_recipe(data, source="r.yaml")
    return [str(p) for p in exc.value.problems]


def test_minimal_recipe_gets_defaults() -> None:
    r = parse_recipe(_base())
    assert r.method == "mwa" and r.lora_space == "factors" and r.delta_rank == "concat"
    assert r.dtype == "float32" and r.out_dtype is None and r.device == "auto"
    p = r.method_params()
    assert p.model_dump() == {
        "metric": "loss",
        "penalty": 0.7,
        "transform": "power",
        "higher_is_better": None,
    }


def test_bare_string_checkpoints_and_output() -> None:
    r = parse_recipe({"checkpoints": ["x/checkpoint-1", "x/checkpoint-2"], "output": "o"})
    assert r.checkpoints is not None
    assert [c.path for c in r.checkpoints] == ["x/checkpoint-1", "x/checkpoint-2"]
    assert r.output.path == "o"


def test_every_problem_is_reported_at_once_with_its_location() -> None:
    probs = _problems(
        _base(
            params={"penalty": -1, "metirc": "loss"},
            lora_space="delta-ish",
            device="tpu",
            rules=[{"match": "*.mlp.*", "params": {"transform": "cubic"}}],
            output={"path": "o", "overwrite": "maybe"},
            colour="blue",
        )
    )
    locs = {p.split(":")[0] for p in probs}
    assert {
        "params.penalty",
        "params.metirc",
        "lora_space",
        "device",
        "rules.0.params.transform",
        "output.overwrite",
        "colour",
    } <= locs, probs
    assert any("unknown key" in p for p in probs if p.startswith("params.metirc"))


def test_rule_problems_do_not_repeat_top_level_ones() -> None:
    probs = _problems(_base(params={"penalty": -1}, rules=[{"match": "*", "params": {}}]))
    assert [p.split(":")[0] for p in probs] == ["params.penalty"]


def test_unknown_method_lists_known_ones() -> None:
    probs = _problems(_base(method="avg"))
    assert len(probs) == 1 and probs[0].startswith("method:")
    assert "mwa" in probs[0] and "linear" in probs[0]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"checkpoints": None}, "exactly one of `checkpoints:`"),
        ({"select": {"run": "r", "last": 2}}, "exactly one of `checkpoints:`"),
        ({"checkpoints": []}, "is empty"),
        ({"delta_rank": 8}, "delta_rank applies only with lora_space: delta"),
        ({"delta_rank": "full"}, "delta_rank applies only with lora_space: delta"),
        ({"lora_space": "delta", "delta_rank": "fulll"}, "delta_rank"),
        ({"checkpoints": None, "select": {"run": "r", "steps": [9, 3]}}, "is empty: write [low"),
        ({"checkpoints": None, "select": {"run": "r", "last": 0}}, "select.last"),
        ({"loss_window": 0}, "loss_window"),
        ({"dtype": "int8"}, "dtype"),
        ({"params": {"penalty": float("nan")}}, "penalty"),
        ({"params": {"metric": "  "}}, "metric must name a metric"),
    ],
)
def test_bad_recipes(change: dict[str, object], needle: str) -> None:
    data = _base()
    for k, v in change.items():
        if v is None:
            data.pop(k)
        else:
            data[k] = v
    assert any(needle in p for p in _problems(data)), _problems(data)


def test_not_a_mapping() -> None:
    assert _problems(["a", "b"]) == ["a recipe is a YAML mapping (key: value lines)"]


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("method: mwa\nparams: {penalty: 0.7\n", encoding="utf-8")
    with pytest.raises(RecipeError) as exc:
        load_recipe(f)
    assert exc.value.source == str(f)
    assert "line 3" in str(exc.value.problems[0]) or "line 2" in str(exc.value.problems[0])


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "nope.yaml")


def test_dump_round_trips() -> None:
    r = parse_recipe(_base(params={"metric": "step", "penalty": 1.0}, lora_space="delta"))
    import yaml

    assert parse_recipe(yaml.safe_load(dump_recipe(r))) == r


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_recipe_validates(path: Path) -> None:
    r = load_recipe(path)
    assert r.output.path
    r.method_params()
    for rule in r.rules:
        r.method_params(rule)
