"""Real Trainer runs on the tiny Llama, with callbacks, offline and in a few seconds.

The training loop is `examples/make_run.py`'s (same data, LoRA and arguments), cut to a few
steps and given the callbacks under test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

WORDS = [f"w{i}" for i in range(40)]

Train = Callable[..., Any]


def training_args(out: Path, *, steps: int, save_steps: int, evaluate: bool, **extra: Any) -> Any:
    """TrainingArguments like make_run's, for a short run."""
    from transformers import TrainingArguments

    return TrainingArguments(
        **_common(out, steps=steps, save_steps=save_steps, evaluate=evaluate, **extra)
    )


def _common(
    out: Path, *, steps: int, save_steps: int, evaluate: bool, **extra: Any
) -> dict[str, Any]:
    return {
        "output_dir": str(out),
        "max_steps": steps,
        "save_strategy": "steps",
        "save_steps": save_steps,
        "logging_steps": 1,
        "eval_strategy": "steps" if evaluate else "no",
        "eval_steps": save_steps if evaluate else None,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 16,
        "learning_rate": 5e-3,
        "lr_scheduler_type": "constant",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "save_only_model": True,
        "dataloader_num_workers": 0,
        "log_level": "error",
        **extra,
    }


def build_trainer(
    out: Path,
    base: Path,
    callbacks: Sequence[Any],
    *,
    steps: int = 8,
    save_steps: int = 2,
    evaluate: bool = True,
    **extra: Any,
) -> Any:
    """A real `transformers.Trainer` over a fresh LoRA of the tiny base."""
    import torch
    from make_run import _Progressions, load_base, lora_config
    from peft import get_peft_model
    from transformers import PrinterCallback, Trainer

    torch.manual_seed(0)
    model = get_peft_model(load_base(base), lora_config(r=4, lora_alpha=8, lora_dropout=0.0))
    trainer = Trainer(
        model=model,
        args=training_args(out, steps=steps, save_steps=save_steps, evaluate=evaluate, **extra),
        train_dataset=_Progressions(64, 0),
        eval_dataset=_Progressions(16, 10_000) if evaluate else None,
        callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


@pytest.fixture
def train(tiny_base: Path) -> Train:
    """Build and run a Trainer with the given callbacks; returns the trainer."""
    from make_run import _one_thread, _preserved_rng, _quiet

    def run(out: Path, callbacks: Sequence[Any], **kw: Any) -> Any:
        with _quiet(), _preserved_rng(), _one_thread():
            trainer = build_trainer(out, tiny_base, callbacks, **kw)
            trainer.train()
        return trainer

    return run


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A word-level fast tokenizer over `WORDS` (no downloads), with pad and eos tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
