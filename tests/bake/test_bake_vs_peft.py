"""`mwakit bake` against PEFT's merge_and_unload + save_pretrained, case by case.

Every case builds a real adapter with PEFT on a tiny random Llama, bakes it with mwakit, and
compares every tensor PEFT's merged model saves: same names (so ties match), dtypes, shapes,
and the same bytes in float32 (at most one ulp in bfloat16, where PEFT and mwakit round once
each). transformers then loads the baked folder and generates the same greedy tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mwakit.bake import bake
from tests.bake.reference import (
    assert_same_model,
    build_adapter,
    greedy,
    load_folder,
    peft_bake,
)

CASES: dict[str, dict[str, Any]] = {
    "lora": {},
    "rslora": {"use_rslora": True, "r": 8, "lora_alpha": 16},
    "patterns": {
        "rank_pattern": {"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
        "alpha_pattern": {"v_proj": 3, "up_proj": 20},
    },
    "modules_to_save": {"modules_to_save": ["lm_head"]},
    "dora": {"use_dora": True},
    "dora_rslora": {"use_dora": True, "use_rslora": True},
    "embedding": {"target_modules": ["embed_tokens", "q_proj"]},
    "embedding_dora": {"target_modules": ["embed_tokens", "v_proj"], "use_dora": True},
    "lm_head_lora": {"target_modules": ["lm_head", "o_proj"]},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bake_equals_peft_merge(case: str, tiny_base: Path, tmp_path: Path) -> None:
    adapter = build_adapter(tiny_base, tmp_path / "adapter", **CASES[case])
    res = bake(adapter, tiny_base, tmp_path / "ours")
    ref = peft_bake(tiny_base, adapter, tmp_path / "ref")
    assert assert_same_model(res.path, ref)["worst_ulp"] == 0
    assert res.changed > 0
    assert greedy(res.path) == greedy(ref)


TIED: dict[str, dict[str, Any]] = {
    "embed_lora": {"target_modules": ["embed_tokens", "q_proj"]},
    "head_modules_to_save": {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    "embed_dora": {"target_modules": ["embed_tokens"], "use_dora": True},
    "head_lora": {"target_modules": ["lm_head", "k_proj"]},
    "embed_modules_to_save": {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]},
}


@pytest.mark.parametrize("case", sorted(TIED))
def test_tied_embeddings_as_peft(case: str, tied_base: Path, tmp_path: Path) -> None:
    adapter = build_adapter(tied_base, tmp_path / "adapter", **TIED[case])
    res = bake(adapter, tied_base, tmp_path / "ours")
    ref = peft_bake(tied_base, adapter, tmp_path / "ref")
    assert_same_model(res.path, ref)
    assert greedy(res.path) == greedy(ref)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_bf16_base_same_bytes(use_dora: bool, tiny_base: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    bf = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).save_pretrained(bf)
    adapter = build_adapter(bf, tmp_path / "adapter", use_dora=use_dora)
    res = bake(adapter, bf, tmp_path / "ours")
    ref = peft_bake(bf, adapter, tmp_path / "ref")
    assert assert_same_model(res.path, ref)["worst_ulp"] == 0  # bytes, bf16 too
    assert greedy(res.path) == greedy(ref)
    cfg = json.loads((res.path / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"


@pytest.mark.parametrize("case", ["dora", "modules_to_save"])
def test_transformers_generates_as_peft(case: str, tiny_base: Path, tmp_path: Path) -> None:
    adapter = build_adapter(tiny_base, tmp_path / "adapter", **CASES[case])
    ours = bake(adapter, tiny_base, tmp_path / "ours", shard_size=40_000).path
    ref = peft_bake(tiny_base, adapter, tmp_path / "ref")
    assert (ours / "model.safetensors.index.json").is_file()  # sharded, and it still loads
    assert greedy(ours) == greedy(ref)
    assert greedy(ours) != greedy(tiny_base)  # the adapter really changed the model


@pytest.mark.parametrize(
    "lora",
    [{"lora_bias": True}, {"bias": "all"}, {"bias": "lora_only", "use_dora": True}],
    ids=["lora_bias", "bias_all", "bias_lora_only_dora"],
)
def test_biases_as_peft(lora: dict[str, Any], biased_base: Path, tmp_path: Path) -> None:
    adapter = build_adapter(biased_base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"],
                            **lora)  # fmt: skip
    res = bake(adapter, biased_base, tmp_path / "ours")
    ref = peft_bake(biased_base, adapter, tmp_path / "ref")
    assert_same_model(res.path, ref)
    assert greedy(res.path) == greedy(ref)
    key = "model.layers.0.self_attn.q_proj.bias"
    assert not load_folder(res.path)[key].equal(load_folder(biased_base)[key])


def test_wider_dtype_merges_in_it(tiny_base: Path, tmp_path: Path) -> None:
    """bf16 base written as float32: W + ΔW in float32, not rounded to bf16 first."""
    from transformers import AutoModelForCausalLM

    bf = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).save_pretrained(bf)
    adapter = build_adapter(bf, tmp_path / "adapter", target_modules=["q_proj"])
    res = bake(adapter, bf, tmp_path / "ours", dtype="float32")
    out = load_folder(res.path)
    base = load_folder(bf)
    ad = load_folder(adapter)
    key = "model.layers.0.self_attn.q_proj"
    a = ad[f"base_model.model.{key}.lora_A.weight"].float()
    b = ad[f"base_model.model.{key}.lora_B.weight"].float()
    want = base[f"{key}.weight"].float() + (b @ a) * 2.0  # α/r = 8/4
    assert out[f"{key}.weight"].dtype == torch.float32
    assert torch.equal(out[f"{key}.weight"], want)
    assert torch.equal(out["model.norm.weight"], base["model.norm.weight"].float())
