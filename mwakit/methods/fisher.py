"""Fisher-weighted averaging.

Formula, element by element: θ(j) = Σ_i λ_i F̂_i(j) θ_i(j) / Σ_i λ_i F̂_i(j), with
F̂_i = F_i / ‖F_i‖ + floor (``normalize_fisher: true``, ‖F_i‖ the L2 norm over the WHOLE
model) or F̂_i = F_i + floor. F_i is the diagonal Fisher of checkpoint i, read from
``fisher_file`` beside it (same keys and shapes; `mwakit fisher` estimates it), and λ_i is the
recipe's ``weight`` (or a ``weighting:`` block, e.g. MWA weights), normalised. The floor keeps
the denominator positive, so 0/0 cannot happen: where every F_i is 0 the result is the
λ-weighted average.
Space: factors (adapters: lora_A and lora_B each merged with their own Fisher, which is what the
estimator measures) or full. Not delta: a Fisher of A and B is not a Fisher of ΔW = s·B·A.
Reference: Matena & Raffel 2022, Merging models with Fisher-weighted averaging
(arXiv 2111.09832).

Where mwakit differs: mergekit has no Fisher merge. Following the paper's code, the floor is
added after the normalisation; a checkpoint whose Fisher is all zero is left unnormalised (it
contributes only through the floor) rather than divided by 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mwakit.methods.registry import CheckpointView, MergeMethod, register
from mwakit.weights import normalize

if TYPE_CHECKING:
    import torch


class Params(BaseModel):
    """Parameters of `fisher`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    fisher_file: str = "fisher.safetensors"
    """Safetensors file with the diagonal Fisher, beside each checkpoint (same keys)."""
    normalize_fisher: bool = False
    """Divide each checkpoint's Fisher by its global L2 norm (over the whole model)."""
    floor: float = Field(default=1e-6, gt=0.0, allow_inf_nan=False)
    """Added to every Fisher value (> 0) so the denominator is never 0."""

    @field_validator("fisher_file")
    @classmethod
    def _file_name(cls, v: str) -> str:
        if not v.strip() or "/" in v or "\\" in v:
            raise ValueError("fisher_file must be a file name inside the checkpoint folder")
        return v


def weigh(params: Params, checkpoints: Sequence[CheckpointView]) -> list[float]:
    """λ_i: the recipe's ``weight`` (default 1), normalised to sum to 1."""
    raw = [1.0 if c.weight is None else c.weight for c in checkpoints]
    return normalize(raw, [c.name for c in checkpoints])


def merge(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: Params,
    *,
    base: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    key: str = "",
    fishers: Sequence[torch.Tensor] | None = None,
    fisher_norms: Sequence[float] | None = None,
) -> torch.Tensor:
    """Fisher-weighted average of one tensor group.

    Args:
        tensors: θ_i (any float dtype, same shape).
        weights: λ_i, one per checkpoint.
        params: Validated `Params`.
        base: Ignored: the average is of the parameters themselves (with a base it would be
            the same result, since Σ_i λ_i F̂_i (θ_i − θ_0) / Σ_i λ_i F̂_i + θ_0 is equal).
        dtype: Compute and result dtype (default float32).
        key: Tensor name, for messages.
        fishers: F_i, one per checkpoint, each the shape of θ_i.
        fisher_norms: Global L2 norm of each F_i (needed with ``normalize_fisher``).

    Returns:
        The merged tensor in ``dtype``.

    Raises:
        ValueError: Fishers or norms are missing or do not fit, a Fisher value is negative,
            or the λ-weighted floor sums to ≤ 0 (weights that cancel).
    """
    import torch

    n = len(tensors)
    where = f" for {key}" if key else ""
    if fishers is None:
        raise ValueError(f"fisher needs the diagonal Fisher of every checkpoint{where}")
    if len(fishers) != n or len(weights) != n:
        raise ValueError(f"{n} tensors but {len(fishers)} Fishers and {len(weights)} weights")
    if params.normalize_fisher:
        if fisher_norms is None or len(fisher_norms) != n:
            raise ValueError(
                "normalize_fisher needs the global L2 norm of each checkpoint's Fisher "
                "(computed in a pre-pass over the whole model)"
            )
        if any(not math.isfinite(x) or x < 0 for x in fisher_norms):
            raise ValueError(f"Fisher norms must be finite and ≥ 0, got {list(fisher_norms)}")
    for i, (theta, f) in enumerate(zip(tensors, fishers, strict=True)):
        if f.shape != theta.shape:
            raise ValueError(
                f"Fisher {i}{where} has shape {list(f.shape)}, not {list(theta.shape)}"
            )
        if bool((f < 0).any()):
            raise ValueError(f"Fisher {i}{where} has negative values (a Fisher is ≥ 0)")
    from mwakit.methods.precision import accumulator

    dt = dtype or torch.float32
    if n == 1:
        # A weighted average of one tensor is that tensor; F·θ/F would round it.
        return tensors[0].to(dt, copy=True)
    acc = accumulator(dt)  # sums in float32 at least whatever dt is, rounded once
    num = torch.zeros(tensors[0].shape, dtype=acc, device=tensors[0].device)
    den = torch.zeros_like(num)
    for i, (theta, f, lam) in enumerate(zip(tensors, fishers, weights, strict=True)):
        fi = f.to(acc, copy=True)  # a fresh tensor: the input may be a memory-mapped view
        if params.normalize_fisher and fisher_norms is not None and fisher_norms[i] > 0:
            fi.div_(fisher_norms[i])
        fi.add_(params.floor).mul_(lam)  # λ_i F̂_i
        den.add_(fi)
        num.addcmul_(fi, theta.to(acc))
    if not bool((den > 0).all()):
        raise ValueError(f"Σ λ_i F_i is ≤ 0 somewhere{where}: use non-negative weights")
    out = num.div_(den)
    return out if out.dtype == dt else out.to(dt)


METHOD = register(
    MergeMethod(
        name="fisher",
        params=Params,
        merge=merge,
        weigh=weigh,
        summary="Fisher-weighted average: each element weighted by its diagonal Fisher",
        formula="θ(j) = Σ λ_i F_i(j) θ_i(j) / Σ λ_i F_i(j), F_i + floor (optionally / ‖F_i‖)",
        reference="Matena & Raffel 2022, Fisher-weighted averaging (arXiv 2111.09832)",
        linear=False,
        spaces=("factors", "full"),
    )
)
