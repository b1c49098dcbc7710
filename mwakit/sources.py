"""Sources: turn the recipe's checkpoint references into local folders with metrics.

A reference is a local folder (a Trainer ``checkpoint-<step>/`` or any PEFT adapter folder) or a
Hub reference ``hf://org/repo[@revision][/subfolder]``, downloaded through `mwakit.hub` (only
the files a checkpoint needs) and recorded with the commit sha it resolved to. ``select:``
discovers the ``checkpoint-<step>/`` folders of a run, or of a Hub repo, sorted by step. Metrics
come from the recipe when given, else from the checkpoint's ``trainer_state.json``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from mwakit import hub
from mwakit.errors import PlanError, Problems, SourceError
from mwakit.io.layout import inside_folder
from mwakit.recipe import CheckpointSpec, Recipe, Select
from mwakit.trainer_state import LossWindow, read_metrics, step_from_name

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
MODEL_SAFETENSORS = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
Kind = Literal["adapter", "full"]
_T = TypeVar("_T")


@contextmanager
def os_errors(where: str, what: str = "cannot read the checkpoint folder") -> Iterator[None]:
    """Turn an OS error while looking into a folder (no permission, I/O error) into a
    `SourceError` with a fix; ``where`` names the place as the recipe does."""
    try:
        yield
    except OSError as err:
        why = err.strerror or str(err)
        fix = (
            "make the folder and its files readable by you (chmod -R u+rX), or copy them"
            if isinstance(err, PermissionError)
            else "check the path and the disk it is on"
        )
        raise SourceError(f"{what}: {why}", where=where, fix=fix) from err


def model_files(folder: Path) -> tuple[Path, ...] | None:
    """The safetensors files of a full model folder (shards in index order), or None.

    Raises:
        SourceError: The index file is unreadable or names a missing shard.
    """
    index = folder / MODEL_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise SourceError(
                f"{MODEL_INDEX} is unreadable ({err})",
                where=str(index),
                fix="restore the index file save_pretrained wrote",
            ) from err
        bad = [n for n in names if not isinstance(n, str)]
        if bad or not names:
            raise SourceError(
                f"{MODEL_INDEX} names no shard"
                if not names
                else f"shard name {bad[0]!r} is not a string",
                where=str(index),
                fix="restore the index file save_pretrained wrote",
            )
        # Shard names come from a file: they may not reach outside the model folder.
        files = tuple(inside_folder(folder, n, "shard") for n in names)
        for f in files:
            if not f.is_file():
                raise SourceError(
                    f"shard {f.name} named in the index is missing",
                    where=str(folder),
                    fix="download or copy every shard of the model",
                )
        return files
    single = folder / MODEL_SAFETENSORS
    return (single,) if single.is_file() else None


def resolve_base(recipe: Recipe) -> Checkpoint | None:
    """The recipe's ``base_model`` as a full-model checkpoint, or None.

    Raises:
        SourceError: The folder is missing or holds no safetensors model.
    """
    if recipe.base_model is None:
        return None
    revision = None
    if hub.is_hf_ref(recipe.base_model):
        folder, revision = hub.download(hub.parse_hf_ref(recipe.base_model))
    else:
        folder = Path(recipe.base_model)
    with os_errors(f"base_model {recipe.base_model}", "cannot read the base model folder"):
        files = model_files(folder) if folder.is_dir() else None
    if files is None:
        raise SourceError(
            "base model folder not found or holds no model.safetensors[.index.json]",
            where=f"base_model {recipe.base_model}",
            fix="point base_model at a model folder saved with save_pretrained",
        )
    return Checkpoint(
        ref=recipe.base_model,
        path=folder,
        name="base",
        step=None,
        metrics={},
        metrics_source="none",
        weight=None,
        files=files,
        kind="full",
        revision=revision,
    )


@dataclass(frozen=True)
class Checkpoint:
    """One resolved input checkpoint.

    Attributes:
        ref: The reference as written in the recipe.
        path: The local folder.
        name: A short, unique name for messages and tables.
        step: Training step (trainer_state.json or folder name), if known.
        metrics: Metrics for weighting (recipe values override trainer_state.json).
        metrics_source: Where the metrics came from.
        weight: The recipe's explicit weight, if any.
        files: The weights files: one for an adapter (a legacy ``.bin`` is converted once
            into a cached safetensors file so planning and streaming work the same), the
            shards in index order for a full model.
        kind: ``adapter`` (PEFT folder) or ``full`` (a whole model's weights).
        revision: For a Hub source, the commit sha ``ref`` resolved to (``ref`` stays as
            written); None for a local folder.
    """

    ref: str
    path: Path
    name: str
    step: int | None
    metrics: dict[str, float] = field(hash=False)
    metrics_source: str
    weight: float | list[float] | None
    files: tuple[Path, ...]
    kind: Kind = "adapter"
    revision: str | None = None

    @property
    def pinned_ref(self) -> str:
        """The reference that fetches the same bytes again: ``hf://org/repo@<sha>/subfolder``
        for a Hub source, the absolute folder for a local one."""
        if self.revision is not None and hub.is_hf_ref(self.ref):
            return hub.pin(self.ref, self.revision)
        return str(self.path.resolve())


def discover(select: Select) -> list[Path]:
    """The ``checkpoint-<step>/`` folders of a run that ``select`` keeps, sorted by step.

    Raises:
        SourceError: The run folder is missing, or no checkpoint is left after filtering.
    """
    run = Path(select.run)
    where = f"select.run {select.run}"
    with os_errors(where, "cannot list the run folder"):
        if not run.is_dir():
            raise SourceError(
                "run folder not found",
                where=where,
                fix="point select.run at the Trainer output_dir that holds checkpoint-<step>/ "
                "folders",
            )
        found = sorted(
            (int(m.group(1)), p)
            for p in run.iterdir()
            if (m := _CHECKPOINT_DIR.match(p.name)) and p.is_dir()
        )
    return _apply_select(found, select)


def _apply_select(found: list[tuple[int, _T]], select: Select) -> list[_T]:
    """Filter (step, item) pairs sorted by step: ``steps`` range, then ``every``, then ``last``."""
    if not found:
        raise SourceError(
            "no checkpoint-<step>/ folders in the run",
            where=f"select.run {select.run}",
            fix="check the path, or list the folders under `checkpoints:`",
        )
    if select.steps is not None:
        lo, hi = select.steps
        found = [(s, p) for s, p in found if lo <= s <= hi]
    if select.every is not None:
        found = found[:: select.every]
    if select.last is not None:
        found = found[-select.last :]
    if not found:
        raise SourceError(
            "select kept no checkpoint",
            where=f"select.run {select.run}",
            fix="widen `steps:`, or lower `every:`",
        )
    return [p for _, p in found]


def discover_hub(select: Select) -> list[str]:
    """The ``checkpoint-<step>`` folders of a Hub repo that ``select`` keeps, sorted by step.

    Returns:
        Their references, ``hf://org/repo[@revision]/checkpoint-<step>``, as written (unpinned).

    Raises:
        SourceError: No checkpoint is left after filtering.
        HubError: The repo cannot be listed (not found, gated, offline with nothing cached, …).
    """
    ref = hub.parse_hf_ref(select.run)
    paths = hub.list_checkpoints(ref.repo_id, ref.revision, ref.subfolder)
    found = [(int(p.rsplit("-", 1)[1]), p) for p in paths]
    kept = _apply_select(found, select)
    return [str(hub.HfRef(ref.repo_id, ref.revision, p)) for p in kept]


def _weights_file(folder: Path, ref: str, allow_pickle: bool) -> Path:
    st = folder / ADAPTER_SAFETENSORS
    if st.is_file():
        return st
    pk = folder / ADAPTER_PICKLE
    if pk.is_file():
        if not allow_pickle:
            raise SourceError(
                "only a pickle adapter_model.bin found",
                where=ref,
                fix="convert it to safetensors, or set `allow_pickle: true` in the recipe "
                "(it is loaded with torch.load(weights_only=True))",
            )
        from mwakit.io.reader import pickle_as_safetensors  # torch, only for legacy inputs

        return pickle_as_safetensors(pk)
    raise SourceError(
        f"no {ADAPTER_SAFETENSORS} in the folder",
        where=ref,
        fix="point at a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)",
    )


def _resolve_one(
    spec: CheckpointSpec,
    loss_window: LossWindow,
    allow_pickle: bool,
    local: tuple[Path, str] | None = None,
) -> Checkpoint:
    """Resolve one checkpoint; ``local`` is the downloaded folder and sha of a Hub source."""
    folder = Path(spec.path) if local is None else local[0]
    name = folder.name
    if local is not None:
        ref = hub.parse_hf_ref(spec.path)
        name = ref.subfolder.rsplit("/", 1)[-1] if ref.subfolder else ref.repo_id.split("/")[1]
    with os_errors(spec.path):
        return _read_one(spec, folder, name, loss_window, allow_pickle, local)


def _read_one(
    spec: CheckpointSpec,
    folder: Path,
    name: str,
    loss_window: LossWindow,
    allow_pickle: bool,
    local: tuple[Path, str] | None,
) -> Checkpoint:
    if not folder.is_dir():
        raise SourceError(
            "checkpoint path is a file, not a folder"
            if folder.exists()
            else "checkpoint folder not found",
            where=spec.path,
            fix="check the path (relative paths are relative to the current directory)",
        )
    kind: Kind = "adapter"
    if (folder / ADAPTER_CONFIG).is_file():
        files: tuple[Path, ...] = (_weights_file(folder, spec.path, allow_pickle),)
    else:
        found = model_files(folder)
        if found is None:
            raise SourceError(
                f"neither {ADAPTER_CONFIG} nor model.safetensors[.index.json] in the folder",
                where=spec.path,
                fix="point at a PEFT adapter folder (e.g. a Trainer checkpoint-<step>/ of a LoRA "
                "run) or a model folder saved with save_pretrained(safe_serialization=True)",
            )
        kind, files = "full", found
    read = read_metrics(folder, loss_window=loss_window)
    metrics = dict(read.metrics)
    if spec.metrics:
        metrics.update(spec.metrics)
        source = "recipe" if not read.metrics else f"recipe + {read.source or 'folder name'}"
    else:
        source = read.source or ("folder name" if read.metrics else "none")
    step = read.step if read.step is not None else step_from_name(name)
    return Checkpoint(
        ref=spec.path,
        path=folder,
        name=name,
        step=step,
        metrics=metrics,
        metrics_source=source,
        weight=spec.weight,
        files=files,
        kind=kind,
        revision=None if local is None else local[1],
    )


def _download_all(
    specs: list[CheckpointSpec], recipe: Recipe, problems: Problems
) -> dict[str, tuple[Path, str]]:
    """Download the Hub sources among ``specs``: one snapshot per repo and revision.

    Returns:
        Reference → (local folder, commit sha) for every ``hf://`` spec that downloaded; the
        failures are recorded in ``problems``.
    """
    files = list(hub.CHECKPOINT_FILES)
    if recipe.allow_pickle:
        files.append(ADAPTER_PICKLE)
    fisher = recipe.params.get("fisher_file")
    if isinstance(fisher, str) and fisher not in files:
        files.append(fisher)
    groups: dict[tuple[str, str | None], list[str]] = {}
    for spec in specs:
        if hub.is_hf_ref(spec.path):
            ref = hub.parse_hf_ref(spec.path)
            groups.setdefault((ref.repo_id, ref.revision), []).append(spec.path)
    out: dict[str, tuple[Path, str]] = {}
    for (repo_id, revision), texts in groups.items():
        refs = [hub.parse_hf_ref(t) for t in texts]
        with problems.collect():
            root, sha = hub.fetch(repo_id, revision, [r.subfolder for r in refs], files)
            for text, ref in zip(texts, refs, strict=True):
                folder = root / ref.subfolder if ref.subfolder else root
                with problems.collect():
                    if not folder.is_dir() or not any(folder.iterdir()):
                        raise hub.missing_folder(ref, sha)
                    out[text] = (folder, sha)
    return out


def _unique_names(checkpoints: list[Checkpoint]) -> list[Checkpoint]:
    # Checkpoints of different runs often share a folder name (checkpoint-500): prefix the
    # parent folder until names are unique, so messages and tables stay unambiguous.
    names = [c.name for c in checkpoints]
    if len(set(names)) == len(names):
        return checkpoints
    out = []
    for c in checkpoints:
        if c.revision is not None and hub.is_hf_ref(c.ref):
            ref = hub.parse_hf_ref(c.ref)
            parts = (ref.repo_id.split("/")[1], *(ref.subfolder or "").split("/"))
        else:
            parts = c.path.resolve().parts
        out.append(
            Checkpoint(**{**c.__dict__, "name": "/".join(parts[-2:]) if len(parts) > 1 else c.name})
        )
    if len({c.name for c in out}) != len(out):
        return [Checkpoint(**{**c.__dict__, "name": c.ref}) for c in checkpoints]
    return out


def checkpoint_specs(recipe: Recipe) -> list[CheckpointSpec]:
    """The recipe's checkpoints: its list, or the folders ``select:`` discovers.

    Raises:
        SourceError: The run folder is missing or unreadable, or ``select`` keeps nothing.
        HubError: A Hub run cannot be listed.
    """
    if recipe.select is not None and hub.is_hf_ref(recipe.select.run):
        return [CheckpointSpec(path=r) for r in discover_hub(recipe.select)]
    if recipe.select is not None:
        return [CheckpointSpec(path=str(p)) for p in discover(recipe.select)]
    assert recipe.checkpoints is not None  # the recipe's schema requires one of the two
    return list(recipe.checkpoints)


def resolve(
    recipe: Recipe,
    *,
    specs: list[CheckpointSpec] | None = None,
    problems: Problems | None = None,
) -> list[Checkpoint]:
    """Resolve every checkpoint of a recipe to a local folder with its metrics.

    Hub sources are downloaded first (only the files a checkpoint needs), one snapshot per
    repo and revision. Every checkpoint is tried, so one call finds every missing folder.

    Args:
        recipe: The validated recipe.
        specs: The checkpoints, if already discovered (`checkpoint_specs`).
        problems: Where to record what fails and carry on (`mwakit.validate`); None raises.

    Returns:
        The checkpoints that resolved, in recipe order (all of them unless ``problems`` got
        some).

    Raises:
        SourceError: A folder or file is missing or unreadable (without ``problems``).
        HubError: A Hub source cannot be listed or downloaded (without ``problems``).
        PlanError: The same checkpoint is listed twice (without ``problems``).
    """
    col = Problems() if problems is None else problems
    if specs is None:
        with col.collect():
            specs = checkpoint_specs(recipe)
    local: dict[str, tuple[Path, str]] = {}
    if specs:
        local = _download_all(specs, recipe, col)
    resolved: list[tuple[int, Checkpoint]] = []
    for i, s in enumerate(specs or []):
        if hub.is_hf_ref(s.path) and s.path not in local:
            continue  # its download failed, and that is recorded
        with col.collect():
            c = _resolve_one(s, recipe.loss_window, recipe.allow_pickle, local.get(s.path))
            resolved.append((i, c))
    with col.collect():
        _check_duplicates(resolved, recipe.select is None)
    if problems is None:
        col.raise_if_any()
    return _unique_names([c for _, c in resolved])


def _check_duplicates(resolved: list[tuple[int, Checkpoint]], listed: bool) -> None:
    """The same folder twice (through another spelling, a symlink, or one Hub commit under two
    revision names) would count twice: refuse it, naming both entries."""
    seen: dict[str, tuple[int, Checkpoint]] = {}
    for i, c in resolved:
        key = os.path.realpath(c.path)
        if key in seen:
            j, first = seen[key]
            entry = (lambda k: f"checkpoints.{k}") if listed else (lambda k: f"select #{k}")
            raise PlanError(
                f"is the same checkpoint as {entry(j)} ({first.ref}), so it would count twice",
                where=f"{entry(i)} {c.ref}",
                fix="list each checkpoint once (to weigh one more, give it a larger weight: "
                "with a method that takes weights)",
            )
        seen[key] = (i, c)
