"""Fixtures of the bake tests: a base with tied embeddings (the tiny Llama's are untied)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch


def _llama(**overrides: Any) -> Any:
    """The bake tests' tiny random Llama (vocab 128, hidden 32, 2 layers), with ``overrides``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **{
            "vocab_size": 128,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            "initializer_range": 0.1,
            **overrides,
        }
    )
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="session")
def tied_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama whose lm_head is tied to embed_tokens (one tensor on disk)."""
    out = tmp_path_factory.mktemp("tied") / "tiny-tied"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        _llama(tie_word_embeddings=True).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def biased_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with attention biases (for lora_bias and bias: all)."""
    out = tmp_path_factory.mktemp("biased") / "tiny-biased"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = _llama(attention_bias=True, tie_word_embeddings=False)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
        model.save_pretrained(out)
    return out
