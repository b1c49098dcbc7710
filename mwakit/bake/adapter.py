"""An adapter as the bake sees it: per base tensor, the updates PEFT's ``merge_and_unload`` makes.

The adapter is small and held whole (its tensors, from a folder or from an in-memory merge);
the base is not (see `mwakit.bake.stream`). Keys on disk carry ``base_model.model.`` and no
adapter name; a module's base tensor is ``<module>.weight`` (``.bias`` for ``lora_B.bias``).
Any other key replaces a base tensor: ``modules_to_save`` (``lm_head.weight``), trained biases
(``bias: all``), and the embedding PEFT saves beside an embedding LoRA
(``embed_tokens.base_layer.weight``).

Only plain LoRA (with rsLoRA, patterns, DoRA, conv, embedding and ``lora_bias``) is baked:
everything else PEFT would merge differently, or not at all, and is refused with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mwakit.adapters import AdapterConfig, config_problems, lora_role
from mwakit.errors import PlanError, SourceError
from mwakit.io.header import TensorInfo
from mwakit.io.reader import PreadReader

_PREFIX = "base_model.model."
_MAGNITUDE = ".lora_magnitude_vector"
Kind = Literal["linear", "embedding", "conv"]

#: Config fields that turn on a LoRA variant whose merge is not W + s·B·A (or DoRA's rescale),
#: or that changes which base the adapter belongs to; any truthy value is refused.
_VARIANTS = {
    "use_qalora": "QA-LoRA merges into a quantised base",
    "alora_invocation_tokens": "aLoRA applies only after its invocation tokens: merged it would "
    "apply everywhere",
    "use_bdlora": "block-diagonal LoRA factors are not stored as plain A and B",
    "velora_config": "VeLoRA is not a plain LoRA",
    "monteclora_config": "MonteCLoRA is not a plain LoRA",
    "arrow_config": "Arrow routes between several adapters per token: there is no single ΔW",
    "kasa_config": "KaSA is not a plain LoRA",
    "layer_replication": "layer_replication changes the base model's layers",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not baked yet",
    "trainable_token_indices": "trainable tokens are stored as sparse deltas, not baked yet",
    "megatron_config": "Megatron-parallel LoRA layers are not plain LoRA",
}
#: init_lora_weights values that move part of the base weights into the adapter at init: the
#: adapter belongs to a modified base, not to the folder it names.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


class LazyTensor:
    """An adapter tensor known by its header entry, read only when it is used (then dropped),
    so even a large adapter (r 64 over every module: ~200 MB) is never held whole."""

    def __init__(self, path: Path, info: TensorInfo, reader: PreadReader) -> None:
        self.path, self.info, self.reader = path, info, reader

    @property
    def shape(self) -> torch.Size:
        """The tensor's shape (from the header)."""
        return torch.Size(self.info.shape)

    def dim(self) -> int:
        """Number of dimensions."""
        return len(self.info.shape)

    def numel(self) -> int:
        """Number of elements."""
        return self.info.numel

    def load(self) -> torch.Tensor:
        """Read the tensor now."""
        return self.reader.get(self.info, self.path)


AdapterTensor = torch.Tensor | LazyTensor


def value(t: AdapterTensor) -> torch.Tensor:
    """The tensor itself (read now for a `LazyTensor`)."""
    return t.load() if isinstance(t, LazyTensor) else t


@dataclass
class ModuleDelta:
    """One LoRA module: what it adds to its base tensor.

    Attributes:
        module: The module path in the base (``model.layers.0.self_attn.q_proj``).
        kind: ``linear`` (nn.Linear), ``embedding`` (nn.Embedding) or ``conv`` (nn.ConvNd).
        a: lora_A (``lora_embedding_A`` for an embedding).
        b: lora_B (``lora_embedding_B``).
        scaling: s = α/r (α/√r with rsLoRA), from the config and its patterns.
        magnitude: DoRA's magnitude vector, or None for plain LoRA.
        fan_in_fan_out: The base stores the weight transposed (GPT-2's Conv1D).
    """

    module: str
    kind: Kind
    a: AdapterTensor
    b: AdapterTensor
    scaling: float
    magnitude: AdapterTensor | None = None
    fan_in_fan_out: bool = False

    def delta_shape(self) -> tuple[int, ...]:
        """The shape of ΔW, which must be the base tensor's."""
        if self.kind == "embedding":
            return (int(self.a.shape[1]), int(self.b.shape[0]))
        if self.kind == "conv":
            return (int(self.b.shape[0]), int(self.a.shape[1]), *map(int, self.a.shape[2:]))
        out, inner = int(self.b.shape[0]), int(self.a.shape[1])
        return (inner, out) if self.fan_in_fan_out else (out, inner)


