"""Task arithmetic.

Formula: θ = θ_0 + λ Σ_i w_i δ_i with δ_i = θ_i − θ_0 (``normalize: true`` divides the w_i by
Σ w_i first). One model with λ = 1 gives θ_1 back.
Space: delta or full. With ``base_model`` (full models) the method subtracts and adds θ_0; on
adapters the inputs are ΔW_i (base 0). λ is folded into the per-checkpoint weights, so the
result is exactly Σ w_i δ_i and LoRA adapters merge exactly by rank concatenation.
Reference: Ilharco et al. 2023, Editing models with task arithmetic (arXiv 2212.04089).
Differences from mergekit: none in the formula (``lambda`` 1, ``normalize`` false, as there);
mergekit's ``density``/``rescale`` options on task_arithmetic are magnitude_prune/DARE here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from mwakit.errors import MetricError
from mwakit.methods.registry import CheckpointView, MergeMethod, register
from mwakit.weights import normalize

if TYPE_CHECKING:
    import torch

#: Params config shared by the task-vector methods: ``lambda`` is a Python keyword, so the field
#: is ``lambda_`` with alias ``lambda``; recipes, cards and `mwakit methods` all say ``lambda``.
TASK_VECTOR_CONFIG = ConfigDict(
    extra="forbid",
    use_attribute_docstrings=True,
    validate_by_name=True,
    validate_by_alias=True,
    serialize_by_alias=True,
)


class Params(BaseModel):
    """Parameters of `task_arithmetic`."""

    model_config = TASK_VECTOR_CONFIG

    lambda_: float = Field(default=1.0, alias="lambda", allow_inf_nan=False)
    """Scaling λ of the summed task vectors (1: plain sum)."""
    normalize: bool = False
    """Divide the weights by Σ w_i first (a weighted mean of the task vectors)."""


def scaled_weights(
    checkpoints: Sequence[CheckpointView], *, lam: float = 1.0, normalized: bool = False
) -> list[float]:
    """λ · w_i, w_i = the recipe's ``weight`` (default 1), divided by Σ w_j if ``normalized``.

    Raises:
        MetricError: A weight is not finite, or the weights sum to 0 and must be normalised.
    """
    names = [c.name for c in checkpoints]
    raw = [1.0 if c.weight is None else c.weight for c in checkpoints]
    for name, w in zip(names, raw, strict=True):
        if not math.isfinite(w):
            raise MetricError(f"weight is {w}", where=name, fix="give a finite weight")
    ws = normalize(raw, names) if normalized else raw
    return [lam * w for w in ws]


def weigh(params: Params, checkpoints: Sequence[CheckpointView]) -> list[float]:
    """λ times the recipe's ``weight`` (default 1), normalised if ``normalize``."""
    return scaled_weights(checkpoints, lam=params.lambda_, normalized=params.normalize)


def merge(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: Any = None,
    *,
    base: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    key: str = "",
) -> torch.Tensor:
    """θ_0 + Σ_i w_i (θ_i − θ_0); the weights already include λ (see `weigh`).

    Computed as θ_0 + Σ w_i δ_i rather than (1 − Σw) θ_0 + Σ w θ_i so that a one-model merge
    with w = 1 reproduces the model up to one rounding, whatever Σ w is.
    """
    import torch

    from mwakit.methods import sparsify
    from mwakit.methods.precision import accumulator

    dt = dtype or torch.float32
    acc = accumulator(dt)  # sum (and add the base) in float32 at least, round once
    out = sparsify.finish(sparsify.sparse_sum(tensors, weights, base, acc), base, acc)
    return out if out.dtype == dt else out.to(dt)


METHOD = register(
    MergeMethod(
        name="task_arithmetic",
        params=Params,
        merge=merge,
        weigh=weigh,
        summary="add the weighted sum of task vectors θ_i − θ_0, scaled by λ, to the base",
        formula="θ = θ_0 + λ Σ w_i (θ_i − θ_0)",
        reference="Ilharco et al. 2023, Editing models with task arithmetic (arXiv 2212.04089)",
        linear=True,
        spaces=("delta", "full"),
        needs_base=True,
    )
)
