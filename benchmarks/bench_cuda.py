"""Benchmark: the CUDA path against the CPU path on full models (issue 11 §6).

Builds K TinyLlama-shaped bf16 checkpoints and a base (as `bench_full.py` does, fewer layers by
default), then merges them with ``device: cpu`` and ``device: cuda`` and checks:

- linear (MWA weights): the CUDA output is byte-identical to the CPU output;
- DARE (``dare_linear``, one checkpoint against the base): the drop masks — where the output
  differs from the base — are identical (SplitMix64 draws the same bits on the device);
- TIES: every value within 1 ulp of the compute dtype (float32, written as float32), since
  reductions may sum in another order on the device;
- throughput: input bytes merged per second on CUDA against the host-to-device copy rate of
  the same bytes (pinned and pageable); target ≥ 50 % of the copy rate.

Without CUDA it prints "no CUDA" and exits 0, so it can sit in any benchmark run.

Usage::

    python benchmarks/bench_cuda.py                  # 3 × 4-layer TinyLlama-shaped checkpoints
    python benchmarks/bench_cuda.py --layers 22 --k 5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _state(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _merge(recipe: dict[str, Any], out: Path, device: str) -> tuple[Path, Any]:
    import mwakit
    from mwakit.recipe import parse_recipe

    data = {**recipe, "device": device, "output": {"path": str(out), "overwrite": True}}
    res = mwakit.run(parse_recipe(data))
    return res.path, res.stats


def _copy_rate(nbytes: int, pinned: bool) -> float:
    """Host-to-device bytes per second for ``nbytes`` in 64 MiB pieces."""
    import torch

    piece = 64 << 20
    src = torch.empty(piece, dtype=torch.uint8, pin_memory=pinned)
    dst = torch.empty(piece, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=pinned)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    done = 0
    while done < nbytes:
        dst.copy_(src, non_blocking=pinned)
        done += piece
    torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


def _ulps(a: Any, b: Any) -> float:
    """The largest |a − b| in units of the float32 spacing at max(|a|, |b|)."""
    import torch

    a, b = a.float(), b.float()
    scale = torch.maximum(a.abs(), b.abs())
    spacing = torch.where(
        scale > 0, torch.nextafter(scale, torch.full_like(scale, float("inf"))) - scale, 1.0
    )
    return float(((a - b).abs() / spacing).max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("benchmarks/data"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA: nothing to measure (the CUDA path is checked only where a GPU exists)")
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_full import build

    root = a.data / f"full-l{a.layers}"
    base = root / "base"
    build(base, layers=a.layers, seed=0, shard="1GB", base=None)
    folders = [root / f"ft{i}" for i in range(a.k)]
    for i, f in enumerate(folders):
        build(f, layers=a.layers, seed=i + 1, shard="1GB", base=base)
    ck = [{"path": str(f), "metrics": {"loss": 1.0 + 0.1 * i}} for i, f in enumerate(folders)]
    name = torch.cuda.get_device_name()
    print(f"{name}; {a.k} checkpoints, {a.layers} layers (bf16)")
    results: dict[str, Any] = {"device": name, "layers": a.layers, "k": a.k}
    ok = True
    with tempfile.TemporaryDirectory(dir=a.data) as tmp:
        t = Path(tmp)
        linear = {"method": "mwa", "params": {"metric": "loss", "penalty": 0.7}, "checkpoints": ck}
        ties = {
            "method": "ties",
            "params": {"density": 0.2},
            "checkpoints": ck,
            "base_model": str(base),
            "out_dtype": "float32",
        }
        dare = {
            "method": "dare_linear",
            "params": {"drop_rate": 0.8, "seed": 0},
            "checkpoints": ck[:1],
            "base_model": str(base),
        }
        for label, rec in (("linear", linear), ("ties", ties), ("dare", dare)):
            _merge(rec, t / f"{label}-warm", "cuda")  # CUDA context, kernels, page cache
            cpu_path, cpu = _merge(rec, t / f"{label}-cpu", "cpu")
            gpu_path, gpu = _merge(rec, t / f"{label}-cuda", "cuda")
            ref, got = _state(cpu_path), _state(gpu_path)
            if label == "linear":
                same = all(torch.equal(ref[k], got[k]) for k in ref)
                verdict = "byte-identical" if same else "DIFFERENT BYTES"
                ok &= same
            elif label == "dare":
                b = _state(base)
                same = all(torch.equal(ref[k] != b[k], got[k] != b[k]) for k in ref)
                verdict = "same drop masks" if same else "DIFFERENT MASKS"
                ok &= same
            else:
                worst = max(_ulps(ref[k], got[k]) for k in ref)
                verdict = f"max {worst:.2f} ulp (float32)"
                ok &= worst <= 1.0
            rate = gpu.bytes_read / gpu.seconds
            print(
                f"{label:7} cpu {cpu.seconds:6.2f} s  cuda {gpu.seconds:6.2f} s  "
                f"({rate / 1e9:5.2f} GB/s of inputs)  {verdict}"
            )
            results[label] = {
                "cpu_s": cpu.seconds,
                "cuda_s": gpu.seconds,
                "bytes_read": gpu.bytes_read,
                "verdict": verdict,
            }
        nbytes = results["linear"]["bytes_read"]
        pinned, pageable = _copy_rate(nbytes, True), _copy_rate(nbytes, False)
        merged = nbytes / results["linear"]["cuda_s"]
        share = merged / pageable
        print(
            f"H2D copy of the same {nbytes / 1e9:.2f} GB: pinned {pinned / 1e9:.2f} GB/s, "
            f"pageable {pageable / 1e9:.2f} GB/s; linear merge {merged / 1e9:.2f} GB/s = "
            f"{100 * share:.0f} % of pageable (target ≥ 50 %)"
        )
        ok &= share >= 0.5
        results["h2d"] = {"pinned": pinned, "pageable": pageable, "share": share}
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
