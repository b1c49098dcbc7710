"""Describe a checkpoint folder or a run folder, from configs and headers only."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from mwakit.adapters import lora_role, read_adapter_config
from mwakit.errors import SourceError
from mwakit.io.header import read_header
from mwakit.recipe import Select
from mwakit.sources import ADAPTER_CONFIG, ADAPTER_SAFETENSORS, discover
from mwakit.trainer_state import read_metrics


def _describe_checkpoint(folder: Path) -> dict[str, Any]:
    cfg = read_adapter_config(folder)
    doc: dict[str, Any] = {
        "path": str(folder),
        "adapter_type": cfg.peft_type,
        "base_model": cfg.base_model,
        "r": cfg.raw.get("r"),
        "lora_alpha": cfg.raw.get("lora_alpha"),
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "target_modules": cfg.raw.get("target_modules"),
        "modules_to_save": cfg.raw.get("modules_to_save"),
        "rank_pattern": cfg.raw.get("rank_pattern") or {},
        "alpha_pattern": cfg.raw.get("alpha_pattern") or {},
    }
    wf = folder / ADAPTER_SAFETENSORS
    if wf.is_file():
        h = read_header(wf)
        ranks: Counter[int] = Counter()
        full = 0
        for key, info in h.tensors.items():
            role = lora_role(key)
            if role is None:
                full += 1
            elif role[1] == "A":
                ranks[info.shape[0]] += 1
        doc.update(
            tensors=len(h.tensors),
            bytes=sum(i.nbytes for i in h.tensors.values()),
            dtypes=sorted({i.dtype for i in h.tensors.values()}),
            lora_modules=sum(ranks.values()),
            ranks={str(r): n for r, n in sorted(ranks.items())},
            full_tensors=full,
        )
    else:
        doc["weights"] = "missing adapter_model.safetensors"
    m = read_metrics(folder)
    doc.update(step=m.step, metrics=m.metrics, metrics_source=m.source)
    return doc


def describe(path: Path) -> dict[str, Any]:
    """Describe a PEFT adapter folder, a run of ``checkpoint-<step>/`` folders, or a .safetensors.

    Raises:
        SourceError: The path is none of those.
    """
    if path.is_file() and path.suffix == ".safetensors":
        h = read_header(path)
        return {
            "kind": "safetensors",
            "path": str(path),
            "tensors": len(h.tensors),
            "bytes": sum(i.nbytes for i in h.tensors.values()),
            "dtypes": sorted({i.dtype for i in h.tensors.values()}),
            "metadata": h.metadata,
        }
    if (path / ADAPTER_CONFIG).is_file():
        return {"kind": "checkpoint", **_describe_checkpoint(path)}
    if path.is_dir() and any(p.name.startswith("checkpoint-") for p in path.iterdir()):
        folders = discover(Select(run=str(path)))
        cks = [_describe_checkpoint(f) for f in folders if (f / ADAPTER_CONFIG).is_file()]
        return {"kind": "run", "path": str(path), "checkpoints": cks}
    raise SourceError(
        "not a checkpoint, run folder or safetensors file",
        where=str(path),
        fix="give a folder with adapter_config.json, or a Trainer output_dir with "
        "checkpoint-<step>/ folders",
    )


def _one(doc: dict[str, Any]) -> list[str]:
    lines = [
        f"{doc['path']}: {doc['adapter_type']} adapter, "
        f"r={doc['r']}, lora_alpha={doc['lora_alpha']}"
        + (", rsLoRA" if doc["use_rslora"] else "")
        + (", DoRA" if doc["use_dora"] else ""),
        f"  base model: {doc['base_model'] or 'unknown'}",
        f"  target modules: {doc['target_modules']}",
    ]
    if doc.get("modules_to_save"):
        lines.append(f"  modules to save: {doc['modules_to_save']}")
    if doc.get("rank_pattern"):
        lines.append(f"  rank pattern: {doc['rank_pattern']}")
    if "tensors" in doc:
        lines.append(
            f"  tensors: {doc['tensors']} "
            f"({doc['bytes'] / 1e6:.2f} MB, {', '.join(doc['dtypes'])}); "
            f"{doc['lora_modules']} LoRA modules, ranks {doc['ranks']}, {doc['full_tensors']} full"
        )
    metrics = ", ".join(f"{k}={v:.6g}" for k, v in sorted(doc["metrics"].items()))
    lines.append(f"  step: {doc['step']}; metrics: {metrics or 'none'}")
    return lines


def describe_text(doc: dict[str, Any]) -> str:
    """Human-readable text for `describe`'s document."""
    if doc["kind"] == "safetensors":
        return (
            f"{doc['path']}: {doc['tensors']} tensors, {doc['bytes'] / 1e6:.2f} MB, "
            f"dtypes {', '.join(doc['dtypes'])}, metadata {doc['metadata']}"
        )
    if doc["kind"] == "checkpoint":
        return "\n".join(_one(doc))
    cks = doc["checkpoints"]
    lines = [f"{doc['path']}: run with {len(cks)} checkpoints"]
    if cks:
        lines += _one(cks[-1])[1:4]
    lines.append("")
    keys = [k for k in ("loss", "eval_loss") if any(k in c["metrics"] for c in cks)]
    lines.append("  ".join(["step".ljust(8), *(k.ljust(10) for k in keys)]).rstrip())
    for c in cks:
        vals = [f"{c['metrics'][k]:.6g}" if k in c["metrics"] else "" for k in keys]
        lines.append("  ".join([str(c["step"]).ljust(8), *(v.ljust(10) for v in vals)]).rstrip())
    return "\n".join(lines)
