"""The recipe: a YAML document validated by pydantic, every problem reported at once.

Schema only: no torch import, no file reads beyond the YAML itself, so `mwakit validate
--schema-only` and `--help` stay fast. Method params are validated by the method's own
``Params`` model, and each rule's params are validated merged over the top-level params, each
with its location. What the schema alone can decide is decided here (a method in a space it
cannot use, a checkpoint count the method cannot take, weights the method would ignore), so
``--schema-only`` sees it too; the rest needs the checkpoints (`mwakit.validate`).

The YAML is read with a loader that reports a key given twice in one mapping (YAML itself keeps
the last one silently) with both line numbers.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from mwakit import layer_params
from mwakit.errors import Problem, RecipeError
from mwakit.methods import MergeMethod, get_method

DType = Literal["float32", "float64", "bfloat16", "float16"]
_DEVICE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _path(v: str) -> str:
    """Check a local path: no file system accepts a NUL byte in one."""
    if "\0" in v:
        raise ValueError("the path contains a NUL byte (\\0), which no file system allows")
    return v


def _hub_ref(v: str | None) -> str | None:
    """Check an ``hf://org/repo[@revision][/subfolder]`` reference (local paths pass as is)."""
    from mwakit.hub import is_hf_ref, parse_hf_ref  # light: huggingface_hub is not imported

    if v is not None:
        _path(v)
        if is_hf_ref(v):
            parse_hf_ref(v)
    return v


class CheckpointSpec(_Strict):
    """One input checkpoint."""

    path: str = Field(min_length=1)
    """Local folder (a Trainer ``checkpoint-<step>/`` or a PEFT adapter folder), or a Hub
    reference ``hf://org/repo[@revision][/subfolder]``."""
    metrics: dict[str, float] | None = None
    """Metrics for weighting; when absent they are read from trainer_state.json."""
    weight: float | list[float] | None = None
    """Explicit weight (``linear`` and the task-vector methods; an error with ``mwa``,
    ``slerp`` or a ``weighting:`` block, which compute their own), or a per-layer list
    interpolated over depth."""

    @field_validator("weight")
    @classmethod
    def _weight(cls, v: float | list[float] | None) -> float | list[float] | None:
        if isinstance(v, list) and not v:
            raise ValueError("a per-layer weight list needs at least one number")
        if isinstance(v, list) and not all(map(math.isfinite, v)):
            raise ValueError("every per-layer weight must be a finite number")
        return v

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        # `- runs/x/checkpoint-800` is the friendliest way to list checkpoints.
        return {"path": v} if isinstance(v, str) else v

    _path = field_validator("path")(_hub_ref)


