"""`mwakit convert`: turn a mergekit YAML config into an equivalent mwakit recipe.

Translated: ``models:`` (and a single ``slices:`` entry whose sources share one layer range)
into ``checkpoints:``; passthrough ``slices:`` into mwakit slices; ``merge_method`` and its
``parameters`` — scalars, gradients (per-layer lists, the same interpolation) and
``{filter, value}`` conditionals (into ``rules:``, the substring filter becoming the glob
``*filter*``); per-model ``weight`` (into the checkpoint's ``weight``, lists too);
``base_model``; ``dtype``/``out_dtype``; ``tokenizer_source: base``. Hub ids become
``hf://org/name[@revision]``. Where mwakit's parameters are defined differently the values are
translated so the merge is the same: mergekit's TIES default density 1.0 is written out,
DARE's density becomes ``drop_rate = 1 − density``, breadcrumbs' kept fraction d becomes
mwakit's band start d + gamma, nuslerp's ``nuslerp_*`` options lose the prefix, and the
primary model of slerp/nearswap (mergekit's ``base_model``) is the first checkpoint.

Everything else is reported, one line each, as something it cannot translate (LoRA
``model+adapter`` references, ``modules:``, multi-source slices, ``tokenizer_source: union``,
``chat_template``, per-model parameters other than ``weight`` that differ between models,
methods mwakit lacks). Pure data in, data out: no file is read but the YAML itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mwakit.errors import ConvertError, RecipeError

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float64": "float64",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[^/\s]+)?$")

#: mergekit method → mwakit method (same name unless listed here).
_METHODS = {
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "sce",
    "slerp",
    "nuslerp",
    "multislerp",
    "karcher",
    "model_stock",
    "nearswap",
    "passthrough",
}
#: Methods whose mergekit ``base_model`` is the first of the two checkpoints (the t = 0 end).
_PRIMARY_BASE = {"slerp", "nearswap"}
#: Methods that take a base in mwakit (required or optional).
_TAKES_BASE = {
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "sce",
    "model_stock",
    "nuslerp",
    "multislerp",
}
_CONSENSUS = {"ties", "dare_ties", "breadcrumbs_ties", "della", "sce"}
#: Global parameters each method understands (mergekit names), beyond per-model ``weight``.
_KNOWN = {
    "linear": {"normalize"},
    "task_arithmetic": {"lambda", "normalize"},
    "ties": {"density", "lambda", "normalize", "int8_mask"},
    "dare_ties": {"density", "lambda", "normalize", "rescale", "int8_mask"},
    "dare_linear": {"density", "lambda", "normalize", "rescale", "int8_mask"},
    "breadcrumbs": {"density", "gamma", "lambda", "normalize", "int8_mask"},
    "breadcrumbs_ties": {"density", "gamma", "lambda", "normalize", "int8_mask"},
    "della": {"density", "epsilon", "lambda", "normalize", "rescale", "int8_mask"},
    "della_linear": {"density", "epsilon", "lambda", "normalize", "rescale", "int8_mask"},
    "sce": {"select_topk", "lambda", "normalize", "int8_mask"},
    "slerp": {"t"},
    "nuslerp": {"nuslerp_flatten", "nuslerp_row_wise"},
    "multislerp": {"normalize_weights", "eps"},
    "karcher": {"max_iter", "tol"},
    "model_stock": {"filter_wise"},
    "nearswap": {"t"},
    "passthrough": {"scale"},
}
#: Options that change only how mergekit computes, not what: dropped silently.
_HARMLESS = {"int8_mask"}


@dataclass
class Conversion:
    """A converted recipe and what could not be translated.

    Attributes:
        recipe: The mwakit recipe as plain data (validated).
        untranslated: One line per part of the mergekit config that has no equivalent.
        notes: One line per translation that changes how a value is written.
    """

    recipe: dict[str, Any]
    untranslated: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_yaml(self, source: str | None = None) -> str:
        """The recipe as YAML, with a header saying where it came from."""
        head = (
            f"# Converted from the mergekit config {source} by `mwakit convert`.\n"
            if source
            else ""
        )
        lines = "".join(f"# not translated: {u}\n" for u in self.untranslated)
        body = yaml.safe_dump(
            self.recipe, sort_keys=False, allow_unicode=True, default_flow_style=None
        )
        return head + lines + body


def _ref(model: Any, out: Conversion, where: str) -> str | None:
    """A mergekit model reference as an mwakit path or ``hf://`` reference."""
    if isinstance(model, dict):  # {model: {path, revision}, lora: ...} or {path, revision}
        inner = model.get("model", model)
        if isinstance(inner, dict):
            if model.get("lora") or inner.get("lora"):
                out.untranslated.append(
                    f"{where}: a model+LoRA reference (merge the adapters "
                    "with mwakit directly, in delta space)"
                )
                return None
            path, rev = inner.get("path"), inner.get("revision")
            model = f"{path}@{rev}" if path and rev else path
        else:
            model = inner
    if not isinstance(model, str) or not model:
        out.untranslated.append(f"{where}: model reference {model!r} is not a path or repo id")
        return None
    if "+" in model:
        out.untranslated.append(
            f"{where}: {model!r} bakes a LoRA into its base (mwakit merges adapters directly: "
            "list the adapter folders as checkpoints)"
        )
        return None
    if _HUB_ID.match(model) and not Path(model.split("@")[0]).exists():
        return f"hf://{model}"
    return model


