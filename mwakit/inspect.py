"""Describe a checkpoint folder, a full model, a run folder or a safetensors file, from
configs and headers only (no tensor byte is read)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from mwakit.adapters import lora_role, read_adapter_config
from mwakit.errors import SourceError
from mwakit.io.header import read_header
from mwakit.io.layout import MODEL_SIDE_FILES
from mwakit.recipe import Select
from mwakit.sources import ADAPTER_CONFIG, ADAPTER_SAFETENSORS, discover, model_files
from mwakit.trainer_state import read_metrics
from mwakit.wording import count, plural, ranks, size

#: What every mwakit output folder holds: the resolved recipe.
_MWAKIT_RECIPE = "mwakit.yaml"
#: config.json keys shown for a full model, in this order.
_CONFIG_KEYS = (
    "model_type",
    "architectures",
    "num_hidden_layers",
    "hidden_size",
    "vocab_size",
    "torch_dtype",
    "dtype",
    "tie_word_embeddings",
)


def _written_by_mwakit(folder: Path) -> dict[str, Any] | None:
    """Method and checkpoint count of the recipe an mwakit output was merged with, or None."""
    f = folder / _MWAKIT_RECIPE
    if not f.is_file():
        return None
    import yaml

    try:
        doc = yaml.safe_load(f.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return {"recipe": _MWAKIT_RECIPE}
    if not isinstance(doc, dict):
        return {"recipe": _MWAKIT_RECIPE}
    cks = doc.get("checkpoints")
    return {
        "recipe": _MWAKIT_RECIPE,
        "method": doc.get("method"),
        "checkpoints": len(cks) if isinstance(cks, list) else None,
    }


def _describe_model(folder: Path, files: tuple[Path, ...]) -> dict[str, Any]:
    """A full model folder: config, weights (sharded or not), side files."""
    cfg: dict[str, Any] = {}
    cfg_file = folder / "config.json"
    if cfg_file.is_file():
        try:
            raw = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise SourceError(
                f"config.json is unreadable ({err})",
                where=str(cfg_file),
                fix="restore the config.json save_pretrained wrote",
            ) from err
        if isinstance(raw, dict):
            cfg = {k: raw[k] for k in _CONFIG_KEYS if k in raw}
    tensors = 0
    nbytes = 0
    params = 0
    dtypes: set[str] = set()
    for f in files:
        h = read_header(f)
        tensors += len(h.tensors)
        nbytes += sum(i.nbytes for i in h.tensors.values())
        params += sum(i.numel for i in h.tensors.values())
        dtypes |= {i.dtype for i in h.tensors.values()}
    m = read_metrics(folder)
    return {
        "path": str(folder),
        "config": cfg,
        "files": [f.name for f in files],
        "sharded": (folder / "model.safetensors.index.json").is_file(),
        "tensors": tensors,
        "parameters": params,
        "bytes": nbytes,
        "dtypes": sorted(dtypes),
        "side_files": [
            n for n in MODEL_SIDE_FILES if n != "config.json" and (folder / n).is_file()
        ],
        "step": m.step,
        "metrics": m.metrics,
        "metrics_source": m.source,
        "mwakit": _written_by_mwakit(folder),
    }


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
    doc["mwakit"] = _written_by_mwakit(folder)
    return doc


def _describe_folder(folder: Path) -> dict[str, Any] | None:
    """An adapter (``kind: checkpoint``) or a full model (``kind: model``), or None."""
    if (folder / ADAPTER_CONFIG).is_file():
        return {"kind": "checkpoint", **_describe_checkpoint(folder)}
    files = model_files(folder)
    if files is not None:
        return {"kind": "model", **_describe_model(folder, files)}
    return None


def describe(path: Path) -> dict[str, Any]:
    """Describe a PEFT adapter folder, a full model folder (one file or shards + index), a run
    of ``checkpoint-<step>/`` folders of either, or a .safetensors file.

    Outputs of ``mwakit run`` are recognised by their ``mwakit.yaml`` (``"mwakit"``: method
    and checkpoint count).

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
    if path.is_dir():
        one = _describe_folder(path)
        if one is not None:
            return one
    if path.is_dir() and any(p.name.startswith("checkpoint-") for p in path.iterdir()):
        folders = discover(Select(run=str(path)))
        docs = [d for f in folders if (d := _describe_folder(f)) is not None]
        return {"kind": "run", "path": str(path), "checkpoints": docs}
    raise SourceError(
        "not a checkpoint, model, run folder or safetensors file",
        where=str(path),
        fix="give a folder with adapter_config.json or model.safetensors[.index.json], or a "
        "Trainer output_dir with checkpoint-<step>/ folders",
    )


