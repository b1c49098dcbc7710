"""Content of the checkpoints: mismatched bases, shapes, duplicates, integer factors, NaN/Inf,
values that overflow the written dtype, malformed adapter configs, unreadable folders.

Each is refused with one located line and a fix, before anything is written (or, for values
only the merge can see, with nothing left behind), and the inputs stay as they were.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from mwakit.execute import execute
from mwakit.recipe import load_recipe
from mwakit.validate import checked_plan

from .harness import assert_clean_failure, invoke, snapshot
from .inputs import adapter, full_model, recipe, run_of_adapters

ROOT = Path(__file__).resolve().parents[2]
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _fails(tmp: Path, data: dict[str, Any], needle: str, *cmds: str, lines: int = 1) -> str:
    """Each command fails cleanly with ``needle``; returns the last one's stderr."""
    r = recipe(tmp, data)
    before = snapshot(tmp)
    err = ""
    for cmd in cmds or ("validate", "run"):
        res = invoke(cmd, r)
        assert_clean_failure(
            res, needle=needle, out=tmp / "out", before=before, inputs=[tmp], lines=lines
        )
        err = res.stderr
    return err


def test_adapters_of_different_bases(tmp_path: Path) -> None:
    a = adapter(tmp_path / "a", seed=0, base="meta-llama/Llama-3.2-1B")
    b = adapter(tmp_path / "b", seed=1, base="meta-llama/Llama-3.2-3B")
    _fails(
        tmp_path,
        {"checkpoints": [str(a), str(b)]},
        "b has base model 'meta-llama/Llama-3.2-3B', a has 'meta-llama/Llama-3.2-1B'",
    )


