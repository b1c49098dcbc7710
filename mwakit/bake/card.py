"""The model card of a baked model: a full model, ``base_model_relation: merge``."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mwakit import __version__
from mwakit.card import PIPELINE_TAGS

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def front_matter(base: str | None, adapter_config: dict[str, Any]) -> dict[str, Any]:
    """The Hub metadata of a model with an adapter merged into its base weights.

    ``base_model`` is written only for a Hub repo id (the Hub accepts nothing else there; a
    local base is named in the body).
    """
    front: dict[str, Any] = {}
    name = (base or "").removeprefix("hf://").split("@")[0]
    if name and _REPO_ID.match(name) and not Path(name).exists():
        front["base_model"] = name
    front["base_model_relation"] = "merge"
    front["library_name"] = "transformers"
    front["tags"] = ["mwakit", "merge", "lora", "baked"]
    task = adapter_config.get("task_type")
    if isinstance(task, str) and task in PIPELINE_TAGS:
        front["pipeline_tag"] = PIPELINE_TAGS[task]
    return front


def _front_text(front: dict[str, Any]) -> str:
    return "---\n" + yaml.safe_dump(front, sort_keys=False).rstrip() + "\n---\n"


def render_bake_card(
    *,
    base: str,
    adapter: str,
    adapter_config: dict[str, Any],
    out_dtype: str,
    changed: int,
    tensors: int,
    untied: bool,
    fingerprints: Sequence[tuple[str, str, str, int]],
    command: str,
) -> str:
    """README.md for `mwakit bake`'s output.

    Args:
        base: The base model as given.
        adapter: The adapter folder as given.
        adapter_config: Its ``adapter_config.json``.
        out_dtype: The written dtype of floating-point tensors.
        changed: Base tensors the adapter changed.
        tensors: Tensors written.
        untied: The bake untied the embeddings (a replaced output head).
        fingerprints: (input, file, sha256, bytes) of the adapter's files.
        command: The command that reproduces the bake.
    """
    front = front_matter(base, adapter_config)
    r, alpha = adapter_config.get("r"), adapter_config.get("lora_alpha")
    variant = "DoRA" if adapter_config.get("use_dora") else "LoRA"
    if adapter_config.get("use_rslora"):
        variant = f"rs{variant}"
    lines = [_front_text(front), "# Baked model", ""]
    lines += [
        f"The {variant} adapter `{adapter}` (r = {r}, α = {alpha}) merged into the weights of "
        f"`{base}` by [mwakit](https://pypi.org/project/mwakit/) {__version__} "
        "(`mwakit bake`): a full model, served like its base (vLLM, TGI, llama.cpp after "
        "conversion) without PEFT.",
        "",
        f"- Base model: `{base}`",
        f"- Tensors: {tensors} written, {changed} changed by the adapter, floating-point ones "
        f"stored as {out_dtype}",
        "- Merge: W' = W + s·B·A per module (DoRA: m ⊙ (W + ΔW) / ‖W + ΔW‖), ΔW formed in "
        "float32, as PEFT's merge_and_unload does",
    ]
    if untied:
        lines.append(
            "- The adapter replaced one side of the tied embeddings: they are untied "
            "(`tie_word_embeddings: false`), as PEFT does"
        )
    if fingerprints:
        lines += ["", "## Input fingerprints", "", "| input | file | bytes | sha256 |"]
        lines.append("|---|---|---|---|")
        lines += [f"| {c} | {f} | {n} | `{h}` |" for c, f, h, n in fingerprints]
    lines += ["", "## Reproduce", "", "```bash", f"pip install mwakit=={__version__}", command]
    lines += ["```", ""]
    return "\n".join(lines)


def rebrand_card(text: str, base: str | None, adapter_config: dict[str, Any]) -> str:
    """A `mwakit run` card (an adapter's) as a baked model's: its front matter replaced, a line
    saying where the merged adapter went."""
    body = text
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end >= 0:
            body = text[end + 5 :]
    note = (
        f"\nThe merged adapter is baked into the weights of `{base}` (`output.format: merged`): "
        "this folder is a full model, no PEFT needed.\n"
    )
    lines = body.split("\n")
    # After the title line.
    at = next((i for i, x in enumerate(lines) if x.startswith("# ")), 0) + 1
    lines.insert(at, note)
    return _front_text(front_matter(base, adapter_config)) + "\n".join(lines)