class Select(_Strict):
    """Discover ``checkpoint-<step>/`` folders of a run, sorted by step.

    Filters apply in this order: ``steps`` range, then ``every`` n-th, then the ``last`` k.
    """

    run: str = Field(min_length=1)
    """A run folder, or a Hub repo (``hf://org/repo[@revision][/subfolder]``) holding them."""
    last: PositiveInt | None = None
    every: PositiveInt | None = None
    steps: tuple[int, int] | None = None

    _run = field_validator("run")(_hub_ref)

    @field_validator("steps")
    @classmethod
    def _ordered(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and v[0] > v[1]:
            raise ValueError(f"steps range [{v[0]}, {v[1]}] is empty: write [low, high]")
        return v


class Rule(_Strict):
    """Per-tensor parameter override; the first rule whose glob matches wins."""

    match: str = Field(min_length=1)
    """Anchored glob on the tensor or module name (``*`` also matches dots)."""
    params: dict[str, Any] = Field(default_factory=dict)


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """Bytes in a size with its unit spelled out: "500MB", "5GB", "2GiB", "1.5 GB".

    Raises:
        ValueError: No unit, an unknown unit, or a size that is not positive.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+)\s*", text)
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"size {text!r} needs a number and a unit: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
        )
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return n


class Weighting(_Strict):
    """Per-checkpoint weights from metrics, for any method (``weighting: {mwa: {...}}``).

    The MWA weights replace each checkpoint's ``weight``; the method then applies its own λ
    and normalisation, so ``method: ties`` + MWA weights is one recipe.
    """

    mwa: dict[str, Any]
    """MWA params: metric, penalty (a number or a per-layer list), transform,
    higher_is_better (see `mwakit methods`)."""

    @field_validator("mwa")
    @classmethod
    def _mwa(cls, v: dict[str, Any]) -> dict[str, Any]:
        from mwakit.methods.mwa import Params

        problems = layer_params.check(Params, v)
        if problems:
            raise ValueError("; ".join(map(str, problems)))
        return v


class HubTarget(_Strict):
    """Where ``mwakit run`` (after a successful write) or ``mwakit push`` uploads the output."""

    repo_id: str = Field(pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")
    """``org/name`` (or ``name`` in your own namespace); created if missing."""
    private: bool = True
    """A new repo is private unless set to false; an existing repo keeps its visibility."""
    revision: str | None = Field(default=None, min_length=1)
    """Branch to commit to (created from the default branch if missing); default: main."""
    commit_message: str | None = Field(default=None, min_length=1)
    """Default: "Upload <folder> (merged with mwakit <version>)"."""
    create_pr: bool = False
    """Open a pull request instead of committing to the branch (not with ``revision``)."""

    @model_validator(mode="after")
    def _pr_or_branch(self) -> HubTarget:
        if self.create_pr and self.revision:
            raise ValueError(
                "create_pr and revision cannot be combined: a pull request targets the "
                "default branch"
            )
        return self


class Output(_Strict):
    """Where and how the merged checkpoint is written."""

    path: str = Field(min_length=1)
    overwrite: bool = False
    shard_size: str = "5GB"
    """Full models: the largest output shard, units spelled out ("500MB", "5GB", "2GiB")."""
    hub: HubTarget | None = None
    """Upload the output folder to the Hub after a successful write (``--no-push`` skips)."""

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v)
        return v

    _path = field_validator("path")(_path)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        return {"path": v} if isinstance(v, str) else v


class Slice(_Strict):
    """A run of layers taken unchanged from one checkpoint (``method: passthrough``)."""

    checkpoint: int | str
    """The checkpoint: its index in ``checkpoints:`` (0 = first) or its ``path`` as listed."""
    layers: tuple[int, int]
    """[start, end): source layers start … end − 1, as mergekit's ``layer_range``."""

    @field_validator("layers")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(
                f"layers [{v[0]}, {v[1]}] is empty or negative: write [start, end) with "
                "0 ≤ start < end"
            )
        return v


class Recipe(_Strict):
    """A whole merge recipe."""

    name: str | None = None
    method: str = "mwa"
    params: dict[str, Any] = Field(default_factory=dict)
    checkpoints: list[CheckpointSpec] | None = None
    select: Select | None = None
    rules: list[Rule] = Field(default_factory=list)
    lora_space: Literal["factors", "delta"] = "factors"
    """factors: average A and B (same rank); delta: merge ΔW exactly."""
    delta_rank: Literal["concat", "full"] | PositiveInt = "concat"
    """With lora_space: delta — ``concat`` (exact, rank Σr), ``full`` (the merged ΔW exactly, as
    full-rank factors: no SVD) or a rank to re-factorise to."""
    loss_window: PositiveInt | Literal["since_save"] = "since_save"
    """A checkpoint's training ``loss``: the mean of the losses logged since the previous saved
    checkpoint (``since_save``, the default: one logged batch is a noisy measure, and MWA at
    large penalties piles weight onto a lucky one), or of the last n logged (1: the last
    logged loss alone, the default before)."""
    dtype: DType = "float32"
    """The merge's precision. Sums, products, norms and factorisations always run in float32
    (float64 with ``dtype: float64``); with ``bfloat16``/``float16`` the results of each step
    (the merged tensor, a dense ΔW) are rounded to it, which halves their memory but never
    makes the arithmetic itself less precise."""
    out_dtype: DType | None = None
    """The written dtype (default: the inputs'); values it cannot hold are an error."""
    device: str = "auto"
    allow_pickle: bool = False
    """Allow legacy adapter_model.bin inputs (loaded with torch.load(weights_only=True))."""
    weighting: Weighting | None = None
    """Where per-checkpoint weights come from, for any method (default: the method's own)."""
    base_model: str | None = None
    """Full models: the base θ_0 that task-vector methods subtract (a model folder, or
    ``hf://org/repo[@revision][/subfolder]``)."""
    allow_mixed_bases: bool = False
    """Merge checkpoints of different base models / architectures anyway (a warning instead of
    an error); for one model known under two names (a local copy and its Hub id)."""
    slices: list[Slice] | None = None
    """Full models, ``method: passthrough``: the output's layers, slice after slice, each from
    one checkpoint (renumbered from 0); the other tensors come from the checkpoint
    ``params.rest_from`` names, else the first slice's checkpoint."""
    tuning: dict[str, Any] | None = None
    """Written by `mwakit tune` into the recipe it chose: the data's fingerprints, the metric,
    VAL/TEST of the chosen merge and the baselines. The model card shows it; the merge
    ignores it."""
    output: Output

    _base_model = field_validator("base_model")(_hub_ref)

    @field_validator("delta_rank", mode="before")
    @classmethod
    def _delta_rank(cls, v: Any) -> Any:
        if isinstance(v, str) and v in ("concat", "full"):
            return v
        ok = isinstance(v, int | float) and not isinstance(v, bool)
        if ok and isinstance(v, float):
            ok = math.isfinite(v) and v.is_integer()
        if not ok or v < 1:
            raise ValueError(
                f"delta_rank must be concat, full or a rank (a whole number ≥ 1), got {v!r}"
            )
        return int(v)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.match(v):
            raise ValueError(f"device {v!r} is not one of cpu, cuda, cuda:N, auto")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> Recipe:
        problems = _cross_checks(self.model_dump())
        if problems:
            raise ValueError(problems[0].msg)
        # A slice names its checkpoint by index from here on (paths may be rewritten, e.g.
        # pinned in the resolved recipe, and must not break the reference).
        for sl in self.slices or []:
            if isinstance(sl.checkpoint, str) and self.checkpoints:
                sl.checkpoint = [c.path for c in self.checkpoints].index(sl.checkpoint)
        return self

    _source: str | None = PrivateAttr(default=None)

    @property
    def source(self) -> str | None:
        """The file the recipe was read from (`load_recipe`), for messages; else None."""
        return self._source

    def method_params(self, rule: Rule | None = None, *, t: float = 0.0) -> BaseModel:
        """The validated params of the method, with a rule's overrides merged on top.

        Per-layer lists are taken at depth ``t`` (0: the value of the first layer and of the
        tensors outside the layer stack).

        Raises:
            RecipeError: The params do not validate (a `Recipe` built without
                `parse_recipe`, which checks them first).
        """
        merged = {**self.params, **(rule.params if rule else {})}
        try:
            return layer_params.resolve(get_method(self.method).params, merged, t)
        except ValidationError as err:
            at = ("rules", self.rules.index(rule), "params") if rule else ("params",)
            raise RecipeError(_problems(err, at)) from err
        except KeyError as err:  # an unknown method
            raise RecipeError([Problem("method", str(err.args[0]))]) from err

    @property
    def per_layer(self) -> bool:
        """True when a parameter or weight is a per-layer list."""
        return bool(
            layer_params.lists_in(self.params)
            or any(layer_params.lists_in(r.params) for r in self.rules)
            or (self.weighting is not None and layer_params.lists_in(self.weighting.mwa))
            or any(isinstance(c.weight, list) for c in self.checkpoints or [])
        )

    def to_yaml_dict(self) -> dict[str, Any]:
        """The recipe as plain data, without unset optional blocks."""
        return self.model_dump(mode="json", exclude_none=True)


def _cross_checks(data: dict[str, Any]) -> list[Problem]:
    """Checks across fields, run on raw data too so they show beside field errors."""
    out = []
    cks, sel = data.get("checkpoints"), data.get("select")
    if (cks is None) == (sel is None):
        out.append(
            Problem(
                "checkpoints", "give exactly one of `checkpoints:` (a list) or `select:` (a run)"
            )
        )
    elif isinstance(cks, list) and not cks:
        out.append(Problem("checkpoints", "`checkpoints:` is empty: list at least one checkpoint"))
    if data.get("delta_rank", "concat") != "concat" and data.get("lora_space") != "delta":
        out.append(Problem("delta_rank", "delta_rank applies only with lora_space: delta"))
    name = data.get("method", "mwa")
    try:
        method = get_method(name) if isinstance(name, str) else None
    except KeyError:
        method = None  # reported with the method's own problems
    if method is not None:
        out += _space_checks(method, data)
        if not data.get("slices"):  # slices: one checkpoint per output tensor, any count
            out += _count_checks(method, cks, sel)
        out += _weight_checks(method, cks, data.get("weighting"))
    out += _slice_problems(data)
    return out


def _space_checks(method: MergeMethod, data: dict[str, Any]) -> list[Problem]:
    """A LoRA space the method cannot work in (the same rules as the planner's)."""
    # `factors` is the default and means nothing to full models (a dumped full-model recipe
    # writes it too), so a method that cannot use it is found by the planner, on adapters.
    # `delta` is only ever written by someone merging adapters.
    space, rank = data.get("lora_space", "factors"), data.get("delta_rank", "concat")
    if space == "delta":
        if "delta" not in method.spaces:
            return [Problem("lora_space", *lora_space_problem(method, "delta"))]
        if not method.linear and rank == "concat":
            return [Problem("delta_rank", *lora_space_problem(method, "concat"))]
    return []


def lora_space_problem(method: MergeMethod, what: str) -> tuple[str, str]:
    """(message, fix) for a LoRA space or delta_rank the method cannot use.

    Args:
        method: The merge method.
        what: ``factors`` (the method acts on ΔW), ``delta`` (it works on factors only) or
            ``concat`` (its result is not a sum of low-rank updates).
    """
    if what == "factors":
        return (
            f"method {method.name} acts on ΔW, not on LoRA factors",
            "use lora_space: delta with delta_rank: <rank> (or delta_rank: full)",
        )
    if what == "delta":
        return (f"method {method.name} works on LoRA factors only", "use lora_space: factors")
    return (
        f"method {method.name} makes ΔW sparse or non-linear, so it is no longer a sum of "
        "low-rank updates and cannot be concatenated",
        "set delta_rank: <rank> to re-factorise each merged ΔW with an SVD, or "
        "delta_rank: full to write it exactly",
    )


def count_problem(method: MergeMethod, n: int, given: str = "the recipe gives") -> str | None:
    """The message when ``n`` checkpoints are not what the method takes, else None."""
    lo, hi = method.inputs
    if lo <= n and (hi is None or n <= hi):
        return None
    want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo}–{hi}"
    return f"method {method.name} takes {want} checkpoints, {given} {n}"


