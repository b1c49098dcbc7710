"""Make a real LoRA fine-tuning run offline: a tiny random Llama trained by the real Trainer.

Layout written under OUT_DIR::

    OUT_DIR/base/                 tiny random LlamaForCausalLM (config.json + model.safetensors)
    OUT_DIR/run/checkpoint-<N>/   what the Trainer saves for a PEFT model: adapter_config.json,
                                  adapter_model.safetensors, trainer_state.json, optimizer, ...

Usage::

    python examples/make_run.py examples/runs/tiny [--steps 30 --save-steps 5 --r 4 --alpha 8]

Nothing is downloaded: the model comes from a config with random weights and the data is a
learnable synthetic pattern, so the loss really goes down and the checkpoints differ. Also an
importable module: tests and benchmarks call `make_tiny_llama`, `make_run` and `load_base`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 128


def make_tiny_llama(
    out: Path, *, seed: int = 0, hidden: int = 32, layers: int = 2, intermediate: int = 64
) -> Path:
    """Save a tiny random LlamaForCausalLM (deterministic by seed) into ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    return out


def lora_config(
    *,
    r: int = 4,
    lora_alpha: float = 8,
    target_modules: list[str] | None = None,
    **options: Any,
) -> Any:
    """A causal-LM `LoraConfig` over every linear module of the tiny Llama by default."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules or LLAMA_MODULES,
        task_type="CAUSAL_LM",
        **options,
    )


def load_base(base_dir: Path) -> Any:
    """Load the tiny base model in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)


class _Pattern:
    """Sequences t, t+k, t+2k, … (mod vocab): a rule a tiny model learns in a few steps."""

    def __init__(self, n: int, length: int, seed: int) -> None:
        import torch

        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, VOCAB, (n, 1), generator=g)
        steps = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (starts + steps * torch.arange(length)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        x = self.ids[i]
        return {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}


def make_run(
    out_dir: Path,
    *,
    base_dir: Path | None = None,
    steps: int = 30,
    save_steps: int = 5,
    logging_steps: int = 1,
    eval_steps: int | None = 5,
    r: int = 4,
    lora_alpha: float = 8,
    use_rslora: bool = False,
    use_dora: bool = False,
    target_modules: list[str] | None = None,
    modules_to_save: list[str] | None = None,
    seed: int = 0,
    learning_rate: float = 5e-3,
) -> Path:
    """Train a LoRA adapter with the real Trainer and keep its ``checkpoint-<N>/`` folders.

    Returns:
        ``out_dir``, holding the checkpoint folders.
    """
    import torch
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    base = base_dir or make_tiny_llama(out_dir.parent / "base", seed=seed)
    torch.manual_seed(seed)
    model = load_base(base)
    cfg = lora_config(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules,
        use_rslora=use_rslora,
        use_dora=use_dora,
        modules_to_save=modules_to_save,
        lora_dropout=0.0,
    )
    model = get_peft_model(model, cfg)
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=steps,
        save_steps=save_steps,
        save_strategy="steps",
        logging_steps=logging_steps,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
        save_only_model=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Pattern(256, 16, seed),
        eval_dataset=_Pattern(32, 16, seed + 1) if eval_steps else None,
    )
    trainer.train()
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--save-steps", type=int, default=5)
    ap.add_argument("--r", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=8)
    ap.add_argument("--rslora", action="store_true")
    ap.add_argument("--dora", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="train again even if checkpoints exist")
    a = ap.parse_args(argv)
    run = a.out_dir / "run"
    existing = sorted(run.glob("checkpoint-*")) if run.is_dir() else []
    if existing and not a.force:
        print(f"{run}: {len(existing)} checkpoints already there (use --force to train again)")
        return 0
    if a.force and run.is_dir():
        import shutil

        shutil.rmtree(run)
    base = make_tiny_llama(a.out_dir / "base", seed=a.seed)
    make_run(
        run,
        base_dir=base,
        steps=a.steps,
        save_steps=a.save_steps,
        r=a.r,
        lora_alpha=a.alpha,
        use_rslora=a.rslora,
        use_dora=a.dora,
        seed=a.seed,
    )
    found = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    print(f"base model: {base}")
    print(f"run: {run} with {len(found)} checkpoints: {', '.join(p.name for p in found)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
