"""Fixtures for the evaluator: an offline word-level tokenizer, models with and without one.

The tokenizer is built with `tokenizers` (nothing downloaded): 128 words matching the tiny
Llama's vocabulary, ``<s>`` prepended as BOS, ``</s>`` the EOS, and a small chat template.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

VOCAB = 128
SPECIALS = ["[UNK]", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
WORDS = [f"w{i}" for i in range(len(SPECIALS), VOCAB)]
BOS, EOS, PAD = 2, 3, 1
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def word(i: int) -> str:
    """The word of token id ``i`` (ids below 6 are special tokens)."""
    assert len(SPECIALS) <= i < VOCAB, i
    return WORDS[i - len(SPECIALS)]


def save_tokenizer(folder: Path) -> Path:
    """Save the word-level tokenizer (fast, with offsets) into ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", BOS)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tok_base(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama of examples/make_run.py with the word-level tokenizer."""
    out = tmp_path_factory.mktemp("tokbase") / "base"
    shutil.copytree(tiny_base, out)
    cfg = json.loads((out / "generation_config.json").read_text())
    cfg.update(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    (out / "generation_config.json").write_text(json.dumps(cfg))
    return save_tokenizer(out)


#: After these tokens, EOS is the argmax: greedy answers that reach one of them stop.
ENDERS = range(100, VOCAB)


def bigram_logits(seed: int = 0) -> torch.Tensor:
    """L[i, j]: the logit of next token j after token i in `bigram_base`'s model."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, VOCAB, generator=g, dtype=torch.float64) * 2
    logits[:, EOS] = logits.min() - 1  # EOS only after `ENDERS`
    for i in ENDERS:
        logits[i, EOS] = logits[i].max() + 1
    return logits


@pytest.fixture(scope="session")
def bigram_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama whose logits are set by hand: the logits after token i are `bigram_logits()[i]`.

    Attention and MLP outputs are zero (o_proj, down_proj = 0), so the hidden state at a
    position is its token's embedding, the identity row e_i; the final RMSNorm scales it by
    1/sqrt(1/128 + eps), and lm_head's column i, set to L[i]·sqrt(1/128 + eps), gives L[i].
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=VOCAB,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    scale = (1.0 / VOCAB + cfg.rms_norm_eps) ** 0.5
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(VOCAB))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_((bigram_logits().T * scale).float())
    out = tmp_path_factory.mktemp("bigram") / "base"
    model.save_pretrained(out, safe_serialization=True)
    return save_tokenizer(out)
