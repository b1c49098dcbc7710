"""Sparse model soups: average pruned checkpoints without losing their sparsity.

Formula: θ̄ = Σ_i w_i θ_i / Σ_i w_i, then a mask M by ``mask`` policy, θ = θ̄ ⊙ M:
- ``shared`` (default): every input must have the same zero pattern; M is that pattern, so the
  soup is exactly as sparse as each input (a different pattern is an error naming the policies).
- ``intersection``: M keeps the positions non-zero in ALL inputs (sparser than any input).
- ``union``: no mask; the support of the plain average is the union of the supports (a pruned
  weight counts as 0 in the average, as it does in the pruned model).
- ``reprune``: M keeps the k largest |θ̄| with k = the inputs' mean non-zero count (rounded),
  so the soup is as sparse as an average input. Elements tied with the k-th largest are all
  kept (found with `kthvalue`, no sort).
Space: factors (pruned lora_A/lora_B, each merged on its own), delta or full. Not ``linear``:
masking is not a weighted sum, so LoRA rank concatenation cannot represent it.
Reference: Zimmer et al. 2023, Sparse Model Soups (arXiv 2306.16788).

Where mwakit differs: mergekit has no sparse soup (its ``merge_raw_pytorch`` averages and
loses the masks). The paper only averages models pruned with one shared mask; ``intersection``,
``union`` and ``reprune`` are explicit opt-ins for inputs whose masks differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from mwakit.methods.registry import CheckpointView, MergeMethod, register
from mwakit.weights import normalize

if TYPE_CHECKING:
    import torch

MaskPolicy = Literal["shared", "intersection", "union", "reprune"]


class Params(BaseModel):
    """Parameters of `sparse`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    mask: MaskPolicy = "shared"
    """Mask policy: shared (masks must match), intersection, union, or reprune to mean sparsity."""


def sparsity(t: torch.Tensor) -> float:
    """Fraction of exact zeros in ``t`` (0.0 for an empty tensor)."""
    n = t.numel()
    return 0.0 if n == 0 else float((t == 0).sum()) / n


def weigh(params: Params, checkpoints: Sequence[CheckpointView]) -> list[float]:
    """The recipe's ``weight`` (default 1: a uniform soup), normalised."""
    raw = [1.0 if c.weight is None else c.weight for c in checkpoints]
    return normalize(raw, [c.name for c in checkpoints])


def _top_k_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep mask of the k largest |x| (ties with the k-th all kept)."""
    import torch

    n = x.numel()
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    mag = x.abs()
    # The k-th largest is the (n − k + 1)-th smallest: O(n) selection, not a sort.
    kth = mag.reshape(-1).kthvalue(n - k + 1).values
    return mag >= kth


def merge(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: Params,
    *,
    base: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    key: str = "",
) -> torch.Tensor:
    """Sparse soup of one tensor group.

    Args:
        tensors: θ_i (any float dtype, same shape); zeros are the pruned weights.
        weights: Per-checkpoint weights (divided by their sum here too).
        params: Validated `Params`.
        base: Ignored: sparsity is a property of the weights themselves.
        dtype: Compute and result dtype (default float32).
        key: Tensor name, for messages.

    Returns:
        The masked weighted average in ``dtype``.

    Raises:
        ValueError: ``mask: shared`` and the inputs' zero patterns differ, or the weights
            sum to 0.
    """
    import torch

    where = f" in {key}" if key else ""
    total = math.fsum(weights)
    if total == 0 or not math.isfinite(total):
        raise ValueError(f"the weights sum to {total} and cannot be normalised")
    dt = dtype or torch.float32
    masks = [t != 0 for t in tensors]
    mask: torch.Tensor | None = None
    if params.mask == "shared":
        for i, m in enumerate(masks[1:], start=1):
            if not torch.equal(m, masks[0]):
                diff = int((m != masks[0]).sum())
                raise ValueError(
                    f"sparsity masks differ{where}: checkpoint {i} and checkpoint 0 disagree on "
                    f"{diff} of {m.numel()} positions; mask: shared needs one shared mask — "
                    "set mask: intersection, union or reprune"
                )
        mask = masks[0]
    elif params.mask == "intersection":
        mask = masks[0].clone()
        for m in masks[1:]:
            mask &= m
    from mwakit.methods.precision import accumulator

    # Summed in float32 at least whatever dt is; rounded to dt once, after the mask.
    acc = torch.zeros(tensors[0].shape, dtype=accumulator(dt), device=tensors[0].device)
    for t, w in zip(tensors, weights, strict=True):
        if w != 0.0:
            acc.add_(t, alpha=w)
    if total != 1.0:
        acc.div_(total)
    if params.mask == "reprune":
        # Round half up: mean non-zero counts like 2.5 keep 3, never fewer than the mean.
        k = math.floor(sum(int(m.sum()) for m in masks) / len(masks) + 0.5)
        mask = _top_k_mask(acc, k)
    # For `shared`, positions zero in every input already average to 0; masking anyway makes
    # the guarantee hold by construction rather than by the arithmetic.
    out = acc if mask is None else acc.masked_fill_(~mask, 0.0)
    return out if out.dtype == dt else out.to(dt)


METHOD = register(
    MergeMethod(
        name="sparse",
        params=Params,
        merge=merge,
        weigh=weigh,
        summary="sparse model soup: average pruned checkpoints, keep a mask (shared by default)",
        formula="θ = (Σ w_i θ_i / Σ w_i) ⊙ M, M = the shared mask (or ∩, ∪, top-k policy)",
        reference="Zimmer et al. 2023, Sparse Model Soups (arXiv 2306.16788)",
        linear=False,
        spaces=("factors", "delta", "full"),
    )
)
