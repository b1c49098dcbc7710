"""Shared by the benchmark scripts: timing child processes with their peak RSS."""

from __future__ import annotations

import os
import subprocess
import time

#: A child that reads every file once: the floor any merge of those files pays.
READ_FLOOR = """
import sys
buf = bytearray(1 << 24)
for p in sys.argv[1:]:
    with open(p, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
"""

#: The plain-PyTorch reference a user would write: load every file whole, weighted sum in
#: float32, save. argv: weights (JSON), output file, then the inputs, one list of shard files
#: per checkpoint joined by ",".
REFERENCE = """
import sys, json, torch
from safetensors.torch import load_file, save_file
weights = json.loads(sys.argv[1]); out = sys.argv[2]
sds = []
for group in sys.argv[3:]:
    sd = {}
    for f in group.split(","):
        sd.update(load_file(f))
    sds.append(sd)
merged = {}
for k, t0 in sds[0].items():
    acc = torch.zeros(t0.shape, dtype=torch.float32)
    for w, sd in zip(weights, sds):
        acc += w * sd[k].float()
    merged[k] = acc.to(t0.dtype)
save_file(merged, out, metadata={"format": "pt"})
"""


#: The plain streamed reference for full models: one tensor of every checkpoint at a time
#: (safe_open), the method's formula in float32 with plain torch ops, one save_file at the
#: end. argv: spec (JSON: method linear|ties|dare_ties, weights, density, drop_rate, lambda,
#: seed), output file, base model's shards joined by "," ("" for none), then one list of
#: shard files per checkpoint joined by ",".
REFERENCE_STREAMED = """
import sys, json, torch
from safetensors import safe_open
from safetensors.torch import save_file
spec = json.loads(sys.argv[1]); out = sys.argv[2]
def opened(group):
    fs = [safe_open(f, "pt") for f in group.split(",")]
    return {k: f for f in fs for k in f.keys()}
base = opened(sys.argv[3]) if sys.argv[3] else None
cks = [opened(g) for g in sys.argv[4:]]
w = torch.tensor(spec["weights"], dtype=torch.float32)
method = spec["method"]
g = torch.Generator().manual_seed(spec.get("seed", 0))
merged = {}
for k in cks[0]:
    ts = [c[k].get_tensor(k) for c in cks]
    dt = ts[0].dtype
    if not dt.is_floating_point:
        merged[k] = ts[0]
        continue
    if method == "linear":
        acc = torch.zeros(ts[0].shape, dtype=torch.float32)
        for wi, t in zip(spec["weights"], ts):
            acc.add_(t.float(), alpha=wi)
        merged[k] = acc.to(dt)
        continue
    b = base[k].get_tensor(k).float()
    tvs = []
    for t in ts:
        tv = t.float() - b
        if method == "ties":
            n = tv.numel()
            keep = max(1, int(round(spec["density"] * n)))
            thr = tv.abs().flatten().kthvalue(n - keep + 1).values if keep < n else 0.0
            tv = torch.where(tv.abs() >= thr, tv, 0.0)
        else:  # dare: drop with probability p, rescale the kept by 1/(1-p)
            p = spec["drop_rate"]
            keep = torch.rand(tv.shape, generator=g) >= p
            tv = torch.where(keep, tv / (1 - p), 0.0)
        tvs.append(tv)
    st = torch.stack(tvs) * w.view(-1, *([1] * b.dim()))
    sign = torch.sign(st.sum(0))
    agree = (torch.sign(st) == sign) & (st != 0)
    num = torch.where(agree, st, 0.0).sum(0)
    den = (agree * w.view(-1, *([1] * b.dim()))).sum(0)
    delta = torch.where(den > 0, num / den.clamp_min(1e-30), 0.0)
    merged[k] = (b + spec.get("lambda", 1.0) * delta).to(dt)
save_file(merged, out, metadata={"format": "pt"})
if spec.get("fsync"):  # durable like mwakit's output (it fsyncs before its final rename)
    import os
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
"""

#: The environment mwakit runs in here: no digest cache, so every run hashes its inputs (the
#: card's fingerprints are part of what is timed).
MWAKIT_ENV = {**os.environ, "MWAKIT_CACHE": "off"}

#: Llama-3-8B's LoRA target modules, name: (in, out) — the LoRA benchmarks' shapes.
HIDDEN, INTER, KV = 4096, 14336, 1024
LLAMA3_8B_MODULES = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, KV),
    "self_attn.v_proj": (HIDDEN, KV),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (HIDDEN, INTER),
    "mlp.up_proj": (HIDDEN, INTER),
    "mlp.down_proj": (INTER, HIDDEN),
}


def tinyllama_config(layers: int, **overrides: object) -> object:
    """A `LlamaConfig` with TinyLlama-1.1B's shapes and ``layers`` layers (the full-model
    benchmarks' models), with ``overrides``."""
    from transformers import LlamaConfig

    kw: dict[str, object] = {
        "vocab_size": 32000,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
        **overrides,
    }
    return LlamaConfig(**kw)


def measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a child process; exits with its stderr if it fails."""
    wall, rss, _ = measure_cpu(cmd, env)
    return wall, rss


def measure_cpu(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """(wall seconds, peak RSS MiB, CPU seconds user + system) of a child process.

    On a shared, busy machine wall time follows the load; CPU time barely does, so both are
    reported.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        assert proc.stderr is not None
        raise SystemExit(f"failed: {' '.join(cmd[:4])}…\n{proc.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def best_of(n: int, cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Best wall time and worst peak RSS over n runs."""
    runs = [measure(cmd, env) for _ in range(n)]
    return min(r[0] for r in runs), max(r[1] for r in runs)


def interleaved(
    n: int, cmds: list[tuple[list[str], dict[str, str] | None]]
) -> list[tuple[float, float, float]]:
    """Best wall, worst peak RSS and least CPU time of several commands over n rounds, run in
    turn (a, b, a, b, …) so that a change of load on a shared machine falls on all alike."""
    runs: list[list[tuple[float, float, float]]] = [[] for _ in cmds]
    for _ in range(n):
        for i, (cmd, env) in enumerate(cmds):
            runs[i].append(measure_cpu(cmd, env))
    return [(min(r[0] for r in rs), max(r[1] for r in rs), min(r[2] for r in rs)) for rs in runs]