@dataclass
class _Setting:
    """One mergekit parameter: a default value and ordered (filter, value) conditionals."""

    default: Any = None
    has_default: bool = False
    conditions: list[tuple[str, Any]] = field(default_factory=list)


def _setting(value: Any) -> _Setting:
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        s = _Setting()
        for cond in value:
            f, v = cond.get("filter"), cond.get("value")
            if f in (None, "*"):
                if not s.has_default:
                    s.default, s.has_default = v, True
            else:
                s.conditions.append((str(f), v))
        return s
    return _Setting(value, True)


def convert(doc: Any, *, name: str = "merged") -> Conversion:
    """Translate a parsed mergekit config into an mwakit recipe.

    Args:
        doc: The parsed YAML document.
        name: Used for ``name`` and ``output.path`` (``out/<name>``) when the config has none.

    Raises:
        ConvertError: Nothing usable: not a mapping, no models, or a method mwakit lacks.
    """
    if not isinstance(doc, dict):
        raise ConvertError("a mergekit config is a YAML mapping", fix="pass a mergekit YAML")
    out = Conversion({})
    method = doc.get("merge_method")
    if method not in _METHODS:
        raise ConvertError(
            f"merge_method {method!r} has no mwakit counterpart",
            where="merge_method",
            fix=f"mwakit converts {', '.join(sorted(_METHODS))}",
        )
    for key in sorted(
        set(doc)
        - {
            "merge_method",
            "models",
            "slices",
            "base_model",
            "parameters",
            "dtype",
            "out_dtype",
            "tokenizer_source",
            "tokenizer",
            "name",
            "chat_template",
            "modules",
        }
    ):
        out.untranslated.append(f"{key}: not a mergekit option mwakit knows")
    if doc.get("modules"):
        out.untranslated.append("modules: named sub-networks (each would be its own recipe)")

    base = _ref(doc["base_model"], out, "base_model") if doc.get("base_model") else None
    models, slices = _inputs(doc, method, out)
    # The base of a task-vector method is often listed among the models, without parameters.
    per_model = [p for m, p in models if not (m == base and method in _TAKES_BASE)]
    if not models and not slices:
        raise ConvertError(
            "no model could be translated", where="models", fix="see the lines above"
        )

    recipe: dict[str, Any] = {"name": str(doc.get("name") or name), "method": method}
    params = _global_params(doc.get("parameters") or {}, per_model, method, out, recipe)
    checkpoints: list[dict[str, Any]] = []
    paths: list[str] = []
    top_weight = (doc.get("parameters") or {}).get("weight")  # mergekit: every model's default
    for path, p in models:
        if path in paths:
            continue
        paths.append(path)
        ck: dict[str, Any] = {"path": path}
        w = p.get("weight", top_weight)
        if w is not None:
            s = _setting(w)
            if s.conditions:
                out.untranslated.append(
                    f"models.{path}.weight: filtered weights (mwakit weights are per checkpoint; "
                    "rules set method parameters)"
                )
            if s.has_default:
                ck["weight"] = s.default
        checkpoints.append(ck)

    if method in _PRIMARY_BASE:
        if base is None:
            out.untranslated.append(f"{method}: no base_model (mergekit's t = 0 end)")
        else:
            others = [c for c in checkpoints if c["path"] != base]
            checkpoints = [{"path": base}, *others]
            for c in checkpoints[1:]:
                c.pop("weight", None)
    elif method == "passthrough" and slices is not None:
        if any(isinstance(v, list) for v in params.values()) or "rules" in recipe:
            out.notes.append(
                "passthrough slices: per-layer lists run over the whole output stack in mwakit "
                "(mergekit interpolates them within each slice)"
            )
        if base is not None:
            if base not in [c["path"] for c in checkpoints]:
                checkpoints.append({"path": base})
            params["rest_from"] = [c["path"] for c in checkpoints].index(base)
        recipe["slices"] = [
            {"checkpoint": [c["path"] for c in checkpoints].index(p), "layers": list(r)}
            for p, r in slices
        ]
    elif base is not None:
        if method in _TAKES_BASE:
            recipe["base_model"] = base
            checkpoints = [c for c in checkpoints if c["path"] != base] or checkpoints
        else:
            out.notes.append(
                f"base_model {base} is not used by {method} (as in mergekit; the models listed "
                "are the inputs)"
            )
    elif method in _TAKES_BASE - {"nuslerp", "multislerp"}:
        out.untranslated.append(f"{method}: no base_model (its task vectors need one)")

    recipe["params"] = params
    recipe["checkpoints"] = checkpoints
    if recipe.get("slices") is not None:
        recipe["slices"] = recipe.pop("slices")  # after checkpoints, which it indexes
    _dtypes(doc, out, recipe)
    _tokenizer(doc, out, base, checkpoints)
    recipe["output"] = {"path": f"out/{recipe['name']}"}
    if not params:
        recipe.pop("params")
    out.recipe = _ordered(recipe)
    _validate(out)
    return out


