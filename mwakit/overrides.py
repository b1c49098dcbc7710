"""``--set KEY=VALUE``: change a recipe from the command line without editing the file.

``KEY`` is a dotted path into the recipe document (``params.penalty``, ``select.last``,
``checkpoints.0.weight``: a number indexes a list); ``VALUE`` is read as YAML, so ``2`` is a
number, ``true`` a boolean, ``[0.1, 0.9]`` a list and ``eval_loss`` a string. The edited
document is validated exactly like the file, and a problem in a value that came from ``--set``
is located as ``--set params.penalty`` rather than at a line of the file.

Used by ``mwakit run``, ``plan`` and ``validate`` (and any command that loads a recipe).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mwakit.errors import Problem, RecipeError, UsageError
from mwakit.recipe import Recipe, loaded, parse_recipe, read_recipe_data

#: The help text of the ``--set`` option, shared by every command that has it.
SET_HELP = (
    "Change the recipe: a dotted path and a YAML value, e.g. --set params.penalty=2 "
    "--set select.last=5 (repeatable; validated like the file)."
)

_FIX = "write --set KEY=VALUE, e.g. --set params.penalty=2"
_EXPONENT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def parse_set(item: str) -> tuple[tuple[str, ...], Any]:
    """Split one ``KEY=VALUE`` into its path and its YAML-typed value.

    Raises:
        UsageError: No ``=``, an empty key or key part, or a value that is not YAML.
    """
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise UsageError(f"{item!r} is not KEY=VALUE", where="--set", fix=_FIX)
    parts = tuple(p.strip() for p in key.split("."))
    if any(not p for p in parts):
        raise UsageError(
            f"{key!r} has an empty part",
            where=f"--set {key}",
            fix="write a dotted path, e.g. params.penalty",
        )
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or "not valid YAML"
        raise UsageError(
            f"the value {text!r} is not valid YAML ({problem})",
            where=f"--set {key}",
            fix="quote a string that YAML cannot read, e.g. --set 'name=\"a: b\"'",
        ) from err
    if isinstance(value, str) and _EXPONENT.match(value.strip()):
        # YAML 1.1 (PyYAML) reads 1e-3 as a string: a person means the number.
        value = float(value)
    return parts, value


def apply_sets(data: Any, sets: Sequence[str]) -> Any:
    """A copy of the recipe document with every ``KEY=VALUE`` of ``sets`` applied in order.

    Missing mappings on the way are created (``--set weighting.mwa.penalty=1``); a number
    indexes an existing list (``checkpoints.0.weight``), ``-1`` its last item.

    Raises:
        UsageError: A malformed item, or a path through a value that is not a mapping or
            list (``--set params.penalty.x=1``), or a list index out of range.
    """
    return _apply(data, sets)[0]


def _apply(data: Any, sets: Sequence[str]) -> tuple[Any, list[str]]:
    """`apply_sets`, and the paths of the mappings it had to create."""
    created: list[str] = []
    out = copy.deepcopy(data) if data is not None else {}
    for item in sets:
        parts, value = parse_set(item)
        key = ".".join(parts)
        if not isinstance(out, dict):
            raise UsageError(
                "the recipe is not a mapping", where=f"--set {key}", fix="fix the recipe file"
            )
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            here = ".".join(parts[: i + 1])
            if isinstance(node, list):
                try:
                    idx = int(part)
                    node[idx]
                except (ValueError, IndexError):
                    raise UsageError(
                        f"{here}: {part!r} is not an index of the list of {len(node)} items",
                        where=f"--set {key}",
                        fix=f"use 0 to {len(node) - 1} (or -1 for the last)",
                    ) from None
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                        created.append(here)
                    node = node[part]
            else:
                parent = ".".join(parts[:i])
                raise UsageError(
                    f"{parent} is {type(node).__name__} {node!r}, not a mapping: cannot set {here}",
                    where=f"--set {key}",
                    fix=f"set {parent} itself, e.g. --set {parent}=VALUE",
                )
    return out, created


def _relocate(problems: list[Problem], keys: Sequence[str]) -> list[Problem]:
    """Locate a problem at ``--set KEY`` when its location lies under a key that was set."""
    out = []
    for p in problems:
        hit = next(
            (
                k
                for k in sorted(keys, key=len, reverse=True)
                if p.loc == k or p.loc.startswith(k + ".")
            ),
            None,
        )
        out.append(Problem(f"--set {p.loc}", p.msg, p.fix) if hit else p)
    return out


def load_recipe_with(path: str | Path, sets: Sequence[str] = ()) -> Recipe:
    """`mwakit.recipe.load_recipe` with ``--set`` items applied before validation.

    Args:
        path: The recipe file.
        sets: ``KEY=VALUE`` items, applied in order (a later one wins).

    Raises:
        UsageError: A malformed ``--set`` item.
        RecipeError: The file cannot be read, or the edited recipe is invalid; a problem in a
            value given by ``--set`` is located as ``--set KEY``.
    """
    from mwakit.recipe import load_recipe

    if not sets:
        return load_recipe(path)
    p = Path(path)
    data, created = _apply(read_recipe_data(p), sets)
    # A problem inside a block that --set created (`select.run` missing after
    # `--set select.last=5`) is the --set's too.
    keys = [".".join(parse_set(s)[0]) for s in sets] + created
    try:
        recipe = parse_recipe(data, source=str(p))
    except RecipeError as err:
        raise RecipeError(_relocate(err.problems, keys), source=err.source) from err
    return loaded(recipe, p)