def _count_checks(method: MergeMethod, cks: Any, sel: Any) -> list[Problem]:
    fix = "adjust the checkpoint list, or pick another method"
    if isinstance(cks, list) and cks and (msg := count_problem(method, len(cks))) is not None:
        return [Problem("checkpoints", msg, fix)]
    last = sel.get("last") if isinstance(sel, dict) else None
    if isinstance(last, int) and not isinstance(last, bool) and last >= 1:
        lo = method.inputs[0]
        if last < lo and (msg := count_problem(method, last, "select.last keeps")):
            return [Problem("select.last", msg, f"set select.last: {lo} or more")]
    return []


def _weight_checks(method: MergeMethod, cks: Any, weighting: Any) -> list[Problem]:
    """Explicit weights that would be ignored: the method, or ``weighting:``, sets them."""
    out = []
    if weighting is not None and not method.uses_weights:
        out.append(
            Problem(
                "weighting",
                f"method {method.name} computes its own weights, so `weighting:` would be ignored",
                "remove the weighting: block (for MWA weights with another method, keep it "
                "and change method:)",
            )
        )
    if weighting is None and method.uses_weights:
        return out
    why = (
        f"method {method.name} computes its own weights"
        if not method.uses_weights
        else "`weighting:` computes every checkpoint's weight"
    )
    for i, c in enumerate(cks if isinstance(cks, list) else []):
        if isinstance(c, dict) and c.get("weight") is not None:
            out.append(
                Problem(
                    f"checkpoints.{i}.weight",
                    f"{why}, so this weight would be ignored",
                    "remove weight: (explicit weights need a method that uses them, e.g. "
                    "linear, and no weighting: block)",
                )
            )
    return out


