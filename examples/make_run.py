"""Make a real LoRA fine-tuning run offline: a tiny random Llama trained by the real Trainer.

Layout written by the command line under ``OUT_DIR``::

    OUT_DIR/base/                 tiny random LlamaForCausalLM: config.json,
                                  generation_config.json, model.safetensors, tiny_llama.json
    OUT_DIR/run/checkpoint-<N>/   exactly what `transformers.Trainer` saves for a PEFT model:
                                  adapter_model.safetensors, adapter_config.json, README.md,
                                  trainer_state.json, training_args.bin, optimizer.pt,
                                  scheduler.pt, rng_state.pth

``adapter_config.json`` records the absolute base folder in ``base_model_name_or_path``.
``tiny_llama.json`` remembers the seed and shape the base was made with, so a reused base is
checked rather than trusted.

``--full N`` also writes full fine-tuned models for the full-model examples (passthrough
slices, task vectors against ``OUT_DIR/base``): the last N checkpoints with their LoRA
merged into the base weights (PEFT's ``merge_and_unload``), saved with ``save_pretrained``::

    OUT_DIR/full/checkpoint-<N>/  config.json, generation_config.json, model.safetensors

Usage::

    python examples/make_run.py examples/runs/tiny [--steps 30 --save-steps 5 --r 4 --alpha 8]
    python examples/make_run.py OUT_DIR --rslora --dora --seed 1 --force
    python examples/make_run.py examples/runs/tiny --full 2   # + full models, offline, ~2 s

Nothing is downloaded: the model comes from a config with random weights and the data is a
learnable synthetic pattern, so the loss really goes down and the checkpoints differ.

This is also an importable module (tests and benchmarks call `make_tiny_llama`, `make_run`,
`load_base` and `lora_config`). Its top level imports only the standard library: torch,
transformers and peft are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Read by huggingface_hub/transformers at import time, so it must be set before they load.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 128
# Seed of the default base. It is independent of the run seed on purpose: runs with different
# seeds that share a base folder must share the base weights, or their adapters cannot be merged.
BASE_SEED = 0
# Tokens the synthetic data draws from. A small alphabet inside the 128-token vocabulary gives
# the model something quick to learn (put mass on these tokens, then follow the progression).
ALPHABET = 16
SEQ_LEN = 16
SIDECAR = "tiny_llama.json"


def make_tiny_llama(
    dir: Path,
    *,
    seed: int = BASE_SEED,
    hidden: int = 32,
    layers: int = 2,
    intermediate: int = 64,
    vocab: int = VOCAB,
    heads: int = 4,
    kv_heads: int = 2,
    init_std: float = 0.1,
) -> Path:
    """Save a tiny random `LlamaForCausalLM` into ``dir``, or reuse the one already there.

    The weights depend only on the arguments (the global torch RNG is left untouched). The
    folder is built next to ``dir`` and renamed into place, so concurrent callers (xdist,
    parallel benchmarks) never see a half-written model.

    Args:
        dir: Folder to write (``config.json``, ``model.safetensors``, ...).
        seed: Seed of the random initialisation.
        hidden: Hidden size.
        layers: Number of decoder layers.
        intermediate: MLP intermediate size.
        vocab: Vocabulary size.
        heads: Attention heads.
        kv_heads: Key/value heads (grouped-query attention when fewer than ``heads``).
        init_std: ``initializer_range``. Larger than Llama's 0.02 on purpose: with 0.02 the
            frozen lm_head turns any hidden state into logits of about ±0.1, so a LoRA cannot
            express a prediction and the loss barely moves (4.85 -> 4.53 in 30 steps, versus
            4.84 -> 3.66 with 0.1).

    Returns:
        ``dir``.

    Raises:
        ValueError: ``dir`` already holds a model made with other arguments.
    """
    dir = Path(dir)
    spec = {
        "seed": seed,
        "hidden": hidden,
        "layers": layers,
        "intermediate": intermediate,
        "vocab": vocab,
        "heads": heads,
        "kv_heads": kv_heads,
        "init_std": init_std,
    }
    if (dir / "config.json").is_file():
        _check_reused_base(dir, spec)
        return dir

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        initializer_range=init_std,
        # Untied, like most fine-tuned LLMs: lm_head is its own tensor (modules_to_save tests).
        tie_word_embeddings=False,
    )
    dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dir.name}.", dir=dir.parent))
    try:
        with _quiet(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(cfg)
            model.save_pretrained(tmp, safe_serialization=True)
        (tmp / SIDECAR).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
        try:
            os.replace(tmp, dir)  # also replaces an empty `dir` made beforehand
        except OSError:
            if not (dir / "config.json").is_file():  # not a lost race: a real error
                raise
            _check_reused_base(dir, spec)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dir


def _check_reused_base(dir: Path, spec: dict[str, Any]) -> None:
    """Refuse to reuse a base made with other arguments (silently different weights)."""
    sidecar = dir / SIDECAR
    if sidecar.is_file():
        found = json.loads(sidecar.read_text())
    else:  # a base from elsewhere: the shape is all we can check
        cfg = json.loads((dir / "config.json").read_text())
        found = dict(spec)
        found.update(
            hidden=cfg.get("hidden_size"),
            layers=cfg.get("num_hidden_layers"),
            intermediate=cfg.get("intermediate_size"),
            vocab=cfg.get("vocab_size"),
            heads=cfg.get("num_attention_heads"),
            kv_heads=cfg.get("num_key_value_heads"),
            init_std=cfg.get("initializer_range"),
        )
    diff = {k: (found.get(k), v) for k, v in spec.items() if found.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: has {a}, asked {b}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"{dir} holds a different tiny Llama ({detail}); delete it or use another")


def lora_config(
    *,
    r: int = 4,
    lora_alpha: int = 8,
    target_modules: list[str] | str | None = None,
    **options: Any,
) -> Any:
    """Build a causal-LM `peft.LoraConfig`, over every linear module of the tiny Llama by default.

    Args:
        r: LoRA rank.
        lora_alpha: LoRA alpha (scaling is ``alpha/r``, or ``alpha/sqrt(r)`` with rslora).
        target_modules: Module names, a regex string, ``"all-linear"``, or None for
            `LLAMA_MODULES`.
        **options: Any other `LoraConfig` field (use_rslora, rank_pattern, ...).

    Returns:
        The `LoraConfig`.
    """
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(LLAMA_MODULES) if target_modules is None else target_modules,
        task_type="CAUSAL_LM",
        **options,
    )


def load_base(base_dir: Path | str) -> Any:
    """Load the tiny base model in float32.

    Args:
        base_dir: Folder written by `make_tiny_llama` (or any causal-LM folder).

    Returns:
        The `PreTrainedModel`, on CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with _quiet():
        # `dtype` is the transformers 5 name of the old `torch_dtype`.
        return AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)


