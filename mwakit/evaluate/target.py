"""What `mwakit eval` scores: an adapter folder, a model folder, or a recipe merged in memory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mwakit.errors import SourceError, UsageError
from mwakit.memory import MergedAdapter


@dataclass(frozen=True)
class Target:
    """A resolved evaluation target.

    Attributes:
        adapter: The candidate to put in place; None to score the model folder itself.
        base: The model to load (the ``--base``, the adapters' base, or the target model).
        tokenizer: Where the tokenizer is when the base folder has none (an adapter folder).
        label: How the target is named in output.
    """

    adapter: MergedAdapter | None
    base: str
    tokenizer: str | None
    label: str


def resolve_target(target: str | Path, base: str | Path | None = None) -> Target:
    """Resolve TARGET of `mwakit eval`.

    Args:
        target: An adapter folder (a checkpoint), a full-model folder, an ``hf://`` reference
            to either, or a recipe file (merged in memory; nothing is written).
        base: The base model; default: the adapters' ``base_model_name_or_path`` when that is
            a local folder or an ``hf://`` reference (a model folder is its own base).

    Raises:
        SourceError: The target is neither, or its files cannot be read.
        UsageError: No base was given and the adapters' base is no local folder or hf:// ref.
        MwakitError: A recipe's problems, as `mwakit run` reports them.
    """
    text = str(target)
    folder: Path
    if text.startswith("hf://"):
        from mwakit import hub

        try:
            folder = hub.download(hub.parse_hf_ref(text))[0]
        except ValueError as err:
            raise SourceError(str(err), where=text, fix="write hf://org/repo[@rev]") from err
    else:
        folder = Path(text)
    if folder.is_file():
        from mwakit.memory import merge_in_memory

        merged = merge_in_memory(folder)
        if merged.kind == "full":
            from mwakit.api import plan

            p = plan(folder)
            src = p.base or p.side_source or p.checkpoints[0]
            return Target(merged, str(base or src.path), None, text)
        return Target(merged, _base(base, merged.base_model, text), None, text)
    if (folder / "adapter_config.json").is_file():
        adapter = _read_adapter(folder)
        return Target(adapter, _base(base, adapter.base_model, text), str(folder), text)
    if (folder / "config.json").is_file():
        return Target(None, str(folder), str(base) if base is not None else None, text)
    raise SourceError(
        "not an adapter folder, a model folder or a recipe file",
        where=text,
        fix="pass a checkpoint folder (adapter_config.json), a model folder or a recipe YAML",
    )


def _base(given: str | Path | None, found: str | None, where: str) -> str:
    if given is not None:
        return str(given)
    if found and (found.startswith("hf://") or Path(found).is_dir()):
        return found
    raise UsageError(
        f"the adapters' base_model_name_or_path ({found or 'none'}) is no local folder",
        where=where,
        fix="pass --base FOLDER (or --base hf://org/repo)",
    )


def _read_adapter(folder: Path) -> MergedAdapter:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise SourceError(
            "no adapter_model.safetensors",
            where=str(folder),
            fix="save the adapter with safe_serialization (the PEFT default)",
        )
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        tensors = load_file(str(weights))
    except (OSError, ValueError, SafetensorError) as err:
        raise SourceError(
            f"cannot read the adapter: {err}", where=str(folder), fix="check the adapter files"
        ) from err
    if not isinstance(cfg, dict):
        raise SourceError("adapter_config.json is not a JSON object", where=str(folder))
    found = cfg.get("base_model_name_or_path")
    return MergedAdapter(tensors, cfg, "adapter", str(found) if found else None)
