"""Helpers of the bake tests: PEFT's own merged model to compare every bake against.

The reference is exactly what a user would do without mwakit: load the base with transformers,
``PeftModel.from_pretrained``, ``merge_and_unload``, ``save_pretrained``; its files are read
back, so the comparison covers which tensors are written (ties included), not just values.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder's safetensors files (sharded or not)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def peft_bake(base: Path, adapter: Path, out: Path, dtype: torch.dtype | None = None) -> Path:
    """PEFT's merge_and_unload of ``adapter`` on ``base``, saved with save_pretrained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or "auto")
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged.save_pretrained(out)
    return out


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between two float tensors in units of the last place."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype in (torch.float32,):
        ia, ib = a.view(torch.int32).long(), b.view(torch.int32).long()
    elif a.dtype in (torch.bfloat16, torch.float16):
        ia, ib = a.view(torch.int16).long(), b.view(torch.int16).long()
    else:
        return 0 if torch.equal(a, b) else 1 << 30
    # Map sign-magnitude integers onto a monotonic line.
    bits = 31 if a.dtype == torch.float32 else 15
    ia = torch.where(ia < 0, -(ia & ((1 << bits) - 1)), ia)
    ib = torch.where(ib < 0, -(ib & ((1 << bits) - 1)), ib)
    return int((ia - ib).abs().max()) if a.numel() else 0


def assert_same_model(ours: Path, ref: Path, max_ulp: int = 0) -> dict[str, Any]:
    """The two folders hold the same tensor names, dtypes, shapes and values (≤ max_ulp)."""
    a, b = load_folder(ours), load_folder(ref)
    assert sorted(a) == sorted(b)
    worst = 0
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        d = ulp_diff(a[k], b[k])
        assert d <= max_ulp, f"{k}: {d} ulp"
        worst = max(worst, d)
    cfg_a = json.loads((ours / "config.json").read_text())
    cfg_b = json.loads((ref / "config.json").read_text())
    assert cfg_a.get("tie_word_embeddings") == cfg_b.get("tie_word_embeddings")
    return {"worst_ulp": worst}


def build_adapter(base: Path, out: Path, *, seed: int = 0, **lora: Any) -> Path:
    """A real PEFT LoRA adapter of ``base`` (every trained tensor random), saved with
    save_pretrained. ``lora`` are LoraConfig fields (target_modules default: every linear
    module of the tiny Llama)."""
    from make_run import LLAMA_MODULES
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora.setdefault("target_modules", list(LLAMA_MODULES))
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
        cfg = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **lora)
        pm = get_peft_model(model, cfg)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1.0 + 0.1 * torch.rand_like(p))
                elif p.requires_grad:  # factors, modules_to_save copies, trained biases
                    p.copy_(torch.randn_like(p) * 0.1)
        pm.save_pretrained(out)
    return out


def greedy(folder: Path, n: int = 8) -> list[int]:
    """Greedy tokens of a saved causal LM from a fixed prompt (transformers alone)."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
        prompt = torch.tensor([[1, 5, 9, 3, 7]])
        out = model.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return [int(x) for x in out[0, prompt.shape[1] :]]
