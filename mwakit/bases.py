"""Which base model each input comes from, and the check that they all agree. No torch.

A PEFT adapter names its base in ``adapter_config.json`` (``base_model_name_or_path``); a full
model says what it is in ``config.json`` (``model_type`` and ``architectures``). Checkpoints of
different bases have the same tensor names and often the same shapes (two fine-tunes of one
architecture, or adapters of a 7B and its instruct variant), so merging them "works" and gives
a silently wrong model. That is an error naming both, unless the recipe sets
``allow_mixed_bases: true`` (one model under two names: a local copy and its Hub id), which
turns it into a warning. Shapes never merge: the planner refuses them per tensor whatever this
flag says.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mwakit.errors import PlanError, SourceError

CONFIG = "config.json"


@dataclass(frozen=True)
class Lineage:
    """What one input says it is.

    Attributes:
        name: The checkpoint's name in messages (``base_model`` for the recipe's base).
        base: The base or architecture as written, for messages; None when unknown.
        key: ``base`` normalised for comparison (None when unknown).
    """

    name: str
    base: str | None
    key: str | None


def adapter_lineage(name: str, base_model_name_or_path: str | None) -> Lineage:
    """An adapter's base: a Hub id (compared case-insensitively, as the Hub resolves it) or a
    local folder (compared by real path, so ``./m`` and ``/abs/m`` are one base)."""
    text = (base_model_name_or_path or "").strip()
    if not text:
        return Lineage(name, None, None)
    key = text.rstrip("/")
    try:
        local = os.path.isdir(key)
    except (OSError, ValueError):  # a NUL byte or an unreadable parent: not a local folder
        local = False
    key = os.path.realpath(key) if local else key.lower()
    return Lineage(name, text, key)


def model_lineage(name: str, folder: Path) -> Lineage:
    """A full model's ``model_type`` and ``architectures`` from its ``config.json``.

    Raises:
        SourceError: ``config.json`` exists but is unreadable or not a JSON object (it is
            copied into the output, so it must be valid).
    """
    path = folder / CONFIG
    try:
        if not path.is_file():
            return Lineage(name, None, None)
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise SourceError(
            f"config.json is unreadable ({type(err).__name__}: {err})"[:200],
            where=str(path),
            fix="restore the config.json that save_pretrained wrote",
        ) from err
    if not isinstance(cfg, dict):
        raise SourceError(
            "config.json is not a JSON object",
            where=str(path),
            fix="restore the config.json that save_pretrained wrote",
        )
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures")
    parts = [str(model_type)] if isinstance(model_type, str) and model_type else []
    if isinstance(archs, list) and all(isinstance(a, str) for a in archs) and archs:
        parts.append("/".join(archs))
    text = " ".join(parts) or None
    return Lineage(name, text, text)


def check_bases(lineages: Sequence[Lineage], *, allow: bool, kind: str) -> list[str]:
    """Refuse inputs of different bases (or return the warning when they are allowed).

    Inputs whose base is unknown (no ``base_model_name_or_path``, no ``config.json``) are not
    compared: there is nothing to compare.

    Args:
        lineages: One per input, the first being the reference.
        allow: The recipe's ``allow_mixed_bases``.
        kind: ``base model`` (adapters) or ``architecture`` (full models), for messages.

    Returns:
        Warnings (one at most): the bases differ and ``allow`` is set.

    Raises:
        PlanError: The bases differ and ``allow`` is not set; names the first two that differ.
    """
    known = [x for x in lineages if x.key is not None]
    if not known:
        return []
    first = known[0]
    other = next((x for x in known[1:] if x.key != first.key), None)
    if other is None:
        return []
    what = f"{other.name} has {kind} {other.base!r}, {first.name} has {first.base!r}"
    if allow:
        return [f"{what}; merged anyway (allow_mixed_bases: true)"]
    raise PlanError(
        f"the checkpoints come from different {kind}s: {what}",
        where="checkpoints",
        fix=f"merge checkpoints of one {kind}; if both are the same model under two names, set "
        "allow_mixed_bases: true",
    )
