"""Benchmark: what scoring a candidate merge costs, split into merge, swap and evaluation.

Builds the tiny random Llama of examples/make_run.py with a word-level tokenizer, K random
LoRA checkpoints (r 4, all seven linear modules, modules_to_save lm_head optional) and N
prompt/completion rows, loads one `Evaluator`, then scores C candidates (MWA at several
penalties, in factor and delta space) and prints per candidate: the in-memory merge
(`merge_in_memory`), the swap into the loaded model (`EvalResult.swap_seconds`) and the
evaluation itself, with (merge + swap) / evaluation. Issue 9 targets ≤ 5 %.

The tiny model makes the evaluation as cheap as it gets, so the ratio here is an upper bound:
on a real model the evaluation grows with the model and the data, the merge and swap with
the adapter only. Measured on the shared 2-core box, one thread (Dec 2026): tiny, 64 rows ×
32 tokens: swap 0.2 ms = 0.6 % of a 33 ms evaluation, merge (with planning) 35 ms; SmolLM2-135M
shape, 32 rows × 32 tokens, 5 r-8 checkpoints: swap 5–11 ms = 0.2 % of a 3.9 s evaluation,
merge 0.12 s in factor space (3 %), 0.47 s in delta space (SVD re-factorisation, 12 %; less
with more rows). Those merge times re-read and re-planned every checkpoint per candidate;
with tune's input cache and header memo (the default here; ``--no-cache`` for the old path),
10 checkpoints, 32 rows (before the output head was trimmed to the scored positions): factor
space 62 ms = 2.4 % of a 2.9 s evaluation (250 ms = 9.9 % without), delta space 495 ms =
17 % (690 ms without: the per-module SVD re-factorisation, not the reading, is what
remains); with each module's QR kept by the cache across candidates (`lowrank.QrMemo`),
delta space 213 ms = 8–10 % (one small core SVD per module is left).
benchmarks/bench_tune_cost.py measures the same on the real SmolLM2 runs.

Usage::

    python benchmarks/bench_eval.py [--rows 64] [--checkpoints 5] [--candidates 8] [--threads 1]
    python benchmarks/bench_eval.py --shape smollm --rows 32 --candidates 4   # a real size
    python benchmarks/bench_eval.py --shape smollm --checkpoints 10 --no-cache  # before the cache
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


#: SmolLM2-135M's shape (random weights: nothing is downloaded).
SMOLLM = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}


def _smollm(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mwakit.evaluate.model import quiet

    torch.manual_seed(0)
    with quiet():  # no "Writing model shards" bar in the table
        LlamaForCausalLM(LlamaConfig(**SMOLLM)).save_pretrained(folder)
    return folder


def _adapter(out: Path, base: Path, cfg: dict[str, int], r: int, seed: int) -> None:
    """A PEFT LoRA folder over every linear module, written directly (no model load)."""
    import torch
    from make_run import LLAMA_MODULES
    from safetensors.torch import save_file

    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h)}
    dims.update(gate_proj=(h, inter), up_proj=(h, inter), down_proj=(inter, h))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for m in LLAMA_MODULES:
            part = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{m}"
            fan_in, fan_out = dims[m]
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=g) * 0.05
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=g) * 0.05
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": list(LLAMA_MODULES),
        "lora_dropout": 0.0,
        "bias": "none",
        "base_model_name_or_path": str(base),
    }
    (out / "adapter_config.json").write_text(json.dumps(config))


def _setup(tmp: Path, k: int, n_rows: int, seq: int, shape: str) -> tuple[Path, Path, Path]:
    import torch
    from make_run import make_tiny_llama

    from tests.evaluate.conftest import save_tokenizer  # the tests' offline word tokenizer

    base = _smollm(tmp / "base") if shape == "smollm" else make_tiny_llama(tmp / "base")
    save_tokenizer(base)
    cfg = json.loads((base / "config.json").read_text())
    run = tmp / "run"
    for i in range(k):
        out = run / f"checkpoint-{10 * (i + 1)}"
        _adapter(out, base, cfg, 8 if shape == "smollm" else 4, seed=i + 1)
        losses = [{"loss": 2.0 - 0.1 * i + 0.05 * (j % 3), "step": 10 * i + j} for j in range(10)]
        (out / "trainer_state.json").write_text(
            json.dumps({"global_step": 10 * (i + 1), "log_history": losses})
        )
    g = torch.Generator().manual_seed(0)
    data = tmp / "val.jsonl"
    with data.open("w") as f:
        for _ in range(n_rows):
            ids = torch.randint(6, 128, (seq,), generator=g).tolist()
            half = seq // 2
            f.write(
                json.dumps(
                    {
                        "prompt": " ".join(f"w{t}" for t in ids[:half]),
                        "completion": " ".join(f"w{t}" for t in ids[half:]) + " </s>",
                    }
                )
                + "\n"
            )
    return base, run, data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--seq", type=int, default=32, help="tokens per row (half prompt)")
    ap.add_argument("--checkpoints", type=int, default=5)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--metric", default="loss,exact_match")
    ap.add_argument(
        "--no-cache",
        action="store_true",
        help="re-read and re-parse every checkpoint per candidate (tune before its input cache)",
    )
    ap.add_argument(
        "--shape",
        choices=["tiny", "smollm"],
        default="tiny",
        help="tiny: the make_run Llama; smollm: SmolLM2-135M's shape, random weights, r 8",
    )
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from mwakit.evaluate import Evaluator, load_rows
    from mwakit.io.cache import InputCache
    from mwakit.io.header import HeaderMemo, remembered_headers
    from mwakit.memory import merge_in_memory
    from mwakit.recipe import parse_recipe
    from mwakit.validate import checked_plan

    # What tune's scorer keeps across candidates: the checkpoints' tensors and headers.
    cache = None if a.no_cache else InputCache()
    headers: HeaderMemo = {}

    with tempfile.TemporaryDirectory() as d:
        base, run, data = _setup(Path(d), a.checkpoints, a.rows, a.seq, a.shape)
        t0 = time.perf_counter()
        ev = Evaluator(base, metrics=a.metric.split(","))
        rows = load_rows(data)
        ev.encode(rows)
        print(f"load base + tokenizer + tokenise {a.rows} rows: {time.perf_counter() - t0:.2f}s")
        print(f"{'candidate':<24} {'merge ms':>9} {'swap ms':>8} {'eval ms':>8} {'overhead':>9}")
        totals = [0.0, 0.0, 0.0]
        for c in range(a.candidates):
            # Factor-space candidates first, then delta-space ones: each space has its own
            # adapter structure (concatenated ranks vs delta_rank), built once.
            half = (a.candidates + 1) // 2
            space = "factors" if c < half else "delta"
            penalty = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0][(c if c < half else c - half) % 6]
            spec = {
                "method": "mwa",
                "params": {"penalty": penalty},
                "select": {"run": str(run)},
                "lora_space": space,
                "output": {"path": str(Path(d) / "never")},
                "device": "cpu",
            }
            if space == "delta":
                spec["delta_rank"] = 8 if a.shape == "smollm" else 4
            t1 = time.perf_counter()
            if a.no_cache:
                plan = checked_plan(parse_recipe(spec))
            else:
                with remembered_headers(headers):
                    plan = checked_plan(parse_recipe(spec))
            merged = merge_in_memory(plan, cache=cache)
            merge = time.perf_counter() - t1
            res = ev.score(rows, merged)
            swap, evaluation = res.swap_seconds, res.seconds - res.swap_seconds
            if c not in (0, half):  # the first of each space builds its slot: reported apart
                totals = [totals[0] + merge, totals[1] + swap, totals[2] + evaluation]
            name = f"mwa p={penalty} {space}"
            pct = 100 * (merge + swap) / evaluation
            print(
                f"{name:<24} {1e3 * merge:9.1f} {1e3 * swap:8.1f} {1e3 * evaluation:8.1f} "
                f"{pct:8.1f}%"
            )
        n = a.candidates - len({0, half})
        if n <= 0:
            print("no candidate reused an adapter slot: give --candidates ≥ 3")
            return 0
        m, s, e = (1e3 * t / n for t in totals)
        print(
            f"mean over the {n} swaps without a rebuild: merge {m:.1f} ms, swap {s:.1f} ms, "
            f"eval {e:.1f} ms: (merge + swap) / eval = {100 * (m + s) / e:.1f}% "
            f"(swap alone {100 * s / e:.1f}%); adapter slot rebuilds {ev.model.rebuilds}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