def test_allow_mixed_bases_merges_with_a_warning(tmp_path: Path) -> None:
    # One model under two names: a local copy and its Hub id, case aside.
    a = adapter(tmp_path / "a", seed=0, base="Org/Tiny-Base")
    b = adapter(tmp_path / "b", seed=1, base="org/tiny-base")
    c = adapter(tmp_path / "c", seed=2, base=str(tmp_path / "local-copy"))
    r = recipe(tmp_path, {"checkpoints": [str(a), str(b)]})
    assert invoke("validate", r).exit_code == 0  # a Hub id's case does not count
    r = recipe(tmp_path, {"checkpoints": [str(a), str(c)], "allow_mixed_bases": True})
    res = invoke("run", "-q", r)
    assert res.exit_code == 0, res.output
    assert "merged anyway (allow_mixed_bases: true)" in res.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_full_models_of_different_architectures(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    t = {"w": torch.randn(4, 4, generator=g)}
    a = full_model(tmp_path / "a", t)
    b = full_model(tmp_path / "b", t, arch="MistralForCausalLM", model_type="mistral")
    _fails(
        tmp_path,
        {"method": "linear", "checkpoints": [str(a), str(b)]},
        "b has architecture 'mistral MistralForCausalLM', a has 'llama LlamaForCausalLM'",
    )


def test_full_models_of_different_shapes(tmp_path: Path) -> None:
    a = full_model(tmp_path / "a", {"w": torch.zeros(4, 4), "v": torch.zeros(3)})
    b = full_model(tmp_path / "b", {"w": torch.zeros(4, 5), "v": torch.zeros(3)})
    data = {"method": "linear", "checkpoints": [str(a), str(b)]}
    _fails(tmp_path, data, "b w: shape [4, 5] differs from [4, 4]")


def test_adapters_of_different_widths(tmp_path: Path) -> None:
    a = adapter(tmp_path / "a", seed=0)
    b = adapter(tmp_path / "b", seed=1, dim=24)
    # Shapes never merge, allow_mixed_bases or not: one problem for the full tensors, one for
    # the LoRA factors (the second module folded into the first as "also in").
    _fails(
        tmp_path,
        {"checkpoints": [str(a), str(b)], "allow_mixed_bases": True},
        "shape [4, 24] does not fit [4, 16] of a (also in b base_model.model.model.layers.1",
        lines=3,
    )


def test_same_checkpoint_through_a_symlink(tmp_path: Path) -> None:
    a, b = run_of_adapters(tmp_path / "run", 2)
    (tmp_path / "alias").symlink_to(a)
    _fails(
        tmp_path,
        {"checkpoints": [str(a), str(b), str(tmp_path / "alias")]},
        f"checkpoints.2 {tmp_path / 'alias'}: is the same checkpoint as checkpoints.0",
    )


def test_select_over_a_symlinked_duplicate(tmp_path: Path) -> None:
    a, _ = run_of_adapters(tmp_path / "run", 2)
    (tmp_path / "run" / "checkpoint-30").symlink_to(a)
    _fails(tmp_path, {"select": {"run": str(tmp_path / "run")}}, "select #2")


def test_integer_lora_factors(tmp_path: Path) -> None:
    a = adapter(tmp_path / "a", seed=0)
    b = adapter(tmp_path / "b", seed=1, tensors={Q_A: torch.ones(4, 16, dtype=torch.int64)})
    _fails(tmp_path, {"checkpoints": [str(a), str(b)]}, f"b {Q_A}: LoRA factor has dtype I64")


Q_B = Q_A.replace("lora_A", "lora_B")


@pytest.mark.parametrize(
    ("a", "b"),
    [((4,), (16, 4)), ((4, 16, 3, 3), (16, 4)), ((4, 0), (0, 4)), ((4, 16), (16, 4, 1, 1))],
    ids=["1-D A", "conv A, linear B", "empty", "linear A, conv B"],
)
def test_factors_that_are_not_a_lora_layout(
    a: tuple[int, ...], b: tuple[int, ...], tmp_path: Path
) -> None:
    good = adapter(tmp_path / "good", seed=0)
    odd = adapter(tmp_path / "odd", seed=1, tensors={Q_A: torch.ones(a), Q_B: torch.ones(b)})
    data = {"checkpoints": [str(good), str(odd)], "lora_space": "delta", "delta_rank": 4}
    _fails(tmp_path, data, "not a LoRA layout", "validate")


def test_delta_space_with_no_lora_module(tmp_path: Path) -> None:
    # Only modules_to_save copies: nothing to re-factorise, the config keeps its r and alpha.
    folders = [
        full_model(tmp_path / f"p{i}", {"base_model.model.lm_head.weight": torch.ones(2, 2) * i})
        for i in range(2)
    ]
    for f in folders:
        (f / "config.json").unlink()
        (f / "model.safetensors").rename(f / "adapter_model.safetensors")
        (f / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    data = {"method": "linear", "checkpoints": [str(f) for f in folders], "lora_space": "delta"}
    res = invoke("run", "-q", recipe(tmp_path, {**data, "delta_rank": 4}))
    assert res.exit_code == 0, res.output
    out = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert torch.equal(out["base_model.model.lm_head.weight"], torch.full((2, 2), 0.5))
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 8


def test_float8_tensors(tmp_path: Path) -> None:
    w = torch.randn(4, 4).to(torch.float8_e4m3fn)
    a = full_model(tmp_path / "a", {"w": w})
    b = full_model(tmp_path / "b", {"w": w})
    _fails(tmp_path, {"method": "linear", "checkpoints": [str(a), str(b)]}, "F8_E4M3 (float8)")


def test_nan_in_an_input(tmp_path: Path) -> None:
    bad = torch.randn(4, 16)
    bad[1, 3] = float("nan")
    a = adapter(tmp_path / "a", seed=0)
    b = adapter(tmp_path / "b", seed=1, tensors={Q_A: bad})
    _fails(tmp_path, {"checkpoints": [str(a), str(b)]}, f"b {Q_A}: input tensor holds NaN", "run")


def test_float16_overflow_after_the_cast(tmp_path: Path) -> None:
    # 7e4 fits float32 but not float16 (65504): the finite check runs on what is written.
    big = {"w": torch.full((4, 4), 7e4), "v": torch.ones(3)}
    a = full_model(tmp_path / "a", big)
    b = full_model(tmp_path / "b", big)
    data = {"method": "linear", "checkpoints": [str(a), str(b)], "out_dtype": "float16"}
    err = _fails(tmp_path, data, "w: values up to 7e+04 do not fit float16", "run")
    assert "fix: write a wider dtype (out_dtype: bfloat16 or float32)" in err
    data["out_dtype"] = "bfloat16"
    assert invoke("run", "-q", recipe(tmp_path, data)).exit_code == 0


def test_merge_that_overflows_float32(tmp_path: Path) -> None:
    big = {"w": torch.full((2, 2), 3e38)}
    a = full_model(tmp_path / "a", big)
    b = full_model(tmp_path / "b", big)
    data = {"method": "linear", "params": {"normalize": False}, "checkpoints": [str(a), str(b)]}
    _fails(tmp_path, data, "the merge produced NaN or Inf in w", "run")


def test_weight_times_dare_rescale_overflows(tmp_path: Path) -> None:
    # 3e38 is a float32, 3e38 / (1 − 0.99) is not: torch would refuse the scalar mid-merge.
    fs = [full_model(tmp_path / f"m{i}", {"w": torch.ones(4, 4) * i}) for i in range(3)]
    data = {
        "method": "dare_linear",
        "params": {"drop_rate": 0.99},
        "base_model": str(fs[0]),
        "checkpoints": [{"path": str(f), "weight": 3e38} for f in fs[1:]],
    }
    _fails(tmp_path, data, "w: a weight (times its scaling) is too large", "run")


_BAD_CONFIGS: list[tuple[dict[str, Any], str]] = [
    ({"r": 0}, "r must be a whole number ≥ 1 (a LoRA rank), got 0"),
    ({"r": -4}, "got -4"),
    ({"r": "4"}, 'got "4"'),
    ({"r": True}, "got true"),
    ({"r": 4.5}, "got 4.5"),
    ({"lora_alpha": 0}, "lora_alpha must be a number > 0"),
    ({"lora_alpha": "eight"}, 'got "eight"'),
    ({"lora_alpha": None}, "got null"),
    ({"rank_pattern": {"q_proj(": 8}}, "rank_pattern key 'q_proj(' is not a valid regular"),
    ({"alpha_pattern": {"[": 8}}, "alpha_pattern key '[' is not a valid regular expression"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj'] must be a whole number ≥ 1"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern must be an object"),
    ({"use_rslora": "false"}, "use_rslora must be true or false"),
    ({"target_modules": [1, 2]}, "target_modules must be a list of module names"),
    ({"rank_pattern": {"q_proj": 8}}, "adapter_config.json says rank 8 but the tensors"),
    ({"peft_type": "IA3"}, "adapter type IA3 is not supported"),
]


@pytest.mark.parametrize(("config", "needle"), _BAD_CONFIGS, ids=lambda x: json.dumps(x)[:40])
def test_malformed_adapter_config(config: dict[str, Any], needle: str, tmp_path: Path) -> None:
    a = adapter(tmp_path / "a", seed=0)
    b = adapter(tmp_path / "b", seed=1, config=config)
    _fails(tmp_path, {"checkpoints": [str(a), str(b)]}, needle, "validate")


def _without_dac_override() -> None:
    """In the child before exec: drop root's power to ignore file permissions (CAP_DAC_OVERRIDE
    and CAP_DAC_READ_SEARCH leave the bounding set, so the exec'd process lacks them)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "cannot drop capabilities")


def test_unreadable_checkpoint_folder(tmp_path: Path) -> None:
    # A real EACCES on a folder mwakit may not enter (root, which reads anything, runs the CLI
    # without that capability).
    a, b = run_of_adapters(tmp_path / "run", 2)
    r = recipe(tmp_path, {"checkpoints": [str(a), str(b)]})
    os.chmod(b, 0o000)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "mwakit.cli", "validate", str(r)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            preexec_fn=_without_dac_override if os.geteuid() == 0 else None,
            timeout=60,
        )
    except subprocess.SubprocessError as err:  # no CAP_SETPCAP in this container
        pytest.skip(f"cannot run without CAP_DAC_OVERRIDE: {err}")
    finally:
        os.chmod(b, 0o755)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "internal error" not in proc.stderr, proc.stderr
    assert f"error: {b}: cannot read the checkpoint folder: Permission denied" in lines[0]
    assert "fix: make the folder and its files readable" in lines[0]


# -- fuzz: any JSON value in any adapter_config.json field -------------------------------------

_KEYS = [
    "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
    "fan_in_fan_out", "peft_type", "target_modules", "base_model_name_or_path",
    "modules_to_save", "task_type", "target_parameters", "surprise",
]  # fmt: skip
_WORDS = st.sampled_from(
    ["", "LORA", "lora", "IA3", ".*", "[", "(", "q_proj", "up_proj", "org/tiny-base", "x/y"]
)
_LEAF = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-3, 20)
    | st.floats()
    | st.text(max_size=6)
    | _WORDS
)
_VALUE = st.recursive(
    _LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(_WORDS, c, max_size=3), max_leaves=5
)


def test_fuzz_adapter_config(tmp_path: Path) -> None:
    a, b = run_of_adapters(tmp_path / "run", 2)
    original = json.loads((b / "adapter_config.json").read_text())
    recipes = [
        recipe(tmp_path, {"checkpoints": [str(a), str(b)]}, name="factors.yaml"),
        recipe(
            tmp_path,
            {"checkpoints": [str(a), str(b)], "lora_space": "delta", "delta_rank": 6},
            name="svd.yaml",
        ),
    ]

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(recipes), st.sampled_from(_KEYS), _VALUE)
    def check(r: Path, key: str, value: Any) -> None:
        cfg = copy.deepcopy(original)
        cfg[key] = value
        (b / "adapter_config.json").write_text(json.dumps(cfg))
        res = invoke("validate", r)
        if res.exit_code != 0:
            assert_clean_failure(res)
            return
        # What validate accepts merges: the executor runs on the same plan without a crash.
        with tempfile.TemporaryDirectory() as out:
            execute(checked_plan(load_recipe(r)), Path(out))
            merged = load_file(Path(out) / "adapter_model.safetensors")
            assert all(bool(torch.isfinite(t).all()) for t in merged.values())

    check()