def _slice_problems(data: dict[str, Any]) -> list[Problem]:
    """``slices:`` needs passthrough and must name listed checkpoints."""
    slices = data.get("slices")
    if slices is None:
        return []
    if not isinstance(slices, list) or not slices:
        return [Problem("slices", "`slices:` is empty: list at least one {checkpoint, layers}")]
    out = []
    if data.get("method", "mwa") != "passthrough":
        out.append(
            Problem(
                "slices",
                "slices stack layers taken unchanged from checkpoints: use method: passthrough "
                "(to merge layer ranges, use per-layer weights or rules instead)",
            )
        )
    cks = data.get("checkpoints")
    paths = (
        [c.get("path") if isinstance(c, dict) else c for c in cks]
        if isinstance(cks, list)
        else None
    )
    for i, sl in enumerate(slices):
        ref = sl.get("checkpoint") if isinstance(sl, dict) else None
        if isinstance(ref, bool) or ref is None:
            continue  # the field's own validation reports it
        if isinstance(ref, int):
            if ref < 0 or (paths is not None and ref >= len(paths)):
                n = "?" if paths is None else len(paths)
                out.append(
                    Problem(
                        f"slices.{i}.checkpoint",
                        f"checkpoint {ref} is not in checkpoints: (0 … {n}−1 are listed)",
                    )
                )
        elif isinstance(ref, str) and (paths is None or ref not in paths):
            out.append(
                Problem(
                    f"slices.{i}.checkpoint",
                    f"{ref!r} is not a path listed under checkpoints: (name it by index "
                    "or list it there)",
                )
            )
    return out


