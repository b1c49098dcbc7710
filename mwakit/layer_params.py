"""Per-layer parameters: a number, or a list of numbers interpolated over layer depth.

mergekit calls such a list a "gradient": ``t: [0, 0.5, 1]`` gives layer ``i`` of ``n`` the value
at depth t = i/(n − 1) on the piecewise-linear curve through the list's elements, spaced
evenly over [0, 1] (a list of n elements gives layer i exactly its i-th element; one element
is a constant). Any float parameter of a method can be a list, and so can MWA's ``penalty``
(method or ``weighting:``) and a checkpoint's ``weight``; ``rules:`` still pick the tensors
(first match wins) and a rule's lists are interpolated the same way.

The layer of a tensor comes from its name (``layers.<i>.``, ``h.<i>.``, ``blocks.<i>.``,
``layer.<i>.``, ``block.<i>.``); the number of layers from config.json when there is one,
else from the largest index + 1. Tensors outside the layer stack — embeddings, the final
norm, lm_head — take the value at t = 0, as in mergekit, so a converted mergekit recipe merges
them the same way (a rule can give them their own value).

Torch-free: the recipe validates lists with it, and `mwakit validate` must stay fast.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from mwakit.errors import Problem

LAYER_NAME = re.compile(r"(?:^|\.)(layers|h|blocks|layer|block)\.(\d+)(?=\.|$)")
"""``<stack>.<index>`` in a tensor or module name; the first occurrence is the layer."""

#: config.json keys that hold the number of layers, in the order they are tried.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
#: Sub-configs where multimodal models keep their language model's settings.
_SUB_CONFIGS = ("text_config", "llm_config", "language_config")


def layer_of(name: str) -> tuple[str, int] | None:
    """(stack prefix, layer index) of a tensor name, or None outside any layer stack.

    >>> layer_of("model.layers.12.mlp.up_proj.weight")
    ('model.layers', 12)
    """
    m = LAYER_NAME.search(name)
    if m is None:
        return None
    return name[: m.end(1)], int(m.group(2))


def depth(layer: int | None, n_layers: int) -> float:
    """t = layer/(n − 1) in [0, 1]; 0 outside the stack (None) or for a one-layer model."""
    if layer is None or n_layers <= 1:
        return 0.0
    return min(1.0, max(0.0, layer / (n_layers - 1)))


def interpolate(values: Sequence[float], t: float) -> float:
    """The value at depth t on the piecewise-linear curve through evenly spaced ``values``."""
    if len(values) == 1:
        return float(values[0])
    pos = t * (len(values) - 1)
    i = min(math.floor(pos), len(values) - 2)
    frac = pos - i
    lo, hi = float(values[i]), float(values[i + 1])
    # Exact at the knots (frac 0 or 1), so a list of n values gives layer i its own value.
    return lo if frac == 0.0 else hi if frac == 1.0 else lo + frac * (hi - lo)


def is_list(v: Any) -> bool:
    """A per-layer list (YAML sequence)."""
    return isinstance(v, list | tuple)


def lists_in(data: Mapping[str, Any] | None) -> dict[str, list[Any]]:
    """The list-valued entries of a params mapping."""
    return {k: list(v) for k, v in (data or {}).items() if is_list(v)}


def at(data: Mapping[str, Any], t: float) -> dict[str, Any]:
    """``data`` with every (valid) per-layer list replaced by its value at depth t."""
    return {k: interpolate(v, t) if is_list(v) and _numbers(v) else v for k, v in data.items()}


def resolve(cls: type[BaseModel], data: Mapping[str, Any], t: float) -> BaseModel:
    """The params at depth t: lists interpolated, then validated by ``cls``."""
    return cls.model_validate(at(data, t))


def _numbers(v: Sequence[Any]) -> bool:
    return bool(v) and all(
        isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v
    )


def _field_keys(cls: type[BaseModel]) -> dict[str, str]:
    """Data key (alias or name) → field name, for every field."""
    out = {}
    for name, f in cls.model_fields.items():
        out[name] = name
        if f.alias:
            out[f.alias] = name
    return out


def _float_field(cls: type[BaseModel], name: str) -> bool:
    ann = cls.model_fields[name].annotation
    return ann is float or ann == (float | None)


def per_layer_keys(cls: type[BaseModel]) -> set[str]:
    """The data keys (aliases) of ``cls`` that accept a per-layer list."""
    return {f.alias or name for name, f in cls.model_fields.items() if _float_field(cls, name)}


def knots(lists: Iterable[Sequence[Any]]) -> list[float]:
    """Every depth where some list has an element: j/(L − 1) (0 for one element)."""
    ts = {0.0}
    for v in lists:
        if len(v) > 1:
            ts.update(j / (len(v) - 1) for j in range(len(v)))
    return sorted(ts)


def _knot_index(v: Sequence[Any], t: float) -> int | None:
    n = len(v)
    if n == 1:
        return 0
    j = round(t * (n - 1))
    return j if math.isclose(j / (n - 1), t, abs_tol=1e-12) else None


#: Turns a ValidationError into located problems (the recipe's, with its fixes).
Convert = Callable[[ValidationError, tuple[int | str, ...]], list[Problem]]


def _plain(err: ValidationError, prefix: tuple[int | str, ...]) -> list[Problem]:
    out = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; `mwakit methods` lists method params)"
        out.append(Problem(_loc((*prefix, *e["loc"])), msg))
    return out


def check(
    cls: type[BaseModel],
    data: Mapping[str, Any],
    prefix: tuple[int | str, ...] = (),
    convert: Convert = _plain,
) -> list[Problem]:
    """Every problem of ``data`` as params of ``cls``, per-layer lists included.

    A list is validated element by element by the field's own constraints (so
    ``density: [0.2, 1.5]`` reports ``params.density.1``); constraints across fields
    (e.g. density ± epsilon within [0, 1]) are checked at every depth where a list has an
    element — the values are piecewise linear, so a linear constraint that holds at those
    depths holds at every layer.

    Args:
        cls: The params model.
        data: The params as written (lists allowed).
        prefix: Location prefix of the problems, e.g. ``("params",)``.
        convert: Turns the model's ValidationError into problems (messages and fixes).
    """
    fields = _field_keys(cls)
    lists = lists_in(data)
    problems: list[Problem] = []
    bad: set[str] = set()
    fix = "write a number, or a list of numbers for the layers (first to last)"
    for key, v in lists.items():
        loc = _loc((*prefix, key))
        name = fields.get(key)
        if name is None:
            bad.add(key)  # unknown: reported by the model itself, as the key it is
            continue
        if not _float_field(cls, name):
            problems.append(
                Problem(
                    loc,
                    "takes one value, not a per-layer list (only float parameters vary)",
                    "write one value",
                )
            )
            bad.add(key)
        elif not v:
            problems.append(Problem(loc, "a per-layer list needs at least one number", fix))
            bad.add(key)
        else:
            for j, x in enumerate(v):
                if not _numbers([x]):
                    problems.append(Problem(_loc((*prefix, key, j)), "not a finite number", fix))
                    bad.add(key)
    good = {k: v for k, v in lists.items() if k not in bad}
    seen = {(p.loc, p.msg) for p in problems}
    # Lists already reported stand in as their first element so other keys still validate.
    base = {
        k: (v[0] if k in bad and k in fields and v else v)
        for k, v in data.items()
        if k not in bad or v or k not in fields
    }
    for t in knots(good.values()):
        values = {k: (interpolate(v, t) if k in good else v) for k, v in base.items()}
        try:
            cls.model_validate(values)
        except ValidationError as err:
            for p in convert(err, ()):
                parts = p.loc.split(".") if p.loc else []
                head, msg = (parts[0] if parts else ""), p.msg
                if head in good:
                    at_j = _knot_index(good[head], t)
                    if at_j is None:
                        continue  # between two elements: their own checks report it
                    loc = _loc((*prefix, head, at_j, *parts[1:]))
                elif not parts and good:
                    loc, msg = _loc(prefix), f"{msg} (at layer depth t = {t:g})"
                else:
                    loc = _loc((*prefix, *parts))
                if (loc, msg) not in seen:
                    seen.add((loc, msg))
                    problems.append(Problem(loc, msg, p.fix))
    if good and data.get("trim_scope") == "model" and "density" in good:
        problems.append(
            Problem(
                _loc((*prefix, "density")),
                "trim_scope: model takes one density for the whole model, not a per-layer list",
                "give one density, or use trim_scope: tensor",
            )
        )
    return problems


def _loc(parts: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in parts)


def layer_count(config_file: Path | None, names: Iterable[str]) -> tuple[int, str]:
    """(number of layers, where it came from): config.json, else the tensor names.

    Args:
        config_file: A model's config.json, if there is one.
        names: Tensor or module names of the model (for the fallback: largest index + 1 of
            the main stack).
    """
    if config_file is not None and config_file.is_file():
        try:
            cfg = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cfg = None
        for c in [cfg] + [cfg.get(k) for k in _SUB_CONFIGS] if isinstance(cfg, dict) else []:
            if not isinstance(c, dict):
                continue
            for k in LAYER_COUNT_KEYS:
                v = c.get(k)
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    return v, f"{config_file.name} {k}"
    stack = main_stack(names)
    if stack is None:
        return 1, "no layer stack in the tensor names"
    return stack[1] + 1, f"largest {stack[0]}.<i> index + 1"


def main_stack(names: Iterable[str]) -> tuple[str, int] | None:
    """(prefix, largest index) of the stack with the most layers among ``names``, or None."""
    found: dict[str, int] = {}
    for n in names:
        hit = layer_of(n)
        if hit is not None:
            found[hit[0]] = max(found.get(hit[0], -1), hit[1])
    if not found:
        return None
    prefix = max(found, key=lambda p: found[p])
    return prefix, found[prefix]