def _ordered(recipe: dict[str, Any]) -> dict[str, Any]:
    order = ["name", "method", "params", "rules", "checkpoints", "slices", "base_model",
             "dtype", "out_dtype", "output"]  # fmt: skip
    return {k: recipe[k] for k in order if k in recipe}


def _inputs(
    doc: dict[str, Any], method: str, out: Conversion
) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, Any]] | None]:
    """(models with their per-model parameters, passthrough slices as (path, layer range) or
    None)."""
    models: list[tuple[str, dict[str, Any]]] = []
    slices_out: list[tuple[str, Any]] | None = None
    raw_models = doc.get("models")
    raw_slices = doc.get("slices")
    if raw_models and raw_slices:
        out.untranslated.append("models and slices are both given (mergekit allows one)")
    if raw_models:
        for i, m in enumerate(raw_models if isinstance(raw_models, list) else []):
            entry = m if isinstance(m, dict) else {"model": m}
            path = _ref(entry.get("model"), out, f"models.{i}")
            if path is not None:
                models.append((path, dict(entry.get("parameters") or {})))
    elif isinstance(raw_slices, list) and raw_slices:
        sources = [s.get("sources") if isinstance(s, dict) else None for s in raw_slices]
        if method == "passthrough":
            slices_out = []
            for k, src in enumerate(sources):
                if not isinstance(src, list) or len(src) != 1:
                    out.untranslated.append(f"slices.{k}: passthrough takes one source per slice")
                    continue
                path = _ref(src[0].get("model"), out, f"slices.{k}.sources.0")
                rng = src[0].get("layer_range")
                if path is None or not (isinstance(rng, list) and len(rng) == 2):
                    if path is not None:
                        out.untranslated.append(f"slices.{k}: no layer_range [start, end]")
                    continue
                models.append((path, dict(src[0].get("parameters") or {})))
                slices_out.append((path, rng))
        elif len(raw_slices) == 1 and isinstance(sources[0], list):
            ranges = {tuple(s.get("layer_range") or ()) for s in sources[0]}
            if len(ranges) != 1:
                out.untranslated.append(
                    "slices.0: sources with different layer ranges (mwakit merges whole models)"
                )
            else:
                out.notes.append(
                    f"slices.0: layer_range {list(next(iter(ranges)))} is taken to cover the "
                    "whole model (the merge uses every layer)"
                )
            for i, src in enumerate(sources[0]):
                path = _ref(src.get("model"), out, f"slices.0.sources.{i}")
                if path is not None:
                    models.append((path, dict(src.get("parameters") or {})))
        else:
            out.untranslated.append(
                f"slices: {len(raw_slices)} slices merged with {method} (mwakit stacks slices "
                "with passthrough only; merge whole models, with per-layer parameters)"
            )
    return models, slices_out