def _loc(parts: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in parts)


def _problems(err: ValidationError, prefix: tuple[int | str, ...] = ()) -> list[Problem]:
    out = []
    for e in err.errors():
        msg, fix = e["msg"].removeprefix("Value error, "), None
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; `mwakit methods` lists method params)"
            fix = "remove it or correct its spelling"
        elif e["type"] == "missing":
            fix = "add it"
        elif e["type"] == "rank_penalty":
            fix = "use a penalty between 0 (best checkpoint only) and 1 (uniform), or another "
            fix += "transform"
        out.append(Problem(_loc(prefix + tuple(e["loc"])), msg, fix))
    return out


def parse_recipe(data: Any, *, source: str | None = None) -> Recipe:
    """Validate recipe data, reporting every problem at once.

    Args:
        data: The parsed YAML document.
        source: Where it came from, for messages.

    Raises:
        RecipeError: With one `Problem` per error, each with its location.
    """
    if not isinstance(data, dict):
        raise RecipeError(
            [Problem("", "a recipe is a YAML mapping (key: value lines)")], source=source
        )
    problems = _cross_checks(data)
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        # The model validator repeats a cross-field problem at the root: keep the located one.
        cross = {p.msg for p in problems}
        problems += [p for p in _problems(err) if not (p.loc == "" and p.msg in cross)]

    # Method params are checked even when the structure has other problems, so one run of
    # `mwakit validate` reports everything.
    method_name = data.get("method", "mwa")
    if isinstance(method_name, str):
        try:
            method = get_method(method_name)
        except KeyError as err:
            problems.append(Problem("method", str(err.args[0])))
        else:
            params = data.get("params") or {}
            if isinstance(params, dict):
                # Per-layer lists are validated element by element (`layer_params.check`).
                problems += layer_params.check(method.params, params, ("params",), _problems)
                # A rule's merged params repeat the top-level problems: keep those of the
                # keys the rule sets, and any the top level does not have (cross-field ones).
                top = {p.loc for p in problems if p.loc.startswith("params")}
                rules = data.get("rules") or []
                for i, rule in enumerate(rules if isinstance(rules, list) else []):
                    rp = rule.get("params") if isinstance(rule, dict) else None
                    if isinstance(rp, dict):
                        pre = f"rules.{i}.params"
                        merged = {**params, **rp}
                        problems += [
                            p
                            for p in layer_params.check(
                                method.params, merged, ("rules", i, "params"), _problems
                            )
                            if p.loc.removeprefix(f"{pre}.").split(".")[0] in rp
                            or p.loc == pre
                            or "params" + p.loc.removeprefix(pre) not in top
                        ]
    if problems:
        raise RecipeError(problems, source=source)
    assert recipe is not None
    return recipe


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, recording every key given twice in one mapping.

    YAML keeps the last of two equal keys without a word, so ``penalty: 0.5`` on one line and
    ``penalty: 0.9`` further down would merge with 0.9 silently. Merge keys (``<<: *base``) may
    be overridden, as YAML intends; only keys written twice count.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[Problem] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base loader reports it
                continue
            if first is None:
                seen[key] = line
                continue
            self.duplicates.append(
                Problem(
                    f"line {line}",
                    f"key `{key}` is given twice, on lines {first} and {line}; YAML would keep "
                    "only the last one",
                    "remove one of them",
                )
            )
        return super().construct_mapping(node, deep=deep)


