"""Nearswap: move a primary checkpoint toward a secondary one where their parameters are close.

Formula, element-wise, with d = θ_2 − θ_1 (θ_1 the primary — mergekit's ``base_model`` — and
θ_2 the secondary): w = min(1, t/|d|), θ = θ_1 + w·d = w·θ_2 + (1 − w)·θ_1. Where the two
differ by at most t the secondary is taken whole; farther apart it is pulled in less and less.
Where d = 0 the value is θ_1 = θ_2. t is in parameter units (typical values are small,
e.g. 0.0001 in the model that named the method).

Worked example (the golden test): θ_1 = (0, 0, 1, 2), θ_2 = (0.5, 0.05, 1, −2), t = 0.1:
|d| = (0.5, 0.05, 0, 4), w = (0.2, 1, ·, 0.025), θ = (0.1, 0.05, 1, 1.9).

Space: delta (adapters: θ_2 − θ_1 = ΔW_2 − ΔW_1 whatever the base, so the result
ΔW_1 + w·(ΔW_2 − ΔW_1) is exact in update space; then re-factorised by SVD, or written
exactly with ``delta_rank: full``) or full.
Reference: alchemonaut, QuartetAnemoi-70B-t0.0001 (Hugging Face model card, 2024); as in
mergekit's ``nearswap``.

Where mwakit deliberately differs from mergekit:
- The two checkpoints are listed under ``checkpoints:`` (first = primary), like `slerp`;
  mergekit takes the primary as ``base_model`` (`mwakit convert` puts it first).
- Where θ_1 = θ_2 exactly the result is that value; mergekit computes t/0, and for t = 0
  0/0 = NaN. t = 0 returns θ_1.
- Computed in float32 (float64 if asked) whatever the inputs' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from mwakit.methods.registry import CheckpointView, MergeMethod, register

if TYPE_CHECKING:
    import torch


class Params(BaseModel):
    """Parameters of `nearswap`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    t: float = Field(default=0.001, ge=0.0, allow_inf_nan=False)
    """Distance (in parameter units) within which the secondary value is taken whole."""


def weigh(params: Params, checkpoints: Sequence[CheckpointView]) -> list[float]:
    """(1, 1): nearswap weighs element by element; the recipe's weights are not used."""
    return [1.0] * len(checkpoints)


def merge(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: Params,
    *,
    base: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    key: str = "",
) -> torch.Tensor:
    """θ_1 + min(1, t/|θ_2 − θ_1|)·(θ_2 − θ_1), element-wise.

    Args:
        tensors: θ_1 (primary) and θ_2 (secondary), any float dtype, one shape.
        weights: Unused.
        params: Validated `Params`.
        base: Ignored (the primary plays the base's part).
        dtype: Compute and result dtype (float64 if asked, else float32).
        key: Tensor name (unused).

    Raises:
        ValueError: Not exactly two tensors, or their shapes differ.
    """
    import torch

    from mwakit.methods.blocks import compute_dtype

    if len(tensors) != 2:
        raise ValueError(f"nearswap takes exactly 2 checkpoints, got {len(tensors)}")
    if tensors[0].shape != tensors[1].shape:
        raise ValueError(
            f"nearswap needs equal shapes, got {list(tensors[0].shape)} and "
            f"{list(tensors[1].shape)}"
        )
    dt = compute_dtype(dtype)
    primary = tensors[0].to(dt, copy=True)
    if params.t == 0.0:
        return primary
    d = tensors[1].to(dt) - primary
    a = torch.abs(d)
    # min(1, t/|d|), with w = 1 wherever |d| ≤ t — including |d| = 0 and a t so small that
    # it rounds to 0 in the compute dtype (t/0 would be inf, 0·inf NaN).
    w = torch.where(a > params.t, params.t / a, 1.0)
    return primary.add_(d.mul_(w))


METHOD = register(
    MergeMethod(
        name="nearswap",
        params=Params,
        merge=merge,
        weigh=weigh,
        summary="take the second checkpoint's values where they are within t of the first's",
        formula="w = min(1, t/|θ_2 − θ_1|); θ = θ_1 + w·(θ_2 − θ_1), element-wise",
        reference="alchemonaut 2024, QuartetAnemoi-70B-t0.0001; as in mergekit's nearswap",
        linear=False,
        spaces=("delta", "full"),
        inputs=(2, 2),
        uses_weights=False,  # element-wise weights from t; a `weight:` is refused
    )
)
