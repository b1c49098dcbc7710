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


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a child process; exits with its stderr if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        assert proc.stderr is not None
        raise SystemExit(f"failed: {' '.join(cmd[:4])}…\n{proc.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024


def best_of(n: int, cmd: list[str]) -> tuple[float, float]:
    """Best wall time and worst peak RSS over n runs."""
    runs = [measure(cmd) for _ in range(n)]
    return min(r[0] for r in runs), max(r[1] for r in runs)