def _global_params(
    top: dict[str, Any],
    per_model: list[dict[str, Any]],
    method: str,
    out: Conversion,
    recipe: dict[str, Any],
) -> dict[str, Any]:
    """The method's params (and ``rules:``) from top-level and shared per-model parameters."""
    settings: dict[str, _Setting] = {}
    for key, value in top.items():
        settings[key] = _setting(value)
    # Per-model parameters other than weight: global when every model agrees.
    keys = {k for p in per_model for k in p} - {"weight"}
    for key in sorted(keys):
        values = [p.get(key) for p in per_model if key in p]
        if all(v == values[0] for v in values):
            settings.setdefault(key, _setting(values[0]))
            if len(values) < len(per_model):
                out.notes.append(f"per-model {key} given for some models only: used for all")
        else:
            out.untranslated.append(
                f"per-model {key} differs between models ({values}); mwakit takes one {key} "
                f"per tensor (used the first model's, {values[0]!r})"
            )
            settings.setdefault(key, _setting(values[0]))
    known = _KNOWN[method]
    for key in sorted(set(settings) - known - {"weight"}):
        if key not in _HARMLESS:
            out.untranslated.append(f"parameters.{key}: {method} has no such parameter")
        settings.pop(key)
    settings.pop("weight", None)

    def translate(values: dict[str, Any]) -> dict[str, Any]:
        return _translate(method, values, out)

    defaults = {k: s.default for k, s in settings.items() if s.has_default}
    params = translate(defaults)
    filters: list[str] = []
    for s in settings.values():
        for f, _ in s.conditions:
            if f not in filters:
                filters.append(f)
    rules = []
    overlaps = [f for f in filters if any(f != g and f in g for g in filters)]
    if overlaps:
        out.notes.append(
            f"filters {overlaps} are substrings of other filters: the rules keep mergekit's "
            "order per parameter only where a tensor matches one filter"
        )
    for f in filters:
        at_f: dict[str, Any] = dict(defaults)
        for key, s in settings.items():
            hit = next((v for g, v in s.conditions if g == f), None)
            if hit is not None:
                at_f[key] = hit
        rule_params = translate(at_f)
        changed = {k: v for k, v in rule_params.items() if params.get(k) != v}
        rules.append({"match": f"*{f}*", "params": changed})
    if rules:
        recipe["rules"] = rules
    return params


def _translate(method: str, v: dict[str, Any], out: Conversion) -> dict[str, Any]:
    """mergekit parameter values → mwakit params of the same merge."""
    p: dict[str, Any] = {}

    def copy(*keys: str) -> None:
        for k in keys:
            if k in v:
                p[k] = v[k]

    if method in _CONSENSUS and v.get("normalize") is False:
        _once(
            out,
            f"{method}: normalize: false (a sum of the agreeing task vectors; mwakit "
            "always takes their weighted mean)",
        )
    if method.startswith(("dare", "della")) and v.get("rescale") is False:
        _once(out, f"{method}: rescale: false (mwakit always rescales kept values by 1/p)")
    elif method.startswith("dare"):
        note = (
            f"{method}: kept values are rescaled by 1/(1 − p) (the paper); mergekit's rescale "
            "restores each tensor's L1 norm"
        )
        if note not in out.notes:
            out.notes.append(note)
    if method in ("linear", "task_arithmetic", "dare_linear", "breadcrumbs", "della_linear"):
        copy("normalize")
    copy("lambda")
    if method == "ties":
        p["density"] = v.get("density", 1.0)  # mergekit's default: no trim (mwakit's is 0.2)
    elif method.startswith("dare"):
        p["drop_rate"] = _map(v.get("density", 1.0), lambda d: round(1.0 - min(d, 1.0), 12))
    elif method.startswith("breadcrumbs"):
        d, g = v.get("density", 1.0), v.get("gamma", 0.01)
        if _scalar(d) and _scalar(g):
            if d >= 1.0:
                p["density"], p["gamma"] = 1.0, 0.0  # mergekit keeps everything at density 1
            else:
                p["density"], p["gamma"] = round(min(1.0, d + g), 12), g
        else:
            # Lists: the band start d + gamma element by element (same length, or a scalar).
            p["density"] = _add(d, g, out)
            p["gamma"] = g
    elif method.startswith("della"):
        d = v.get("density", 1.0)
        if _scalar(d) and d >= 1.0:
            p["density"], p["epsilon"] = 1.0, 0.0  # mergekit skips the drop at density 1
        else:
            p["density"] = d
            p["epsilon"] = v.get("epsilon", 0.15)
    elif method == "sce":
        copy("select_topk")
    elif method in ("slerp", "nearswap"):
        copy("t")
    elif method == "nuslerp":
        if "nuslerp_flatten" in v:
            p["flatten"] = v["nuslerp_flatten"]
        if "nuslerp_row_wise" in v:
            p["row_wise"] = v["nuslerp_row_wise"]
    else:
        copy("normalize_weights", "eps", "max_iter", "tol", "filter_wise", "scale")
    return p


