"""Benchmark: merging sharded full-model checkpoints, against a plain-PyTorch reference.

Builds a base and K fine-tuned checkpoints shaped like a transformers `LlamaConfig` (default:
TinyLlama-1.1B shapes, bf16, ~2.2 GB each, 1 GB shards) with random weights — the shapes come
from a meta-device `LlamaForCausalLM`, the values from torch.randn, so building is fast — then,
on the same page-cached inputs and each in its own process, times:

- read floor: reading every input shard once;
- whole-load reference: load every checkpoint whole, weighted sum in float32, save one file;
- mwakit linear (MWA weights), and task-vector methods against the base (`--methods`:
  TIES and DARE-TIES by default; also dare_linear, magnitude_prune, breadcrumbs,
  breadcrumbs_ties, della_linear, sce, and the spherical karcher, multislerp (task vectors
  against the base), nuslerp and nearswap (the first two checkpoints)), fingerprints included
  (digest cache off);
- for linear, TIES and DARE-TIES, before each mwakit run, a plain streamed reference of the
  same formula (one tensor of each checkpoint at a time via safe_open, plain torch ops, one
  save_file: `common.REFERENCE_STREAMED`), run in turn with mwakit (ref, mwakit, ref, …);

printing wall time, ratios and peak RSS. Targets: (issue 11 §4) every mwakit row ≤ 1.0× its
plain reference; (issue 3) TIES/DARE ≤ 3× mwakit's own linear (mergekit: 281 s vs 9.9 s, 28×).

Measured (2-core shared box, 5 × TinyLlama-1.1B bf16, `--k 5 --methods --skip-whole
--fsync-ref --repeat 3`, best of 3, fingerprints included): before the block-fused linear
kernel and the O_DIRECT writer, mwakit linear 18.5 s (26.8 CPU-s) against 15.6 s for the
fsynced reference (19.8 s not fsynced): 1.19×; after, 10.2 s (15.6 CPU-s, 1.4 GiB peak)
against 14.0 s fsynced (18.4 s not): 0.73× (0.55×; another run 12.4 s vs 17.0 / 15.7 s,
0.73× / 0.79×). What is left is mostly the sha256 of the 11 GB of inputs (~8 CPU-s at
1.45 GB/s) on its own thread. TIES alone: 64.0 s (was 67.4 s), same bytes; at `--layers 4
--k 3` TIES 0.32× and DARE-TIES 0.41× their plain references, linear 0.80×.

Re-measured on a 2-core box whose two cores run two vector-bound processes at full speed (Dec 7
2026, `--k 5 --methods ties --skip-whole --fsync-ref`, one run each): linear 13.2 s against
16.7 s fsynced (0.79×), TIES 41.8 s against 199 s (0.21×; block threads and the cheaper
consensus, 64 s before), TIES ÷ mwakit linear 3.17×. Dec 8 (same box and command, sha256 on
two helper threads): linear 11.4 s against 11.8 s fsynced and 13.1 s not (0.97×), TIES 40.4 s
against 189 s (0.21×), TIES ÷ linear 3.56×.

Usage::

    python benchmarks/bench_full.py --k 5                 # 5 × TinyLlama-1.1B-shaped, bf16
    python benchmarks/bench_full.py --layers 4 --k 3      # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from common import (
    MWAKIT_ENV,
    READ_FLOOR,
    REFERENCE,
    REFERENCE_STREAMED,
    best_of,
    interleaved,
    measure,
    tinyllama_config,
)


def build(folder: Path, *, layers: int, seed: int, shard: str, base: Path | None) -> None:
    """Write one checkpoint: base + small noise when ``base`` is given, else random."""
    import torch
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    if (folder / "config.json").is_file():
        return
    cfg = tinyllama_config(layers, torch_dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    base_sd: dict[str, torch.Tensor] = {}
    if base is not None:
        for f in sorted(base.glob("*.safetensors")):
            base_sd.update(load_file(f))
    sd = {}
    for k, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        sd[k] = (base_sd[k].float() + 0.01 * noise if base_sd else 0.02 * noise).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(sd, folder, max_shard_size=shard, metadata={"format": "pt"})
    cfg.save_pretrained(folder)


def shards(folder: Path) -> list[str]:
    return [str(p) for p in sorted(folder.glob("*.safetensors"))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("benchmarks/data"))
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--shard", default="1GB")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument(
        "--methods",
        nargs="*",
        default=["ties", "dare_ties"],
        choices=[
            "ties",
            "dare_ties",
            "dare_linear",
            "magnitude_prune",
            "breadcrumbs",
            "breadcrumbs_ties",
            "della_linear",
            "sce",
            "karcher",
            "multislerp",
            "nuslerp",
            "nearswap",
        ],
        help="task-vector methods to time beside linear",
    )
    ap.add_argument(
        "--ray",
        action="store_true",
        help="also time linear with executor: ray (a local cluster started by the run)",
    )
    ap.add_argument("--skip-whole", action="store_true", help="no whole-load reference row")
    ap.add_argument(
        "--fsync-ref",
        action="store_true",
        help="also time the plain reference with its output fsynced (durable, as mwakit's "
        "is), and take mwakit's ratios against that one",
    )
    ap.add_argument(
        "--digest-cache",
        action="store_true",
        help="keep mwakit's digest cache on (a re-run: fingerprints known, not hashed)",
    )
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    py = sys.executable
    mwakit = [py, "-m", "mwakit.cli"]
    env = dict(os.environ) if a.digest_cache else MWAKIT_ENV
    root = a.data / f"full-l{a.layers}"
    base = root / "base"
    folders = [root / f"ft{i}" for i in range(a.k)]
    if a.build_only:
        build(base, layers=a.layers, seed=0, shard=a.shard, base=None)
        for i, f in enumerate(folders):
            build(f, layers=a.layers, seed=i + 1, shard=a.shard, base=base)
        return 0
    # Build in a child: a parent that held gigabytes of tensors can inflate the peak RSS
    # that the children measured below report.
    subprocess.run([py, __file__, *sys.argv[1:], "--build-only"], check=True)
    files = [x for f in folders for x in shards(f)]
    size = sum(os.path.getsize(x) for x in files) / 1e9
    print(
        f"{a.k} checkpoints × {size / a.k:.2f} GB (bf16, {len(shards(folders[0]))} shards "
        f"each), {a.layers} layers; {os.cpu_count()} CPUs; best of {a.repeat}"
    )
    with tempfile.TemporaryDirectory(dir=a.data) as tmp:
        t = Path(tmp)
        ck = [{"path": str(f), "metrics": {"loss": 1.0 + 0.1 * i}} for i, f in enumerate(folders)]

        def recipe(name: str, **kw: object) -> str:
            data = {
                "checkpoints": ck,
                "device": "cpu",
                "output": {"path": str(t / name), "overwrite": True, "shard_size": "1GB"},
                **kw,
            }
            p = t / f"{name}.yaml"
            p.write_text(yaml.safe_dump(data))
            return str(p)

        lin = recipe("linear", method="mwa", params={"metric": "loss", "penalty": 0.7})
        plan = json.loads(subprocess.check_output([*mwakit, "plan", "--json", lin]))
        weights = [c["weight"] for c in plan["checkpoints"]]
        measure([py, "-c", READ_FLOOR, *files])  # warm the page cache
        read_s, _ = best_of(a.repeat, [py, "-c", READ_FLOOR, *files])
        groups = [",".join(shards(f)) for f in folders]
        # (label, wall s, peak MiB, CPU s, its plain reference's (wall, MiB, CPU), mw linear s)
        Row = tuple[str, float, float | None, float | None, tuple[float, float, float] | None,
                    float | None]  # fmt: skip
        rows: list[Row] = [("read floor", read_s, None, None, None, None)]
        if not a.skip_whole:
            whole = [py, "-c", REFERENCE, json.dumps(weights), str(t / "ref.safetensors")]
            ((whole_s, whole_rss, whole_cpu),) = interleaved(a.repeat, [([*whole, *groups], None)])
            rows.append(("whole-load reference", whole_s, whole_rss, whole_cpu, None, None))
        recipes: dict[str, dict[str, object]] = {
            "linear": {"method": "mwa", "params": {"metric": "loss", "penalty": 0.7}},
            "ties": {
                "method": "ties",
                "params": {"density": 0.2},
                "weighting": {"mwa": {"metric": "loss", "penalty": 0.7}},
            },
            "dare_ties": {"method": "dare_ties", "params": {"drop_rate": 0.8, "seed": 0}},
            "dare_linear": {"method": "dare_linear", "params": {"drop_rate": 0.8, "seed": 0}},
            "magnitude_prune": {"method": "magnitude_prune", "params": {"density": 0.2}},
            "breadcrumbs": {"method": "breadcrumbs", "params": {"density": 0.2, "gamma": 0.01}},
            "breadcrumbs_ties": {
                "method": "breadcrumbs_ties",
                "params": {"density": 0.2, "gamma": 0.01},
            },
            "della_linear": {
                "method": "della_linear",
                "params": {"density": 0.3, "epsilon": 0.1, "seed": 0},
            },
            "sce": {"method": "sce", "params": {"select_topk": 0.2}},
            "karcher": {"method": "karcher", "params": {}},
            "multislerp": {"method": "multislerp", "params": {}},
            "nuslerp": {"method": "nuslerp", "params": {}, "checkpoints": ck[:2]},
            "nearswap": {"method": "nearswap", "params": {"t": 0.01}, "checkpoints": ck[:2]},
        }
        # A plain streamed reference of the same formula, where one is written (common.py).
        specs: dict[str, dict[str, object]] = {
            "linear": {"method": "linear", "weights": weights},
            "ties": {"method": "ties", "weights": weights, "density": 0.2},
            "dare_ties": {"method": "dare_ties", "weights": [1.0] * a.k, "drop_rate": 0.8},
        }
        lin_s = 0.0
        for name in ["linear", *a.methods]:
            kw = recipes[name]
            extra = {} if name == "linear" else {"base_model": str(base)}
            cmd = [*mwakit, "run", "-q", recipe(name, **extra, **kw)]
            runs: list[tuple[list[str], dict[str, str] | None]] = [(cmd, env)]
            if name in specs:
                base_arg = "" if name == "linear" else ",".join(shards(base))
                out = str(t / "ref.safetensors")
                ref_cmd = [py, "-c", REFERENCE_STREAMED, json.dumps(specs[name]), out, base_arg]
                runs.insert(0, ([*ref_cmd, *groups], None))
            got = interleaved(a.repeat, runs)
            (s, rss, cpu), ref = got[-1], (got[0] if len(got) == 2 else None)
            if name == "linear":
                lin_s = s
            if ref is not None:
                rows.append((f"plain streamed {name}", ref[0], ref[1], ref[2], None, None))
            if ref is not None and a.fsync_ref:
                # The same reference made as durable as mwakit's output: fsync before done.
                spec = {**specs[name], "fsync": True}
                dur_cmd = [py, "-c", REFERENCE_STREAMED, json.dumps(spec), out, base_arg]
                ((ds, drss, dcpu),) = interleaved(a.repeat, [([*dur_cmd, *groups], None)])
                rows.append((f"plain streamed {name} + fsync", ds, drss, dcpu, None, None))
                ref = (ds, drss, dcpu)
            rows.append((f"mwakit {name}", s, rss, cpu, ref, lin_s))
            if name == "linear" and a.ray:
                # The driver starts a local cluster (num_cpus = this machine's) for the run:
                # its start-up is part of the time, as it is for a user. Peak RSS and CPU are
                # the driver's only (the workers are the raylet's children).
                ray_cmd = [*mwakit, "run", "-q", "--executor", "ray", cmd[-1]]
                ((rs, rrss, rcpu),) = interleaved(a.repeat, [(ray_cmd, env)])
                rows.append(("mwakit linear, ray", rs, rrss, rcpu, ref, lin_s))
        print(
            f"{'':24} {'wall s':>7} {'÷ read':>7} {'÷ plain':>7} {'÷ mw lin':>8} "
            f"{'peak MiB':>9} {'÷ plain':>7} {'CPU s':>6} {'÷ plain':>7}"
        )
        for label, s, rss, cpu, ref, lin in rows:
            r_wall = f"{s / ref[0]:7.2f}" if ref else " " * 7
            r_rss = f"{rss / ref[1]:7.2f}" if ref and rss else " " * 7
            r_cpu = f"{cpu / ref[2]:7.2f}" if ref and cpu else ""
            r_lin = f"{s / lin:8.2f}" if lin else " " * 8
            print(
                f"{label:24} {s:>7.2f} {s / read_s:>7.1f} {r_wall} {r_lin} "
                f"{'' if rss is None else f'{rss:9.0f}':>9} {r_rss} "
                f"{'' if cpu is None else f'{cpu:6.1f}':>6} {r_cpu}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
