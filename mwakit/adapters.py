"""PEFT LoRA adapters as stored on disk: config, per-module scaling, tensor key roles.

Facts (see shared/reference/formats.md §1): ΔW = s·B·A with s = α/r (rsLoRA: α/√r);
``rank_pattern``/``alpha_pattern`` keys are regexes matched against the module path inside the
base model with ``re.match(rf"(.*\\.)?({key})$", path)``, first match in dict order. On disk,
keys carry no adapter name; embedding LoRA and DoRA magnitude keys have no ``.weight``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mwakit.errors import SourceError

_PREFIX = "base_model.model."

Role = Literal["A", "B", "bias"]
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias"
    r"|lora_embedding_A|lora_embedding_B)$"
)
_ROLE: dict[str, Role] = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_B.bias": "bias",
    "lora_embedding_A": "A",
    "lora_embedding_B": "B",
}


def lora_role(key: str) -> tuple[str, Role, str] | None:
    """Split a LoRA factor key into (module, role, suffix), or None for a full tensor.

    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` →
    (``base_model.model.model.layers.0.self_attn.q_proj``, "A", ``lora_A.weight``).
    """
    m = _LORA_KEY.match(key)
    if m is None:
        return None
    return m.group("module"), _ROLE[m.group("part")], m.group("part")


def module_path(module: str) -> str:
    """The module path PEFT matches patterns against (no ``base_model.model.`` prefix)."""
    return module.removeprefix(_PREFIX)


def _pattern_value(patterns: dict[str, Any], path: str) -> Any | None:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return None


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of ``adapter_config.json`` that decide how an adapter's tensors combine."""

    raw: dict[str, Any]
    path: Path

    @property
    def peft_type(self) -> str:
        """``LORA``, ``ADALORA``, ``IA3``, … (only LORA is linear in its factors)."""
        return str(self.raw.get("peft_type", "")).upper()

    @property
    def use_rslora(self) -> bool:
        """rsLoRA scales by α/√r instead of α/r."""
        return bool(self.raw.get("use_rslora", False))

    @property
    def use_dora(self) -> bool:
        """DoRA adds per-output magnitude vectors that depend on the base weights."""
        return bool(self.raw.get("use_dora", False))

    @property
    def base_model(self) -> str | None:
        """``base_model_name_or_path``."""
        v = self.raw.get("base_model_name_or_path")
        return str(v) if v else None

    def rank(self, module: str) -> int:
        """The configured rank of a module (``rank_pattern`` over ``r``)."""
        v = _pattern_value(self.raw.get("rank_pattern") or {}, module_path(module))
        return int(v if v is not None else self.raw.get("r", 8))

    def alpha(self, module: str) -> float:
        """The configured alpha of a module (``alpha_pattern`` over ``lora_alpha``)."""
        v = _pattern_value(self.raw.get("alpha_pattern") or {}, module_path(module))
        return float(v if v is not None else self.raw.get("lora_alpha", 8))

    def scaling(self, module: str, rank: int | None = None) -> float:
        """s = α/r, or α/√r with rsLoRA, for a module."""
        r = rank if rank is not None else self.rank(module)
        a = self.alpha(module)
        return a / math.sqrt(r) if self.use_rslora else a / r


_RESTORE = "restore the adapter_config.json PEFT saved with these weights"


def _show(v: Any) -> str:
    """A JSON value for a message, cut to a readable length."""
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(v: Any) -> bool:
    # JSON true/false are bools, a subclass of int: never a rank or an alpha.
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _rank_problem(v: Any) -> str | None:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
        return None
    return f"must be a whole number ≥ 1 (a LoRA rank), got {_show(v)}"


def _alpha_problem(v: Any) -> str | None:
    # α = 0 would make the scaling s = α/r zero: the adapter would change nothing, and factor
    # averaging cannot fold s_i/s_out.
    if _is_number(v) and v > 0:
        return None
    return f"must be a number > 0 (LoRA's alpha), got {_show(v)}"


def _pattern_problems(key: str, v: Any, check: Any) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, dict):
        return [f"{key} must be an object of regex → value, got {_show(v)}"]
    out = []
    for pattern, value in v.items():
        try:
            re.compile(rf"(.*\.)?({pattern})$")
        except re.error as err:
            out.append(f"{key} key {pattern!r} is not a valid regular expression ({err})")
        if (why := check(value)) is not None:
            out.append(f"{key}[{pattern!r}] {why}")
    return out


def _optional(kind: type | tuple[type, ...], what: str) -> Any:
    def check(v: Any) -> str | None:
        return None if v is None or isinstance(v, kind) else f"must be {what}, got {_show(v)}"

    return check


def _string_list(v: Any) -> str | None:
    if v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)):
        return None
    return f"must be a list of module names, got {_show(v)}"


def _targets(v: Any) -> str | None:
    return None if isinstance(v, str) else _string_list(v)


_FIELDS: dict[str, Any] = {
    "peft_type": _optional(str, "a string such as LORA"),
    "r": _rank_problem,
    "lora_alpha": _alpha_problem,
    "use_rslora": _optional(bool, "true or false"),
    "use_dora": _optional(bool, "true or false"),
    "fan_in_fan_out": _optional(bool, "true or false"),
    "base_model_name_or_path": _optional(str, "a model name or path"),
    "target_modules": _targets,
    "modules_to_save": _string_list,
    "task_type": _optional(str, "a task name such as CAUSAL_LM"),
}


def config_problems(raw: dict[str, Any]) -> list[str]:
    """What is wrong with the fields of an ``adapter_config.json`` that the merge reads.

    PEFT writes these with fixed types (``r`` an int ≥ 1, ``lora_alpha`` a number, patterns
    objects of regex → value, flags booleans); anything else comes from a hand edit or another
    tool, and would make the merge compute the wrong scaling or fail half-way.

    Returns:
        One message per problem (empty when the config is fine). Absent keys take PEFT's
        defaults and are not problems.
    """
    out = []
    for key, check in _FIELDS.items():
        if key in raw and (why := check(raw[key])) is not None:
            out.append(f"{key} {why}")
    out += _pattern_problems("rank_pattern", raw.get("rank_pattern"), _rank_problem)
    out += _pattern_problems("alpha_pattern", raw.get("alpha_pattern"), _alpha_problem)
    return out


def read_adapter_config(folder: Path) -> AdapterConfig:
    """Read and check ``adapter_config.json`` from a folder.

    Raises:
        SourceError: Missing or unreadable, not JSON, not an object, or a field the merge
            reads has the wrong type or value (`config_problems`).
    """
    path = folder / "adapter_config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise SourceError(
            f"cannot read adapter_config.json: {err.strerror or err}",
            where=str(path),
            fix="check that the file exists and is readable (permissions)",
        ) from err
    except json.JSONDecodeError as err:
        raise SourceError(
            f"adapter_config.json is not valid JSON ({err.msg}, line {err.lineno})",
            where=str(path),
            fix=_RESTORE,
        ) from err
    except (ValueError, RecursionError) as err:  # not UTF-8, a 5000-digit number, deep nesting
        raise SourceError(
            f"adapter_config.json is not valid JSON ({type(err).__name__}: {err})"[:200],
            where=str(path),
            fix=_RESTORE,
        ) from err
    if not isinstance(raw, dict):
        raise SourceError("adapter_config.json is not a JSON object", where=str(path), fix=_RESTORE)
    problems = config_problems(raw)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise SourceError(
            f"adapter_config.json: {problems[0]}{more}", where=str(path), fix=_RESTORE
        )
    return AdapterConfig(raw=raw, path=path)


def output_config(
    first: AdapterConfig,
    *,
    module_ranks: dict[str, int] | None,
    target_modules: Any,
) -> dict[str, Any]:
    """The merged adapter's ``adapter_config.json``.

    Args:
        first: The first checkpoint's config; everything not rewritten is inherited from it.
        module_ranks: None to keep the first config's r/alpha/patterns (factor space, where the
            merged B is expressed in the first checkpoint's scaling); else each module's output
            rank, written with scaling 1 (α = r per module, rsLoRA off) because the merged
            factors already carry every s_i.
        target_modules: The union of the inputs' target modules.
    """
    cfg = dict(first.raw)
    cfg["inference_mode"] = True
    cfg["target_modules"] = target_modules
    if module_ranks:  # None (factor space) or no LoRA module at all: keep the first's r/alpha
        counts: dict[int, int] = {}
        for r in module_ranks.values():
            counts[r] = counts.get(r, 0) + 1
        # The most common rank becomes `r`; others go to rank_pattern with an equal alpha,
        # so every module has scaling α/r = 1 exactly.
        common = max(counts, key=lambda r: (counts[r], r))
        pattern = {
            re.escape(module_path(m)): r for m, r in sorted(module_ranks.items()) if r != common
        }
        cfg.update(
            r=common,
            lora_alpha=common,
            use_rslora=False,
            rank_pattern=pattern,
            alpha_pattern=dict(pattern),
        )
    return cfg


def full_rank(a_shape: Sequence[int], b_shape: Sequence[int]) -> int:
    """The rank `mwakit.lowrank.full_factors` writes for a module with factors of these shapes.

    min(out, in) for a linear or embedding module; out for a conv, whose kernel must stay in A
    (PEFT's conv lora_B is 1×1).
    """
    out, inner = int(b_shape[0]), int(a_shape[1])
    return out if len(a_shape) > 2 else min(out, inner)
