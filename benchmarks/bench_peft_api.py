"""Benchmark: `mwakit.peft.merge_adapters` against PEFT's `add_weighted_adapter(cat)`.

Builds a TinyLlama-shaped model (hidden 2048, intermediate 5632, kv 256; ``--layers`` of them,
a small vocabulary) with K random LoRA adapters of rank r on all seven linear modules, then
times, in the same process, adding the exact weighted merge of all K:

- PEFT: ``add_weighted_adapter(combination_type="cat")`` (exact for plain LoRA);
- mwakit: ``merge_adapters(..., normalize=False)`` (delta space, concat: exact, and right for
  rsLoRA and patterns too).

and prints both wall times and the largest |ΔW_mwakit − ΔW_PEFT| / max|ΔW| over the modules.
Nothing is downloaded.

Usage::

    python benchmarks/bench_peft_api.py                 # 4 layers, r 16, K 2 and 5
    python benchmarks/bench_peft_api.py --layers 22 --r 64 --ks 2
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

from common import tinyllama_config


def build(layers: int, r: int, k: int) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    cfg = tinyllama_config(layers, vocab_size=1024)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def lora() -> Any:
        return LoraConfig(r=r, lora_alpha=2 * r, target_modules=modules, init_lora_weights=False)

    model = get_peft_model(base, lora(), adapter_name="ad0")
    for i in range(1, k):
        model.add_adapter(f"ad{i}", lora())
    return model


def delta(layer: Any, name: str) -> Any:
    return layer.scaling[name] * (layer.lora_B[name].weight @ layer.lora_A[name].weight)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 5])
    a = ap.parse_args()

    import torch
    from peft.tuners.lora import LoraLayer

    from mwakit.peft import merge_adapters

    warnings.simplefilter("ignore")
    print(f"TinyLlama-shaped, {a.layers} layers, r {a.r}, all linear modules, float32, CPU")
    print(f"{'K':>3} {'PEFT cat s':>11} {'mwakit s':>9} {'max rel diff':>13}")
    for k in a.ks:
        model = build(a.layers, a.r, k)
        names = [f"ad{i}" for i in range(k)]
        weights = [1.0 / k] * k
        t0 = time.perf_counter()
        model.add_weighted_adapter(names, weights, "peft", combination_type="cat")
        t_peft = time.perf_counter() - t0
        t0 = time.perf_counter()
        merge_adapters(model, names, weights, normalize=False, name="mwakit")
        t_ours = time.perf_counter() - t0
        worst = 0.0
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoraLayer) and "mwakit" in m.lora_A:
                    ours, peft = delta(m, "mwakit"), delta(m, "peft")
                    worst = max(worst, float((ours - peft).abs().max() / peft.abs().max()))
        print(f"{k:>3} {t_peft:>11.2f} {t_ours:>9.2f} {worst:>13.2e}")
        del model


if __name__ == "__main__":
    main()
