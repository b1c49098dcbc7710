"""Recipe input a user can produce: every one is a located one-line message, never an internal
error, and silent merges (duplicate keys, ignored weights) are refused."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from .harness import assert_clean_failure, invoke, snapshot
from .inputs import recipe, run_of_adapters


@pytest.fixture
def cks(tmp_path: Path) -> list[Path]:
    return run_of_adapters(tmp_path / "run", 2)


def _write(tmp: Path, text: str | bytes) -> Path:
    path = tmp / "r.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_duplicate_keys_name_both_lines(cks: list[Path], tmp_path: Path) -> None:
    r = _write(
        tmp_path,
        f"method: mwa\nparams:\n  penalty: 0.5\n  metric: loss\n  penalty: 0.9\n"
        f"checkpoints: [{cks[0]}, {cks[1]}]\noutput: {tmp_path / 'out'}\nmethod: mwa\n",
    )
    for cmd in ("validate", "plan"):
        res = invoke(cmd, r)
        assert_clean_failure(res, out=tmp_path / "out", lines=3)
        _, first, second = res.stderr.splitlines()
        assert first.startswith("  line 5: key `penalty` is given twice, on lines 3 and 5")
        assert second.startswith("  line 8: key `method` is given twice, on lines 1 and 8")


def test_merge_keys_may_be_overridden(cks: list[Path], tmp_path: Path) -> None:
    # `<<: *base` then an explicit key is YAML's way to override, not a duplicate.
    r = _write(
        tmp_path,
        f"defaults: &d {{metric: loss, penalty: 0.5}}\n"
        f"checkpoints: [{cks[0]}, {cks[1]}]\noutput: {tmp_path / 'out'}\n",
    )
    res = invoke("validate", r)
    assert res.exit_code == 1 and "defaults: unknown key" in res.stderr  # but no duplicate
    r = _write(
        tmp_path,
        f"params: {{<<: {{metric: loss, penalty: 0.5}}, penalty: 0.9}}\n"
        f"checkpoints: [{cks[0]}, {cks[1]}]\noutput: {tmp_path / 'out'}\n",
    )
    assert invoke("validate", r).exit_code == 0


def test_non_utf8_recipe(tmp_path: Path) -> None:
    res = invoke("validate", _write(tmp_path, b"method: mwa\nname: caf\xe9\n"))
    assert_clean_failure(res, needle="line 2: the recipe is not UTF-8 text (byte 0xe9")


def test_deeply_nested_recipe(tmp_path: Path) -> None:
    res = invoke("plan", _write(tmp_path, "params: " + "[" * 5000 + "]" * 5000 + "\n"))
    assert_clean_failure(res, needle="nested too deeply")


def test_nul_byte_in_a_path(cks: list[Path], tmp_path: Path) -> None:
    r = recipe(tmp_path, {"checkpoints": [str(cks[0]) + "\0x", str(cks[1])]})
    for args in (("validate", "--schema-only"), ("plan",)):
        res = invoke(*args, r)
        assert_clean_failure(res, needle="checkpoints.0.path: the path contains a NUL byte")
        assert "\0" not in res.stderr


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("1e30", "delta_rank must be concat, full or a rank (a whole number ≥ 1), got '1e30'"),
        ("2.5", "got 2.5"),
        ("true", "got True"),
        ("-3", "got -3"),
    ],
)
def test_absurd_delta_rank_text(text: str, needle: str, cks: list[Path], tmp_path: Path) -> None:
    r = _write(
        tmp_path,
        f"checkpoints: [{cks[0]}, {cks[1]}]\nlora_space: delta\ndelta_rank: {text}\n"
        f"output: {tmp_path / 'out'}\n",
    )
    assert_clean_failure(invoke("validate", "--schema-only", r), needle=needle)


def test_huge_delta_rank_is_cut_to_full_rank(cks: list[Path], tmp_path: Path) -> None:
    r = _write(
        tmp_path,
        f"checkpoints: [{cks[0]}, {cks[1]}]\nlora_space: delta\ndelta_rank: 1.0e+30\n"
        f"device: cpu\noutput: {tmp_path / 'out'}\n",
    )
    res = invoke("run", "-q", r)
    assert res.exit_code == 0, res.output
    assert "more than 2 module(s) can hold" in res.stderr
    out = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert out["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (16, 16)


@pytest.mark.parametrize(
    ("data", "loc", "needle"),
    [
        ({"method": "mwa"}, "checkpoints.0.weight", "method mwa computes its own weights"),
        (
            {"method": "slerp", "lora_space": "delta", "delta_rank": 4},
            "checkpoints.0.weight",
            "method slerp computes its own weights",
        ),
        (
            {"method": "linear", "weighting": {"mwa": {"metric": "loss"}}},
            "checkpoints.0.weight",
            "`weighting:` computes every checkpoint's weight",
        ),
        (
            {"method": "mwa", "weighting": {"mwa": {"metric": "step"}}},
            "weighting",
            "method mwa computes its own weights, so `weighting:` would be ignored",
        ),
    ],
)
def test_weights_the_method_would_ignore(
    data: dict[str, Any], loc: str, needle: str, cks: list[Path], tmp_path: Path
) -> None:
    weighted = [{"path": str(cks[0]), "weight": 2.0}, str(cks[1])]
    if loc == "weighting":
        weighted = [str(c) for c in cks]
    r = recipe(tmp_path, {**data, "checkpoints": weighted})
    res = invoke("validate", "--schema-only", r)
    assert_clean_failure(res, needle=f"{loc}: {needle}")


def test_weights_that_overflow_float32(cks: list[Path], tmp_path: Path) -> None:
    r = recipe(
        tmp_path,
        {
            "method": "linear",
            "params": {"normalize": False},
            "checkpoints": [{"path": str(c), "weight": 1e308} for c in cks],
        },
    )
    before = snapshot(tmp_path)
    res = invoke("run", r)
    assert_clean_failure(
        res,
        needle="checkpoint-10, checkpoint-20: weight 1e+308 cannot be computed with",
        out=tmp_path / "out",
        before=before,
        inputs=[tmp_path],
    )


def test_plot_into_a_missing_folder(cks: list[Path], tmp_path: Path) -> None:
    r = recipe(tmp_path, {"checkpoints": [str(c) for c in cks]})
    res = invoke("plan", r, "--plot", tmp_path / "no" / "such" / "w.png")
    assert_clean_failure(res, needle="does not exist")
    assert res.stdout == "" and not (tmp_path / "no").exists()
    res = invoke("plan", r, "--plot", tmp_path)  # click itself refuses a folder: usage, 2
    assert res.exit_code == 2 and "is a directory" in res.output


def test_plot_where_nothing_may_be_written(cks: list[Path], tmp_path: Path) -> None:
    # /sys refuses new files even to root: the real EACCES of a folder one cannot write to.
    r = recipe(tmp_path, {"checkpoints": [str(c) for c in cks]})
    res = invoke("plan", r, "--plot", "/sys/weights.png")
    assert_clean_failure(res, needle="cannot write the plot")
    assert res.stdout == "" and not list(Path("/sys").glob(".weights.png.mwakit-*"))


# -- fuzz: any YAML value in any recipe field --------------------------------------------------

_FIELDS: list[tuple[str | int, ...]] = [
    ("name",), ("method",), ("params",), ("params", "metric"), ("params", "penalty"),
    ("params", "transform"), ("params", "higher_is_better"), ("params", "density"),
    ("checkpoints",), ("checkpoints", 0), ("checkpoints", 0, "path"),
    ("checkpoints", 0, "metrics"), ("checkpoints", 1, "weight"), ("select",),
    ("rules",), ("rules", 0, "match"), ("rules", 0, "params"), ("lora_space",),
    ("delta_rank",), ("loss_window",), ("dtype",), ("out_dtype",), ("device",),
    ("allow_pickle",), ("weighting",), ("weighting", "mwa"), ("base_model",),
    ("allow_mixed_bases",), ("output",), ("output", "path"), ("output", "shard_size"),
    ("output", "hub"), ("surprise",),
]  # fmt: skip
_WORDS = st.sampled_from(
    ["", "\0", "concat", "full", "delta", "factors", "hf://org/r@x/y", "..", "/", "-1", "1e30",
     "cuda:3", "float16", "rank", "softmax", "step", "loss", "5GB", "0B", "*", "[", "ties",
     "slerp", "model_stock", "fisher"]
)  # fmt: skip
_LEAF = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-3, 40)
    | st.floats()
    | st.text(max_size=8)
    | _WORDS
)
_VALUE = st.recursive(
    _LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(_WORDS, c, max_size=3), max_leaves=6
)


def _put(doc: dict[str, Any], path: tuple[str | int, ...], value: Any) -> None:
    cur: Any = doc
    for k in path[:-1]:
        nxt = cur.get(k) if isinstance(cur, dict) else None
        if isinstance(cur, list) and isinstance(k, int) and k < len(cur):
            nxt = cur[k] = {"path": cur[k]} if isinstance(cur[k], str) else cur[k]
        if not isinstance(nxt, dict | list):
            nxt = {}
            if isinstance(cur, dict):
                cur[k] = nxt
        cur = nxt
    last = path[-1]
    in_list = isinstance(cur, list) and isinstance(last, int) and last < len(cur)
    if isinstance(cur, dict) or in_list:
        cur[last] = value


def test_fuzz_any_value_in_any_field(tmp_path: Path) -> None:
    cks = run_of_adapters(tmp_path / "run", 3)
    bases = [
        {"method": "mwa", "params": {"metric": "loss"}, "checkpoints": [str(c) for c in cks]},
        {
            "method": "ties",
            "params": {"density": 0.5},
            "select": {"run": str(tmp_path / "run"), "last": 2},
            "lora_space": "delta",
            "delta_rank": "full",
            "rules": [{"match": "*q_proj*", "params": {"density": 0.3}}],
        },
        {
            "method": "linear",
            "checkpoints": [{"path": str(c), "weight": 1.0 + i} for i, c in enumerate(cks)],
            "weighting": None,
        },
    ]
    path = tmp_path / "r.yaml"

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.sampled_from(range(len(bases))),
        st.lists(st.tuples(st.sampled_from(_FIELDS), _VALUE), min_size=1, max_size=2),
    )
    def check(base: int, changes: list[tuple[tuple[str | int, ...], Any]]) -> None:
        doc = copy.deepcopy(bases[base])
        doc.update(device="cpu", output={"path": str(tmp_path / "out")})
        for field, value in changes:
            _put(doc, field, value)
        path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
        validated, planned = invoke("validate", path), invoke("plan", path)
        assert validated.exit_code == planned.exit_code, (validated.output, planned.output)
        if validated.exit_code != 0:
            assert_clean_failure(validated, lines=None)
            assert planned.stderr == validated.stderr
        assert not (tmp_path / "out").exists()

    check()
