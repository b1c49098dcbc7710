"""GPT-2 stores its linear weights transposed (Conv1D, PEFT's fan_in_fan_out) and ties wte to
lm_head: both baked as PEFT's merge_and_unload does."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from mwakit.bake import bake
from tests.bake.reference import assert_same_model, build_adapter, greedy, peft_bake


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    cfg = GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(4)
        GPT2LMHeadModel(cfg).save_pretrained(out)
    return out


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_fan_in_fan_out_as_peft(use_dora: bool, gpt2_base: Path, tmp_path: Path) -> None:
    adapter = build_adapter(
        gpt2_base,
        tmp_path / "adapter",
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
        use_dora=use_dora,
    )
    res = bake(adapter, gpt2_base, tmp_path / "ours")
    ref = peft_bake(gpt2_base, adapter, tmp_path / "ref")
    assert assert_same_model(res.path, ref)["worst_ulp"] == 0
    assert greedy(res.path) == greedy(ref)
