"""Benchmark: TIES on Llama-3-8B-shaped LoRA adapters, re-factorised to ``delta_rank: 16``.

Generates 10 rank-16 fp32 adapters shaped like a Llama-3-8B LoRA (32 layers × the seven linear
modules = 224 modules, up to 14336×4096) under /work/cache, merges them with ``method: ties``,
``lora_space: delta``, ``delta_rank: 16`` in a child process (the public API, as `mwakit run`
does, start-up included) and reports:

- total wall time of the merge, and the time spent re-factorising (inside `dense_refactor`);
- how each module was factorised (randomized sketch certified within 1 %, or dense SVD) and
  the relative errors mwakit reports (mean, max);
- on a sample of modules, the written factors against the exact optimum: the merged ΔW is
  recomputed from the inputs, its singular values found by a dense SVD, and the error of the
  written B·A compared with the optimal rank-16 truncation error (target: ratio ≤ 1.01);
- the dense SVD's time on the sampled modules, extrapolated to all modules (what the previous
  full-SVD path cost).

Target (issue 11 §3): total wall ≤ 5 min on the project's 2-core box, every sampled module
within 1 % of its optimal truncation error. Measured (Dec 2026, 1 torch thread, 2 worker
processes, all 224 modules): 264 s (292 s and 286 s before the last consensus change), all
224 certified by the sketch, sampled ratios 1.0043–1.0059 — met (it was ≈ 1336 s with dense
ΔW_i, 498 s with factored ΔW_i in one process, on a box whose two cores behaved as one for
vector work).
Run it under the bench lock with 1 thread::

    flock /tmp/mwakit-bench.lock nice -n 10 python benchmarks/bench_refactor.py --threads 1
    python benchmarks/bench_refactor.py --modules 14 --sample 3      # quick look (2 layers)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import LLAMA3_8B_MODULES

MODULES = LLAMA3_8B_MODULES
LAYERS = 32
K, R = 10, 16

#: Child: run the merge through the API, time the re-factorisation, dump the stats as JSON.
CHILD = """
import json, sys
import torch
torch.set_num_threads(int(sys.argv[3]))
from mwakit import api
from mwakit.recipe import load_recipe
res = api.run(load_recipe(sys.argv[1]))
import resource
doc = {"refactor_s": res.stats.refactor_seconds, "rel_errors": res.stats.rel_errors,
       "solvers": res.stats.solvers, "weights": list(res.plan.weights),
       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
       "workers_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
open(sys.argv[2], "w").write(json.dumps(doc))
"""


def module_names(n: int) -> list[str]:
    """The first ``n`` of the 224 modules, layer by layer."""
    names = [f"model.layers.{i}.{m}" for i in range(LAYERS) for m in MODULES]
    return names[:n]


def generate(folder: Path, names: list[str], *, seed: int) -> None:
    """One PEFT-layout fp32 rank-16 adapter with random factors (skipped if present)."""
    import torch
    from safetensors.torch import save_file

    if (folder / "adapter_model.safetensors").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    ts = {}
    for name in names:
        fin, fout = MODULES[name.split(".", 3)[3]]
        key = f"base_model.model.{name}"
        ts[f"{key}.lora_A.weight"] = torch.randn(R, fin, generator=g) * 0.01
        ts[f"{key}.lora_B.weight"] = torch.randn(fout, R, generator=g) * 0.01
    save_file(ts, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = {
        "peft_type": "LORA",
        "r": R,
        "lora_alpha": 2 * R,
        "task_type": "CAUSAL_LM",
        "target_modules": sorted({n.rsplit(".", 1)[1] for n in names}),
        "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B",
        "use_rslora": False,
    }
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def write_recipe(path: Path, folders: list[Path], out: Path, rank: int) -> None:
    import yaml

    data = {
        "method": "ties",
        "params": {"density": 0.2, "lambda": 1.0},
        "checkpoints": [{"path": str(f)} for f in folders],
        "lora_space": "delta",
        "delta_rank": rank,
        "device": "cpu",
        "output": {"path": str(out), "overwrite": True},
    }
    path.write_text(yaml.safe_dump(data))


def sample_modules(names: list[str], n: int) -> list[str]:
    """``n`` modules evenly spaced over the list (224 / 7: every kind, at different depths)."""
    n = min(n, len(names))
    return [names[i * len(names) // n] for i in range(n)]


def check_sample(
    folders: list[Path], out: Path, names: list[str], weights: list[float], rank: int
) -> list[tuple[str, float, float, float]]:
    """(module, written error, optimal error, dense SVD seconds) for each sampled module."""
    import torch
    from safetensors import safe_open

    from mwakit.lowrank import dense_delta
    from mwakit.methods import ties

    cfg = json.loads((out / "adapter_config.json").read_text())
    s_out = cfg["lora_alpha"] / cfg["r"]
    s_in = 2.0  # lora_alpha / r of the generated inputs
    rows = []
    for name in names:
        key = f"base_model.model.{name}"
        deltas = []
        for f in folders:
            with safe_open(str(f / "adapter_model.safetensors"), "pt") as fh:
                a, b = fh.get_tensor(f"{key}.lora_A.weight"), fh.get_tensor(f"{key}.lora_B.weight")
            deltas.append(dense_delta(a, b, s_in))
        merged = ties.merge(deltas, weights, ties.Params(density=0.2))
        del deltas
        with safe_open(str(out / "adapter_model.safetensors"), "pt") as fh:
            a, b = fh.get_tensor(f"{key}.lora_A.weight"), fh.get_tensor(f"{key}.lora_B.weight")
        m64 = merged.double()
        total = float(m64.square().sum())
        written = math.sqrt(float((m64 - s_out * (b.double() @ a.double())).square().sum()) / total)
        t0 = time.perf_counter()
        s = torch.linalg.svdvals(merged)
        svd_s = time.perf_counter() - t0
        sd = s.double()
        optimal = math.sqrt(float(sd[rank:].square().sum()) / float(sd.square().sum()))
        rows.append((name, written, optimal, svd_s))
        print(
            f"  {name:<32} {list(merged.shape)!s:>14}  written {written:.6f}  optimal "
            f"{optimal:.6f}  ratio {written / optimal:.5f}  (dense SVD {svd_s:.1f} s)",
            flush=True,
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/work/cache/mwakit-bench-refactor"))
    ap.add_argument("--modules", type=int, default=LAYERS * len(MODULES), help="first N modules")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the merge")
    ap.add_argument("--rank", type=int, default=16, help="delta_rank")
    ap.add_argument("--sample", type=int, default=7, help="modules checked against a dense SVD")
    a = ap.parse_args()
    names = module_names(a.modules)
    data = a.data / f"m{len(names)}"
    folders = [data / f"checkpoint-{i}" for i in range(K)]
    t0 = time.perf_counter()
    for i, f in enumerate(folders):
        generate(f, names, seed=i)
    gen_s = time.perf_counter() - t0
    size = sum((f / "adapter_model.safetensors").stat().st_size for f in folders) / 1e9
    print(
        f"TIES (density 0.2) of {K} rank-{R} fp32 adapters, Llama-3-8B shapes, {len(names)} "
        f"modules ({size:.2f} GB in, generated in {gen_s:.0f} s) → delta_rank {a.rank}; "
        f"{a.threads} thread(s), {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory(dir=a.data) as tmp:
        t = Path(tmp)
        out = t / "out"
        rec = t / "ties.yaml"
        write_recipe(rec, folders, out, a.rank)
        n = str(a.threads)  # MWAKIT_THREADS: the merge's own thread policy (default 1)
        env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "MWAKIT_THREADS": n}
        stats_file = t / "stats.json"
        cmd = [sys.executable, "-c", CHILD, str(rec), str(stats_file), str(a.threads)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"merge failed:\n{proc.stderr}")
        doc = json.loads(stats_file.read_text())
        errs: dict[str, float] = doc["rel_errors"]
        solvers: dict[str, str] = doc["solvers"]
        counts = {s: list(solvers.values()).count(s) for s in sorted(set(solvers.values()))}
        worst = max(errs.items(), key=lambda kv: kv[1])
        print(
            f"merge wall {wall:.1f} s (start-up, read, ΔW, TIES, re-factorise, write); "
            f"re-factorisation {doc['refactor_s']:.1f} s (summed over worker processes); peak "
            f"RSS {doc['peak_rss_mb']:.0f} MB (largest worker {doc['workers_rss_mb']:.0f} MB)"
        )
        full = LAYERS * len(MODULES)
        scale = 1.0
        if len(names) < full and len(names) % len(MODULES) == 0:
            scale = full / len(names)  # whole layers: the same mix of shapes
            print(
                f"extrapolated to {full} modules (×{scale:g}): wall ≈ {wall * scale:.0f} s, "
                f"re-factorisation ≈ {doc['refactor_s'] * scale:.0f} s"
            )
        print(
            f"solvers: {counts}; reported rel. error mean {sum(errs.values()) / len(errs):.4f}, "
            f"max {worst[1]:.4f} at {worst[0]}"
        )
        print(f"sample of {a.sample} modules against the exact optimum (dense SVD):")
        rows = check_sample(folders, out, sample_modules(names, a.sample), doc["weights"], a.rank)
        ratios = [w / o for _, w, o, _ in rows if o > 0]
        per_kind: dict[str, float] = {}
        for n, *_, svd_s in rows:
            per_kind.setdefault(n.split(".", 3)[3], svd_s)
        if len(per_kind) == len(MODULES):
            # Singular values only (svdvals): a lower bound on what the SVD with vectors costs.
            dense = sum(per_kind[n.split(".", 3)[3]] for n in module_names(full))
            print(
                f"dense SVD (values only) of all {full} modules, from the sample's times: "
                f"≥ {dense / 60:.0f} min, against ≈ {doc['refactor_s'] * scale / 60:.1f} min "
                "re-factorising"
            )
        if ratios:
            total = wall * scale
            print(
                f"worst written/optimal error ratio {max(ratios):.5f} "
                f"({'within' if max(ratios) <= 1.01 else 'OUTSIDE'} 1 %); target wall ≤ 300 s "
                f"for {full} modules: {'met' if total <= 300 else 'missed'} ({total:.0f} s"
                f"{', extrapolated' if scale != 1.0 else ''})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