def _yaml(text: str, source: str) -> Any:
    """Parse YAML, reporting syntax errors, absurd nesting and duplicated keys."""
    loader = _Loader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise RecipeError(
            [Problem(where, f"not valid YAML: {problem}", "correct the YAML syntax")],
            source=source,
        ) from err
    except RecursionError as err:
        raise RecipeError(
            [Problem("", "the YAML is nested too deeply to be a recipe", "flatten the document")],
            source=source,
        ) from err
    finally:
        loader.dispose()
    if loader.duplicates:
        # Outer mappings are checked before their values: report in the file's order.
        loader.duplicates.sort(key=lambda p: int(p.loc.split()[1]))
        try:
            parse_recipe(data, source=source)
        except RecipeError as err:
            raise RecipeError(loader.duplicates + err.problems, source=source) from err
        raise RecipeError(loader.duplicates, source=source)
    return data


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file.

    Raises:
        RecipeError: The file is missing, is not UTF-8 YAML, gives a key twice, or the recipe
            is invalid; every problem at once.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        why = err.strerror if isinstance(err, OSError) else str(err)
        raise RecipeError(
            [Problem("", f"cannot read recipe: {why}", "check the recipe's path")],
            source=str(p).replace("\0", "\\0"),
        ) from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise RecipeError(
            [
                Problem(
                    f"line {line}",
                    f"the recipe is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
                    f"{err.start})",
                    "save the file as UTF-8",
                )
            ],
            source=str(p),
        ) from err
    recipe = parse_recipe(_yaml(text, str(p)), source=str(p))
    recipe._source = str(p)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML text (keys in schema order)."""
    return yaml.safe_dump(recipe.to_yaml_dict(), sort_keys=False, allow_unicode=True)
