"""`mwakit init`: a complete, commented recipe for the checkpoints of a run or a Hub repo.

The recipe lists the checkpoints it found explicitly, each with its metrics as a comment, so
the user sees what MWA will weigh before running anything. Hub checkpoints are pinned to the
commit they were found at. The text is valid for `mwakit validate`, `plan` and `run` as is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mwakit import __version__, hub
from mwakit.errors import SourceError, UsageError
from mwakit.methods import get_method, method_names
from mwakit.recipe import Select
from mwakit.sources import _CHECKPOINT_DIR, ADAPTER_CONFIG, discover
from mwakit.trainer_state import read_metrics

#: Metrics shown after the weighting one, in this order, when present.
_SHOWN = ("loss", "eval_loss", "step", "epoch")


@dataclass(frozen=True)
class Found:
    """A checkpoint found by `scaffold`: its recipe path, step, metrics and LoRA rank."""

    path: str
    step: int | None
    metrics: dict[str, float]
    rank: int | None


def _q(text: str) -> str:
    """A YAML scalar for any string (JSON strings are valid YAML)."""
    return json.dumps(text, ensure_ascii=False)


def _c(code: str, comment: str) -> str:
    """A YAML line with its comment aligned."""
    return f"{code:<26}  # {comment}"


def _rank(folder: Path) -> int | None:
    try:
        r = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("r")
    except (OSError, ValueError, AttributeError):
        return None
    return r if isinstance(r, int) else None


def _found(path: str, folder: Path) -> Found:
    read = read_metrics(folder)
    return Found(path, read.step, dict(read.metrics), _rank(folder))


def _checkpoint_dirs(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if _CHECKPOINT_DIR.match(p.name) and p.is_dir()]
    except OSError:
        return []


def run_folder(target: str) -> str:
    """The run folder of ``target``: itself when it holds ``checkpoint-<step>/`` folders, else
    the one subfolder that does (``examples/make_run.py OUT`` writes ``OUT/run/``).

    When several subfolders hold checkpoints, the only one of adapters wins (``OUT/run``
    beside ``OUT/full`` of ``make_run.py --full``); otherwise the choice is the user's.

    Raises:
        UsageError: Several subfolders hold checkpoints and none stands out.
    """
    folder = Path(target)
    if not folder.is_dir() or _checkpoint_dirs(folder):
        return target  # `discover` reports a missing or empty run with its own message
    try:
        subs = sorted(p for p in folder.iterdir() if p.is_dir() and _checkpoint_dirs(p))
    except OSError:
        return target
    if len(subs) > 1:
        adapters = [
            s for s in subs if any((c / ADAPTER_CONFIG).is_file() for c in _checkpoint_dirs(s))
        ]
        if len(adapters) != 1:
            names = ", ".join(str(folder / s.name) for s in subs)
            raise UsageError(
                f"{len(subs)} subfolders hold checkpoint-<step>/ folders: {names}",
                where=target,
                fix=f"give one of them, e.g. `mwakit init {folder / subs[0].name}`",
            )
        subs = adapters
    return str(folder / subs[0].name) if subs else target


def find_checkpoints(target: str, last: int) -> tuple[list[Found], int, str]:
    """The last ``last`` checkpoints of a run folder or Hub repo.

    Returns:
        The checkpoints, how many the run holds, and a short description of where they are
        (for Hub repos: pinned to the commit they were found at).

    Raises:
        SourceError: No ``checkpoint-<step>/`` folder.
        HubError: The repo cannot be listed or downloaded.
    """
    if hub.is_hf_ref(target):
        ref = hub.parse_hf_ref(target)
        subs = hub.list_checkpoints(ref.repo_id, ref.revision, ref.subfolder)
        if not subs:
            raise SourceError(
                "no checkpoint-<step>/ folders in the repo",
                where=target,
                fix="point at the repo (or folder) that holds the Trainer's checkpoint-* folders",
            )
        kept = subs[-last:]
        # Only the small files: metrics and the adapter config (for its rank).
        root, sha = hub.fetch(
            ref.repo_id, ref.revision, kept, files=("trainer_state.json", ADAPTER_CONFIG)
        )
        found = [_found(str(hub.HfRef(ref.repo_id, sha, s)), root / s) for s in kept]
        return found, len(subs), f"{ref.repo_id} at commit {sha}"
    all_dirs = discover(Select(run=target))
    kept_dirs = all_dirs[-last:]
    return [_found(str(p), p) for p in kept_dirs], len(all_dirs), target


def _comment(f: Found, metric: str) -> str:
    names = [metric, *(m for m in _SHOWN if m != metric)]
    parts = [f"{m}={f.metrics[m]:.6g}" for m in names if m in f.metrics]
    if metric not in f.metrics:
        parts.insert(0, f"NO `{metric}` (give metrics: {{{metric}: ...}})")
    return ", ".join(parts) or "no trainer_state.json metrics"


def _run_name(target: str) -> str:
    if hub.is_hf_ref(target):
        ref = hub.parse_hf_ref(target)
        return ref.repo_id.split("/")[1]
    return Path(target).resolve().name or "run"


def scaffold(
    target: str,
    *,
    method: str = "mwa",
    metric: str = "loss",
    penalty: float = 0.7,
    last: int = 10,
    output: str | None = None,
) -> str:
    """A complete, commented recipe (YAML text) for the last checkpoints of ``target``.

    Args:
        target: A run folder holding ``checkpoint-<step>/`` folders, or
            ``hf://org/repo[@revision][/subfolder]``.
        method: The merge method. ``mwa`` weighs by ``metric`` itself; any other method gets
            ``weighting: {mwa: ...}`` with the same metric and penalty.
        metric: The metric that weighs the checkpoints.
        penalty: MWA's penalty p.
        last: How many of the latest checkpoints to list.
        output: ``output.path``; default ``out/<run>-<method>``.

    Raises:
        UsageError: Unknown method, or a negative penalty.
        SourceError: No checkpoint found.
        HubError: A Hub repo cannot be listed or downloaded.
    """
    if method not in method_names():
        raise UsageError(
            f"unknown method {method!r}",
            where="--method",
            fix=f"use one of: {', '.join(method_names())}",
        )
    if penalty < 0:
        raise UsageError("the penalty must be >= 0", where="--penalty", fix="e.g. --penalty 0.7")
    if hub.is_hf_ref(target):
        try:
            hub.parse_hf_ref(target)
        except ValueError as err:
            raise UsageError(str(err), where="RUN_DIR_OR_HF_REF", fix="e.g. hf://org/repo") from err
    name = f"{_run_name(target)}-{method}"  # the folder the user named, not its run/ below
    if not hub.is_hf_ref(target):
        target = run_folder(target)
    found, total, where = find_checkpoints(target, last)
    m = get_method(method)
    lines = [
        f"# mwakit recipe for {where}, written by `mwakit init` (mwakit {__version__}).",
        "# Check: mwakit validate FILE   Preview: mwakit plan FILE   Merge: mwakit run FILE",
        f"name: {_q(name)}",
        _c(f"method: {method}", m.summary),
    ]
    if method == "mwa":
        lines += [
            "params:",
            _c(f"  metric: {_q(metric)}", "the metric that weighs each checkpoint"),
            _c(f"  penalty: {penalty}", "p >= 0: 0 = uniform, larger favours better ones"),
            _c("  transform: power", "power | softmax | rank (`mwakit methods`)"),
        ]
    else:
        defaults: dict[str, Any] = m.params().model_dump(mode="json", exclude_none=True)
        lines.append(_c("params:" + ("" if defaults else " {}"), "the method's defaults"))
        lines += [f"  {k}: {json.dumps(v)}" for k, v in defaults.items()]
        lines += [
            _c("weighting:", "per-checkpoint weights from MWA, fed to the method"),
            f"  mwa: {{metric: {_q(metric)}, penalty: {penalty}}}",
        ]
    lines.append(
        _c("checkpoints:", f"the last {len(found)} of {total}, by step; metrics as comments")
    )
    lines += [f"  - {_q(f.path)}  # {_comment(f, metric)}" for f in found]
    if not hub.is_hf_ref(target):
        lines.append(f"# select: {{run: {_q(target)}, last: {last}}}  # or pick them at run time")
    if "factors" in m.spaces:
        lines.append(_c("lora_space: factors", "factors (same rank) | delta (exact ΔW)"))
    else:
        rank = max((f.rank for f in found if f.rank), default=16)
        lines += [
            _c("lora_space: delta", "the method acts on each ΔW = s·B·A"),
            _c("delta_rank: concat", "exact: rank Σr")
            if m.linear
            else _c(f"delta_rank: {rank}", "output rank (error in the card); `full`: exact ΔW"),
        ]
    lines += [
        _c("dtype: float32", "compute dtype"),
        _c("device: auto", "cpu | cuda | cuda:N | auto"),
        "output:",
        f"  path: {_q(output or f'out/{name}')}",
        _c("  overwrite: false", "or pass --force"),
        f"  # hub: {{repo_id: your-name/{name}, private: true}}  # push after the merge",
        "",
    ]
    return "\n".join(lines)
