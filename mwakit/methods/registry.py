"""The method registry: one `MergeMethod` per name, duplicates rejected."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

if TYPE_CHECKING:
    import torch

Space = Literal["factors", "delta", "full"]

#: ``merge(tensors, weights, params, *, base=None, dtype=None, key="") -> tensor`` over one
#: tensor group: ``base`` is θ_0 for task-vector methods (None: the inputs are already deltas),
#: ``dtype`` the compute dtype, ``key`` the tensor name (seeds per-tensor randomness).
MergeFn = Callable[..., "torch.Tensor"]
#: ``weigh(params, checkpoints) -> weights`` turns a method's params and the checkpoints'
#: metrics or recipe weights into one raw weight per checkpoint.
WeighFn = Callable[[Any, Sequence["CheckpointView"]], list[float]]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    Attributes:
        name: The name recipes use (``method: <name>``).
        params: The pydantic model validating ``params:`` (must forbid unknown keys).
        merge: The pure function over one tensor group.
        weigh: Turns params + checkpoints into per-checkpoint weights.
        summary: One line for `mwakit methods`.
        formula: The formula, one line, for `mwakit methods` and the model card.
        reference: Paper or source the method follows.
        linear: True when the result is Σ w_i θ_i, so LoRA factors and low-rank forms apply.
        spaces: The spaces the method can work in.
        needs_base: True for task-vector methods that need ``base_model``.
        uses_base: True for methods that work on the checkpoints themselves but switch to
            task vectors θ_i − θ_0 when a ``base_model`` is given (multislerp, nuslerp, …).
        inputs: (min, max) number of checkpoints; max None means any.
        uses_weights: False when the method computes every checkpoint's weight itself (mwa
            from metrics, slerp from t): an explicit ``weight:`` or a ``weighting:`` block
            would be ignored, so the recipe refuses them.
    """

    name: str
    params: type[BaseModel]
    merge: MergeFn
    weigh: WeighFn
    summary: str
    formula: str
    reference: str
    linear: bool
    spaces: tuple[Space, ...]
    needs_base: bool = False
    uses_base: bool = False
    inputs: tuple[int, int | None] = (1, None)
    """How many checkpoints the method takes: (at least, at most or None)."""
    uses_weights: bool = True
    """Whether `weigh` honours the recipe's per-checkpoint ``weight`` (and ``weighting:``)."""
    factored: bool = False
    """Whether ``merge`` takes LoRA task vectors as `mwakit.methods.blocks.Factored` (it reaches
    them only through `mwakit.methods.blocks`), so a dense ΔW_i is never formed whole."""


@dataclass(frozen=True)
class CheckpointView:
    """What a weighting sees of one checkpoint.

    Attributes:
        name: A short name for messages (the folder name or hub ref).
        metrics: Metrics from the recipe or trainer_state.json.
        weight: The recipe's explicit ``weight`` for this checkpoint, if any.
    """

    name: str
    metrics: dict[str, float]
    weight: float | None


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry.

    Raises:
        ValueError: A method of that name is already registered, or its Params accept
            unknown keys.
    """
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is already registered")
    if method.params.model_config.get("extra") != "forbid":
        raise ValueError(f"{method.name}: Params must set extra='forbid' (unknown keys rejected)")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """Look up a method by name.

    Raises:
        KeyError: No such method; the message lists the known ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(method_names())}") from None


def method_names() -> list[str]:
    """The registered method names, in registration order."""
    return list(_REGISTRY)