@dataclass
class BakeAdapter:
    """Every change an adapter makes to base tensors, keyed by the base tensor's name.

    Attributes:
        deltas: Base weight key → the LoRA modules that update it (two when an embedding and a
            tied output head both carry a LoRA).
        biases: Base bias key → (lora_B.bias, scaling), added as s·b.
        replace: Base key → the tensor that replaces it (modules_to_save, trained biases, the
            saved embedding of an embedding LoRA).
        loaded: Keys of ``replace`` PEFT loads into the base parameter itself (an embedding
            LoRA's saved ``base_layer``): a tie to it holds, unlike a modules_to_save copy's.
        config: The adapter's ``adapter_config.json``.
        source: The adapter folder (or what the adapter came from), for messages.
    """

    deltas: dict[str, list[ModuleDelta]] = field(default_factory=dict)
    biases: dict[str, tuple[AdapterTensor, float]] = field(default_factory=dict)
    replace: dict[str, AdapterTensor] = field(default_factory=dict)
    loaded: set[str] = field(default_factory=set)
    config: dict[str, Any] = field(default_factory=dict)
    source: str = "adapter"

    def targets(self) -> set[str]:
        """Every base key the adapter changes."""
        return set(self.deltas) | set(self.biases) | set(self.replace)


def unsupported(raw: Mapping[str, Any]) -> str | None:
    """Why this adapter config cannot be baked exactly, or None when it can."""
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        return f"peft_type {peft_type} is not LoRA: only LoRA adapters are baked (W' = W + s·B·A)"
    for key, why in _VARIANTS.items():
        if raw.get(key):
            return f"{key} is set: {why}"
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        return (
            f"init_lora_weights {init!r} moved part of the base weights into the adapter: it "
            "belongs to a modified base (convert it to a plain LoRA with PEFT's "
            "path_initial_model_for_weight_conversion first)"
        )
    return None


def _kind(a: AdapterTensor, suffix: str) -> Kind:
    if suffix.startswith("lora_embedding"):
        return "embedding"
    return "conv" if a.dim() > 2 else "linear"


def parse_adapter(
    tensors: Mapping[str, AdapterTensor], raw: dict[str, Any], source: str = "adapter"
) -> BakeAdapter:
    """Turn an adapter's tensors and config into the base-tensor updates of `BakeAdapter`.

    Args:
        tensors: The adapter's tensors (or `LazyTensor` entries), keys as PEFT saves them.
        raw: Its ``adapter_config.json``.
        source: Where it came from, for messages.

    Raises:
        PlanError: The adapter is not a plain LoRA (`unsupported`), or a module lacks A or B.
        SourceError: The config's fields have the wrong types.
    """
    problems = config_problems(raw)
    if problems:
        raise SourceError(
            f"adapter_config.json: {problems[0]}",
            where=source,
            fix="restore the adapter_config.json PEFT saved with these weights",
        )
    why = unsupported(raw)
    if why is not None:
        raise PlanError(
            f"cannot bake this adapter: {why}",
            where=source,
            fix="bake a LoRA adapter, or merge this one with PEFT's merge_and_unload",
        )
    cfg = AdapterConfig(raw=raw, path=Path(source) / "adapter_config.json")
    fifo = bool(raw.get("fan_in_fan_out", False))
    parts: dict[str, dict[str, tuple[str, AdapterTensor]]] = {}
    out = BakeAdapter(config=raw, source=source)
    magnitudes: dict[str, AdapterTensor] = {}
    for key, t in tensors.items():
        role = lora_role(key)
        if role is not None:
            module, r, suffix = role
            parts.setdefault(module, {})[r] = (suffix, t)
        elif key.endswith(_MAGNITUDE):
            magnitudes[key.removesuffix(_MAGNITUDE)] = t
        else:
            base_key = key.removeprefix(_PREFIX).replace(".base_layer.", ".")
            out.replace[base_key] = t
            if ".base_layer." in key:
                out.loaded.add(base_key)
    for module, got in parts.items():
        if "A" not in got or "B" not in got:
            missing = "lora_A" if "A" not in got else "lora_B"
            raise PlanError(
                f"LoRA module {module} has no {missing} tensor",
                where=source,
                fix="restore the adapter_model.safetensors PEFT saved",
            )
        suffix, a = got["A"]
        _, b = got["B"]
        path = module.removeprefix(_PREFIX)
        scaling = cfg.scaling(module, int(a.shape[0]))
        kind = _kind(a, suffix)
        mag = magnitudes.pop(module, None)
        if mag is not None and not cfg.use_dora:
            raise PlanError(
                f"module {path} has a DoRA magnitude but use_dora is off",
                where=source,
                fix="restore the adapter_config.json PEFT saved with these weights",
            )
        if cfg.use_dora and mag is None:
            raise PlanError(
                f"use_dora is on but module {path} has no lora_magnitude_vector",
                where=source,
                fix="restore the adapter_model.safetensors PEFT saved",
            )
        delta = ModuleDelta(path, kind, a, b, scaling, mag, fifo and kind == "linear")
        out.deltas.setdefault(f"{path}.weight", []).append(delta)
        if "bias" in got:
            out.biases[f"{path}.bias"] = (got["bias"][1], scaling)
    if magnitudes:
        first = next(iter(magnitudes)).removeprefix(_PREFIX)
        raise PlanError(
            f"DoRA magnitude of {first} without its LoRA factors",
            where=source,
            fix="restore the adapter_model.safetensors PEFT saved",
        )
    return out