class _Progressions:
    """Arithmetic progressions ``a, a+k, a+2k, ...`` modulo `ALPHABET`.

    A rule a tiny LoRA learns within a few steps (the loss falls from ln(128) towards the
    unigram and then the progression entropy), so checkpoints really differ and the metrics
    in trainer_state.json move. Built from a private generator: the same seed gives the same data.
    """

    def __init__(self, n: int, seed: int) -> None:
        import torch

        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, ALPHABET, (n, 1), generator=g)
        steps = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (starts + steps * torch.arange(SEQ_LEN)) % ALPHABET

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        x = self.ids[i]
        # The model shifts labels itself; all positions are real tokens.
        return {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' progress bars, info logs and deprecation chatter, then restore.

    Restoring matters because tests import this module into a process that may want them.
    """
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            # e.g. "`is_gradient_checkpointing` is deprecated" raised from inside the Trainer.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            # PEFT 0.21.2 flags lora_bias's 1-D lora_B.bias as an ungathered ZeRO-3 shard on
            # every save (a false positive: its check only allows 2-D lora_A/lora_B tensors).
            warnings.filterwarnings("ignore", message=r"Adapter .* LoRA tensor\(s\) have invalid")
            # lora_bias on Llama's bias-free Linear: PEFT's merge cannot fold it. The caller
            # asked for lora_bias, so this is expected, not news.
            warnings.filterwarnings("ignore", message=r"`lora_bias=True` was passed")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the caller's setting.

    The matrices are tiny (32x64), so thread hand-offs cost far more than the math: on a
    busy 2-core machine a 64x32 @ 32x32 matmul takes ~1 ms with 2 threads and ~12 us with 1.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """Restore the python, numpy and torch global RNGs that `Trainer` reseeds."""
    import torch

    py_state = random.getstate()
    torch_state = torch.get_rng_state()
    try:
        import numpy as np

        np_state: Any = np.random.get_state()
    except ImportError:  # numpy is optional for torch
        np = None  # type: ignore[assignment]
        np_state = None
    try:
        yield
    finally:
        random.setstate(py_state)
        torch.set_rng_state(torch_state)
        if np is not None:
            np.random.set_state(np_state)


def make_run(
    out_dir: Path,
    *,
    base_dir: Path | None = None,
    steps: int = 30,
    save_steps: int = 5,
    logging_steps: int = 1,
    eval_steps: int | None = 5,
    r: int = 4,
    lora_alpha: int = 8,
    use_rslora: bool = False,
    use_dora: bool = False,
    target_modules: list[str] | str | None = None,
    modules_to_save: list[str] | None = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, int] | None = None,
    lora_bias: bool = False,
    seed: int = 0,
    learning_rate: float = 5e-3,
) -> Path:
    """Train a LoRA adapter with the real `transformers.Trainer`, keeping its checkpoints.

    The result depends only on the arguments: the same call gives the same tensors. Global
    RNG states are restored afterwards and nothing is printed.

    Args:
        out_dir: Trainer ``output_dir``; receives ``checkpoint-<N>/`` folders. Existing
            checkpoints with the same step are overwritten.
        base_dir: Base model folder. None means ``out_dir.parent / "base"``. A folder without
            ``config.json`` gets the default tiny Llama (seed `BASE_SEED`); a tiny Llama
            already there is reused after checking it was made with the default arguments.
        steps: ``max_steps``.
        save_steps: Save a checkpoint every this many steps.
        logging_steps: Log the (windowed) train loss every this many steps.
        eval_steps: Evaluate every this many steps; None for no evaluation.
        r: LoRA rank.
        lora_alpha: LoRA alpha.
        use_rslora: Scale by ``alpha/sqrt(r)`` instead of ``alpha/r``.
        use_dora: Train DoRA (adds ``lora_magnitude_vector`` tensors).
        target_modules: Module names, a regex, ``"all-linear"``, or None for `LLAMA_MODULES`.
        modules_to_save: Modules trained and saved in full (e.g. ``["lm_head"]``).
        rank_pattern: Per-module ranks (regex keys).
        alpha_pattern: Per-module alphas (regex keys).
        lora_bias: Give lora_B a trainable bias.
        seed: Seed of the LoRA init, the data and the Trainer.
        learning_rate: Constant learning rate. High by default because PEFT starts lora_B at
            zero and a few steps must move it well away.

    Returns:
        ``out_dir``.
    """
    import torch
    from peft import get_peft_model
    from transformers import PrinterCallback, Trainer, TrainingArguments

    out_dir = Path(out_dir)
    base = Path(base_dir) if base_dir is not None else out_dir.parent / "base"
    if base_dir is None or not (base / "config.json").is_file():
        make_tiny_llama(base)  # any other model folder given is used as it is
    # Absolute, because it lands in adapter_config.json's base_model_name_or_path and the
    # merger resolves it later from another working directory.
    base = base.resolve()
    cfg = lora_config(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules,
        use_rslora=use_rslora,
        use_dora=use_dora,
        modules_to_save=modules_to_save,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        lora_bias=lora_bias,
        lora_dropout=0.0,  # no dropout noise: a short run should learn the pattern cleanly
    )
    with _quiet(), _preserved_rng(), _one_thread():
        torch.manual_seed(seed)  # lora_A's init
        model = get_peft_model(load_base(base), cfg)
        args = TrainingArguments(
            output_dir=str(out_dir),
            max_steps=steps,
            save_strategy="steps",
            save_steps=save_steps,
            logging_steps=logging_steps,
            eval_strategy="steps" if eval_steps else "no",
            eval_steps=eval_steps,
            per_device_train_batch_size=4,
            per_device_eval_batch_size=16,
            learning_rate=learning_rate,
            # Constant: the default linear decay would shrink the last checkpoints' updates.
            lr_scheduler_type="constant",
            warmup_steps=0,
            report_to=[],
            use_cpu=True,
            seed=seed,
            data_seed=seed,
            disable_tqdm=True,
            # Keep optimizer.pt / scheduler.pt / rng_state.pth: real checkpoints have them,
            # and a merger must ignore them. They are tiny for a LoRA.
            save_only_model=False,
            dataloader_num_workers=0,
            log_level="error",
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=_Progressions(256, seed),
            eval_dataset=_Progressions(32, seed + 10_000) if eval_steps else None,
        )
        # disable_tqdm swaps the progress bar for PrinterCallback, which prints every log.
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    return out_dir


def bake_full_model(checkpoint: Path, base_dir: Path, out: Path) -> Path:
    """Save ``checkpoint``'s adapter merged into the base as a full model folder.

    W = W_0 + s·B·A for every LoRA module (PEFT's own ``merge_and_unload``), saved with
    ``save_pretrained`` (safetensors): a real full fine-tuned checkpoint of the same run.
    Written next to ``out`` and renamed into place, so a half-written model never appears.

    Args:
        checkpoint: A PEFT adapter folder (a run's ``checkpoint-<N>``).
        base_dir: The base model folder the adapter was trained on.
        out: The folder to write.

    Returns:
        ``out``.
    """
    import torch
    from peft import PeftModel

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with _quiet(), torch.no_grad():
            model = PeftModel.from_pretrained(load_base(base_dir), str(checkpoint))
            model.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _checkpoints(run: Path) -> list[Path]:
    """The ``checkpoint-<N>`` folders of a run, by step."""
    found = [p for p in run.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: build ``OUT_DIR/base`` and train ``OUT_DIR/run``.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0],
        epilog="Layout: OUT_DIR/base (tiny Llama) and OUT_DIR/run/checkpoint-<N>/ (Trainer).",
    )
    ap.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    ap.add_argument("--steps", type=int, default=30, help="max_steps (default 30)")
    ap.add_argument("--save-steps", type=int, default=5, help="checkpoint interval (default 5)")
    ap.add_argument("--eval-steps", type=int, default=5, help="0 for no evaluation (default 5)")
    ap.add_argument("--r", type=int, default=4, help="LoRA rank (default 4)")
    ap.add_argument("--alpha", type=int, default=8, help="LoRA alpha (default 8)")
    ap.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha/sqrt(r)")
    ap.add_argument("--dora", action="store_true", help="train DoRA")
    ap.add_argument("--lr", type=float, default=5e-3, help="learning rate (default 5e-3)")
    ap.add_argument("--seed", type=int, default=0, help="run seed: LoRA init and data order")
    ap.add_argument("--base-seed", type=int, default=BASE_SEED, help="seed of the base model")
    ap.add_argument("--force", action="store_true", help="rebuild base and run if they exist")
    ap.add_argument(
        "--full",
        type=int,
        default=0,
        metavar="N",
        help="also save the last N checkpoints merged into the base as full models "
        "(OUT_DIR/full/checkpoint-<N>)",
    )
    a = ap.parse_args(argv)

    base, run = a.out_dir / "base", a.out_dir / "run"
    existing = _checkpoints(run) if run.is_dir() else []
    if existing and not a.force:
        print(f"{run}: already holds {len(existing)} checkpoints; skipping (--force to redo)")
        _bake(existing, base, a.out_dir / "full", a.full)
        return 0
    if a.force:
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    t0 = time.perf_counter()
    make_tiny_llama(base, seed=a.base_seed)
    make_run(
        run,
        base_dir=base,
        steps=a.steps,
        save_steps=a.save_steps,
        eval_steps=a.eval_steps or None,
        r=a.r,
        lora_alpha=a.alpha,
        use_rslora=a.rslora,
        use_dora=a.dora,
        learning_rate=a.lr,
        seed=a.seed,
    )
    found = _checkpoints(run)
    state = json.loads((found[-1] / "trainer_state.json").read_text()) if found else {}
    evals = [e["eval_loss"] for e in state.get("log_history", []) if "eval_loss" in e]
    print(f"base model: {base.resolve()}")
    print(f"run:        {run.resolve()}")
    print(f"checkpoints ({len(found)}): {', '.join(p.name for p in found)}")
    if evals:
        print(f"eval_loss:  {evals[0]:.4f} -> {evals[-1]:.4f}")
    _bake(found, base, a.out_dir / "full", a.full)
    print(f"took {time.perf_counter() - t0:.1f}s")
    return 0


def _bake(checkpoints: list[Path], base: Path, full: Path, last: int) -> None:
    """Save the last ``last`` checkpoints as full models under ``full`` (see --full)."""
    if last <= 0:
        return
    for ckpt in checkpoints[-last:]:
        out = full / ckpt.name
        if (out / "model.safetensors").is_file():
            continue
        bake_full_model(ckpt, base, out)
        print(f"full model: {out.resolve()}")


if __name__ == "__main__":
    sys.exit(main())
