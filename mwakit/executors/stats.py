"""What an execution did: the statistics every executor returns (torch-free, so that the
NumPy executor and the CLI can use it without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ExecStats"]


@dataclass
class ExecStats:
    """What an execution did.

    Attributes:
        tasks: Tensor groups processed.
        seconds: Wall time of the execution.
        bytes_read: Input tensor bytes read.
        bytes_written: Output tensor bytes written.
        device: The compute device.
        rel_errors: Relative Frobenius error of each re-factorised module (delta_rank: N).
        solvers: How each dense ΔW was re-factorised (`mwakit.lowrank.Refactored.solver`).
        max_live_inputs: The most input tensors held at once (the streaming bound).
        fisher_norms: Global L2 norm of each checkpoint's Fisher (normalize_fisher).
        thresholds: Per-checkpoint magnitude thresholds for whole-model trimming, by task name.
        digests: sha256 of input files an executor hashed itself (the Ray executor hashes
            the weights files on the cluster), by path.
        refactor_seconds: Time spent re-factorising dense ΔW (summed over worker processes).
    """

    tasks: int = 0
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    device: str = "cpu"
    rel_errors: dict[str, float] = field(default_factory=dict)
    solvers: dict[str, str] = field(default_factory=dict)
    max_live_inputs: int = 0
    fisher_norms: list[float] = field(default_factory=list)
    thresholds: dict[str, list[float]] = field(default_factory=dict)
    digests: dict[Path, str] = field(default_factory=dict)
    refactor_seconds: float = 0.0