def _step_line(doc: dict[str, Any]) -> str:
    metrics = ", ".join(f"{k}={v:.6g}" for k, v in sorted(doc["metrics"].items()))
    if doc["step"] is None and not metrics:
        return "  no training state (no trainer_state.json, no metrics)"
    step = f"step {doc['step']}" if doc["step"] is not None else "step unknown"
    return f"  {step}; metrics: {metrics or 'none'}"


def _mwakit_line(doc: dict[str, Any]) -> list[str]:
    mw = doc.get("mwakit")
    if not mw:
        return []
    how = f" with {mw['method']}" if mw.get("method") else ""
    n = mw.get("checkpoints")
    src = f" from {plural(n, 'checkpoint')}" if isinstance(n, int) else ""
    return [f"  merged by mwakit{how}{src} (recipe as run: {mw['recipe']})"]


def _model(doc: dict[str, Any]) -> list[str]:
    cfg = doc["config"]
    arch = ", ".join(cfg.get("architectures") or []) or cfg.get("model_type") or "unknown"
    shape = ", ".join(
        f"{k.replace('num_hidden_layers', 'layers').replace('_size', '')}={cfg[k]}"
        for k in ("num_hidden_layers", "hidden_size", "vocab_size")
        if k in cfg
    )
    files = doc["files"]
    weights = (
        f"{plural(len(files), 'shard')} + model.safetensors.index.json"
        if doc["sharded"]
        else ", ".join(files)
    )
    lines = [
        f"{doc['path']}: full model, {arch}" + (f" ({shape})" if shape else ""),
        *_mwakit_line(doc),
        f"  weights: {weights}; {plural(doc['tensors'], 'tensor')}, "
        f"{count(doc['parameters'])} parameters, {size(doc['bytes'])}, "
        f"{', '.join(doc['dtypes']) or 'no dtype'}",
        f"  side files: {', '.join(doc['side_files']) or 'none'}",
    ]
    return [*lines, _step_line(doc)]


def _one(doc: dict[str, Any]) -> list[str]:
    if doc["kind"] == "model":
        return _model(doc)
    lines = [
        f"{doc['path']}: {doc['adapter_type']} adapter, "
        f"r={doc['r']}, lora_alpha={doc['lora_alpha']}"
        + (", rsLoRA" if doc["use_rslora"] else "")
        + (", DoRA" if doc["use_dora"] else ""),
        *_mwakit_line(doc),
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
            f"({size(doc['bytes'])}, {', '.join(doc['dtypes'])}); "
            f"{plural(doc['lora_modules'], 'LoRA module')}, {ranks(doc['ranks'])}; "
            f"{plural(doc['full_tensors'], 'full tensor')}"
        )
    else:
        lines.append(f"  weights: {doc['weights']}")
    lines.append(_step_line(doc))
    return lines


def describe_text(doc: dict[str, Any]) -> str:
    """Human-readable text for `describe`'s document."""
    if doc["kind"] == "safetensors":
        return (
            f"{doc['path']}: {doc['tensors']} tensors, {doc['bytes'] / 1e6:.2f} MB, "
            f"dtypes {', '.join(doc['dtypes'])}, metadata {doc['metadata']}"
        )
    if doc["kind"] in ("checkpoint", "model"):
        return "\n".join(_one(doc))
    cks = doc["checkpoints"]
    kinds = {c["kind"] for c in cks}
    what = " (full models)" if kinds == {"model"} else ""
    lines = [f"{doc['path']}: run with {plural(len(cks), 'checkpoint')}{what}"]
    if cks:
        lines += [x for x in _one(cks[-1])[1:4] if not x.startswith("  step")]
    lines.append("")
    keys = [k for k in ("loss", "eval_loss") if any(k in c["metrics"] for c in cks)]
    lines.append("  ".join(["step".ljust(8), *(k.ljust(10) for k in keys)]).rstrip())
    for c in cks:
        vals = [f"{c['metrics'][k]:.6g}" if k in c["metrics"] else "" for k in keys]
        step = str(c["step"]) if c["step"] is not None else "?"
        lines.append("  ".join([step.ljust(8), *(v.ljust(10) for v in vals)]).rstrip())
    return "\n".join(lines)