def _scalar(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _map(x: Any, f: Any) -> Any:
    return [f(e) for e in x] if isinstance(x, list) else f(x)


def _add(d: Any, g: Any, out: Conversion) -> Any:
    if isinstance(d, list) and isinstance(g, list):
        if len(d) != len(g):
            _once(out, "breadcrumbs: density and gamma lists of different lengths (used density)")
            return d
        return [min(1.0, a + b) for a, b in zip(d, g, strict=True)]
    if isinstance(d, list):
        return [min(1.0, a + g) for a in d]
    return [min(1.0, d + b) for b in g]


def _once(out: Conversion, line: str) -> None:
    if line not in out.untranslated:
        out.untranslated.append(line)


def _dtypes(doc: dict[str, Any], out: Conversion, recipe: dict[str, Any]) -> None:
    dt, odt = doc.get("dtype"), doc.get("out_dtype")
    for key, v in (("dtype", dt), ("out_dtype", odt)):
        if v is not None and str(v) not in _DTYPES:
            out.untranslated.append(f"{key}: {v!r} is not a float dtype mwakit writes")
    compute = _DTYPES.get(str(dt)) if dt is not None else None
    written = _DTYPES.get(str(odt)) if odt is not None else compute
    if compute == "float64":
        recipe["dtype"] = "float64"
    elif compute in ("float16", "bfloat16"):
        out.notes.append(f"dtype: {dt} is computed in float32 and written as {written}")
    if written is not None:
        recipe["out_dtype"] = written


def _tokenizer(
    doc: dict[str, Any], out: Conversion, base: str | None, checkpoints: list[dict[str, Any]]
) -> None:
    tok = doc.get("tokenizer")
    src = doc.get("tokenizer_source")
    if isinstance(tok, dict):
        src = tok.get("source", src)
        if tok.get("tokens") or tok.get("pad_to_multiple_of"):
            out.untranslated.append("tokenizer.tokens / pad_to_multiple_of (no tokenizer surgery)")
    if doc.get("chat_template"):
        out.untranslated.append(
            "chat_template (mwakit copies the tokenizer files, chat template included, from "
            "the base or first checkpoint)"
        )
    if src is None or src == "base":
        return
    if src == "union":
        out.untranslated.append(
            "tokenizer_source: union (mwakit copies one tokenizer; it builds no union vocabulary)"
        )
        return
    ref = _ref(src, Conversion({}), "tokenizer_source")
    first = base or (checkpoints[0]["path"] if checkpoints else None)
    if ref != first:
        out.untranslated.append(
            f"tokenizer_source: {src} (mwakit copies the tokenizer of {first or 'the first model'})"
        )


def _validate(out: Conversion) -> None:
    from mwakit.recipe import parse_recipe

    try:
        parse_recipe(out.recipe, source="converted recipe")
    except RecipeError as err:
        raise ConvertError(
            "the translated recipe is not valid: " + "; ".join(map(str, err.problems)),
            where="converted recipe",
            fix="edit the mergekit config's values (or the printed recipe) and validate it",
        ) from err


def convert_file(path: str | Path) -> Conversion:
    """Read and convert a mergekit YAML file (see `convert`).

    Raises:
        ConvertError: The file is unreadable, not YAML, or holds nothing usable.
    """
    p = Path(path)
    try:
        docs = list(yaml.safe_load_all(p.read_text(encoding="utf-8")))
    except OSError as err:
        raise ConvertError(
            f"cannot read it: {err.strerror}", where=str(p), fix="check the path"
        ) from err
    except yaml.YAMLError as err:
        raise ConvertError(f"not valid YAML: {err}", where=str(p), fix="fix the YAML") from err
    if len(docs) > 1:
        raise ConvertError(
            f"{len(docs)} YAML documents (a mergekit-multi file): one recipe is one merge",
            where=str(p),
            fix="put each document in its own file and convert them one by one",
        )
    doc = docs[0] if docs else None
    try:
        return convert(doc, name=p.stem)
    except ConvertError as err:
        if err.where is None or not err.where.startswith(str(p)):
            err.where = f"{p}: {err.where}" if err.where else str(p)
        raise ConvertError(err.what, where=err.where, fix=err.fix) from err
