"""Shared fixtures: real PEFT adapter folders and Trainer-layout checkpoints, built offline.

Adapters come from `peft.get_peft_model` on a tiny random Llama made from a config and saved
with `save_pretrained` — the very files a training run writes. `trainer_state.json` follows the
Trainer's layout (sorted keys, log_history with train/eval/summary entries).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
# Input fingerprints are cached per file version; keep the tests' cache out of the home folder.
os.environ["MWAKIT_CACHE"] = tempfile.mkdtemp(prefix="mwakit-test-cache-")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def trainer_state(
    global_step: int,
    losses: Sequence[tuple[int, float]],
    evals: Sequence[tuple[int, float]] = (),
    *,
    extra_train: dict[str, float] | None = None,
    max_steps: int = 100,
) -> dict[str, Any]:
    """A trainer_state.json document laid out as `transformers.TrainerState` writes it."""
    log: list[dict[str, Any]] = []
    for step, loss in losses:
        entry = {
            "epoch": step / max_steps,
            "grad_norm": 1.0 / step,
            "learning_rate": 1e-4,
            "loss": loss,
            "step": step,
        }
        entry.update(extra_train or {})
        log.append(entry)
    for step, eval_loss in evals:
        log.append(
            {
                "epoch": step / max_steps,
                "eval_loss": eval_loss,
                "eval_runtime": 0.5,
                "eval_samples_per_second": 64.0,
                "eval_steps_per_second": 8.0,
                "step": step,
            }
        )
    log.sort(key=lambda e: (e["step"], "eval_loss" in e))
    return {
        "best_global_step": None,
        "best_metric": None,
        "best_model_checkpoint": None,
        "epoch": global_step / max_steps,
        "eval_steps": 5,
        "global_step": global_step,
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "log_history": log,
        "logging_steps": 1,
        "max_steps": max_steps,
        "num_input_tokens_seen": 0,
        "num_train_epochs": 1,
        "save_steps": 5,
        "stateful_callbacks": {
            "TrainerControl": {
                "args": {
                    "should_epoch_stop": False,
                    "should_evaluate": False,
                    "should_log": False,
                    "should_save": True,
                    "should_training_stop": False,
                },
                "attributes": {},
            }
        },
        "total_flos": 1.0,
        "train_batch_size": 4,
        "trial_name": None,
        "trial_params": None,
    }


def write_trainer_state(folder: Path, state: dict[str, Any]) -> None:
    """Write trainer_state.json the way the Trainer does (sorted keys, indent 2)."""
    (folder / "trainer_state.json").write_text(
        json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved with save_pretrained (safetensors)."""
    from make_run import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("base") / "tiny-llama", seed=0)


def tiny_llama(**overrides: Any) -> Any:
    """A tiny random `LlamaForCausalLM` (vocab 64, hidden 16, 2 layers), for full-model tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        **overrides,
    )
    return LlamaForCausalLM(cfg)


def shaped_adapter(
    folder: Path, seed: int, shapes: dict[str, tuple[int, int]], *, layers: int = 1
) -> Path:
    """A rank-8 PEFT adapter folder (α 16) with the attention modules ``shapes`` (name: (in,
    out)) in each of ``layers`` layers: modules of real, uneven sizes without a base model."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    ts = {}
    for layer in range(layers):
        for m, (fin, fout) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{m}"
            ts[f"{key}.lora_A.weight"] = torch.randn(8, fin, generator=g) * 0.1
            ts[f"{key}.lora_B.weight"] = torch.randn(fout, 8, generator=g) * 0.1
    save_file(ts, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "task_type": "CAUSAL_LM",
        "target_modules": sorted(shapes),
        "base_model_name_or_path": "tiny/base",
    }
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


MakeAdapter = Callable[..., Path]


@pytest.fixture(scope="session")
def make_adapter(tiny_base: Path) -> MakeAdapter:
    """Build a real PEFT LoRA adapter folder with random (non-zero) A and B."""

    def build(
        out: Path,
        *,
        seed: int = 0,
        r: int = 4,
        lora_alpha: float = 8,
        use_rslora: bool = False,
        use_dora: bool = False,
        modules_to_save: list[str] | None = None,
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
        lora_bias: bool = False,
        target_modules: list[str] | None = None,
        state: dict[str, Any] | None = None,
    ) -> Path:
        import torch
        from make_run import load_base, lora_config
        from peft import get_peft_model

        torch.manual_seed(seed)
        model = load_base(tiny_base)
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
            init_lora_weights=False,  # random B too, so every ΔW is non-zero
        )
        peft_model = get_peft_model(model, cfg)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if p.requires_grad and ("lora_" in name or "modules_to_save" in name):
                    p.copy_(torch.randn_like(p) * 0.1)
        peft_model.save_pretrained(out)
        if state is not None:
            write_trainer_state(out, state)
        return out

    return build


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """One local Ray cluster (2 worker CPUs) for the whole session: the executor's and tune's
    tests share it (Ray allows one `ray.init` per process)."""
    ray = pytest.importorskip("ray")
    # Workers are started by the raylet, which inherits this environment, and get it again
    # through the runtime env: they import this tree's mwakit and stay offline.
    old = os.environ.get("PYTHONPATH")
    path = os.pathsep.join([str(ROOT), *([old] if old else [])])
    os.environ["PYTHONPATH"] = path
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
