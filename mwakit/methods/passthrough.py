"""Passthrough: one checkpoint's tensors, optionally scaled — and, with ``slices:``, the
layer-stacking ("frankenmerge") layout built from several full models.

Formula: θ = scale · θ_1 (``scale`` may be a per-layer list and set by ``rules:``, e.g. 0 on
``*.o_proj.*``). With ``slices:`` (full models only) every output tensor comes from exactly
one checkpoint: the layers of each slice in order, renumbered 0, 1, … across the slices
(`mwakit.slices`), and the tensors outside the layer stack (embeddings, final norm, lm_head)
plus config.json and tokenizer files from the checkpoint ``rest_from`` names (an index into
``checkpoints:``), else the first slice's checkpoint. The output may have more or fewer
layers than any input; config.json's layer count (and per-layer lists such as
``layer_types``) follow.
Space: delta (adapters: scale·ΔW exactly, by putting the scale on B — ``delta_rank:
concat``) or full. ``lora_space: factors`` is refused (scaling A and B would give scale²).
Slices of adapters are refused: an adapter's ΔW belongs to its base model's layer of the
same index, so restacking layers would apply updates to the wrong weights (per-layer weights
with `linear` choose adapters layer by layer instead).
Reference: mergekit's ``passthrough`` (Goddard et al. 2024, arXiv 2403.13257).

Where mwakit deliberately differs from mergekit:
- A slice takes layers from one checkpoint; mergekit's slices may list several sources and
  merge them with another method (`mwakit convert` turns a single full-range slice into
  ``checkpoints:``).
- ``scale`` is a method parameter (per rule, per layer), not a per-model one.
- Integer tensors are copied, never scaled.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from mwakit.methods.linear import weighted_sum
from mwakit.methods.registry import CheckpointView, MergeMethod, register


class Params(BaseModel):
    """Parameters of `passthrough`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    scale: float = Field(default=1.0, allow_inf_nan=False)
    """Factor every float tensor is multiplied by (1: an exact copy)."""
    rest_from: int | None = Field(default=None, ge=0)
    """With slices: index of the checkpoint giving the tensors outside the layer stack and
    config.json/tokenizer files (default: the first slice's checkpoint)."""


def weigh(params: Params, checkpoints: Sequence[CheckpointView]) -> list[float]:
    """``scale`` for each checkpoint: each output tensor reads exactly one of them."""
    return [params.scale] * len(checkpoints)


METHOD = register(
    MergeMethod(
        name="passthrough",
        params=Params,
        merge=weighted_sum,
        weigh=weigh,
        summary="one checkpoint's tensors times scale; with slices: layers stacked from several",
        formula="θ = scale · θ_1; slices: layer j of the output = layer i of checkpoint c",
        reference="mergekit's passthrough (Goddard et al. 2024, arXiv 2403.13257)",
        linear=True,
        spaces=("delta", "full"),
        inputs=(1, 1),  # with slices: one checkpoint per output tensor, any number in all
        uses_weights=False,  # the weight is `scale`; a `weight:` is refused
    )
)
