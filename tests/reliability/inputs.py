"""Real input folders for the recipe, content and precision cases: PEFT-layout adapters and
full models written with safetensors, recipes written as YAML files.

Small on purpose (a few kB each) so every case builds its own inputs and can break them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from tests.conftest import trainer_state, write_trainer_state

PREFIX = "base_model.model.model.layers"


def adapter(
    folder: Path,
    *,
    seed: int,
    loss: float = 1.0,
    step: int = 10,
    r: int = 4,
    dim: int = 16,
    dtype: torch.dtype = torch.float32,
    base: str = "org/tiny-base",
    config: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A LoRA adapter folder as PEFT saves it (two modules, an lm_head copy, an int buffer),
    with a trainer_state.json; ``config`` overrides adapter_config.json fields, ``tensors``
    adds or replaces tensors."""
    g = torch.Generator().manual_seed(seed)
    ts: dict[str, torch.Tensor] = {}
    for i, kind in enumerate(("self_attn.q_proj", "mlp.up_proj")):
        m = f"{PREFIX}.{i}.{kind}"
        ts[f"{m}.lora_A.weight"] = torch.randn(r, dim, generator=g).to(dtype)
        ts[f"{m}.lora_B.weight"] = torch.randn(dim, r, generator=g).to(dtype)
    ts["base_model.model.lm_head.weight"] = torch.randn(8, dim, generator=g).to(dtype)
    ts["base_model.model.positions"] = torch.arange(6)
    ts.update(tensors or {})
    folder.mkdir(parents=True)
    save_file(ts, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": ["q_proj", "up_proj"],
        "base_model_name_or_path": base,
        "task_type": "CAUSAL_LM",
        "modules_to_save": ["lm_head"],
        "use_rslora": False,
    }
    cfg.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg, sort_keys=True, indent=2))
    write_trainer_state(folder, trainer_state(step, [(step, loss)]))
    return folder


def run_of_adapters(root: Path, n: int = 2, **kw: Any) -> list[Path]:
    """``n`` adapters ``root/checkpoint-{10, 20, ...}`` with losses 1.0, 0.9, ..."""
    return [
        adapter(
            root / f"checkpoint-{10 * (i + 1)}", seed=i, loss=1.0 - 0.1 * i, step=10 * (i + 1), **kw
        )
        for i in range(n)
    ]


def full_model(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    *,
    arch: str = "LlamaForCausalLM",
    model_type: str = "llama",
) -> Path:
    """A full-model folder: ``model.safetensors`` and a ``config.json``."""
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = {"architectures": [arch], "model_type": model_type, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def recipe(tmp: Path, data: dict[str, Any], *, name: str = "recipe.yaml") -> Path:
    """A recipe file (device cpu, output ``tmp/out`` unless given)."""
    doc = {"device": "cpu", "output": {"path": str(tmp / "out")}, **data}
    path = tmp / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path
