"""The model card (README.md) and the resolved recipe written beside a merged checkpoint.

The card's YAML front matter is what the Hub reads for a merged adapter (``base_model``,
``base_model_relation: adapter``, ``library_name: peft``, ``tags``, ``pipeline_tag``); the body
says what was merged and how, with a table of checkpoints, the weights plot, the sha256 of every
input file, and the recipe as run with the command that reproduces it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mwakit import __version__, layer_params
from mwakit.planner import Plan
from mwakit.plot import PLOT_FILE, plot_caption, plot_metric, plot_weights
from mwakit.recipe import Recipe
from mwakit.sources import Checkpoint
from mwakit.wording import plural

RESOLVED_RECIPE = "mwakit.yaml"
CARD_FILE = "README.md"

#: PEFT ``task_type`` → the Hub's ``pipeline_tag``.
PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20
#: Logged values that say nothing about a checkpoint's quality, left out of the table.
_NOISE = (
    "epoch",
    "grad_norm",
    "learning_rate",
    "eval_runtime",
    "eval_samples_per_second",
    "eval_steps_per_second",
)

_READINGS = {
    "power": "w_i = q_i^p / Σ_j q_j^p with q = 1/metric for lower-is-better metrics, q = metric "
    "otherwise (computed as softmax(p·log q))",
    "softmax": "w_i ∝ exp(−p·m_i) for lower-is-better metrics, exp(p·m_i) otherwise",
    "rank": "w_i ∝ p^rank_i, rank 0 = the best checkpoint",
}


def rerun_path(folder: Path) -> str:
    """``output.path`` of the resolved recipe in ``folder``: a sibling, ``../NAME-rerun``.

    Re-running the recipe from its folder then neither nests a copy inside it nor replaces
    the folder it is read from, and the two results sit side by side to compare.
    """
    return f"../{Path(os.path.abspath(folder)).name}-rerun"


def _portable(ref: str, folder: Path | None) -> str:
    """A local input's path relative to ``folder`` when they share a parent below the root
    (a project folder), else as is (absolute); Hub references as is."""
    from mwakit.hub import is_hf_ref

    if folder is None or is_hf_ref(ref):
        return ref
    target = Path(os.path.abspath(ref)).resolve()
    root = Path(os.path.abspath(folder)).resolve()
    try:
        common = Path(os.path.commonpath([target, root]))
    except ValueError:  # different drives
        return ref
    if common == Path(common.anchor):
        return ref
    return os.path.relpath(target, root)


def resolved_recipe(plan: Plan, folder: Path | None = None) -> Recipe:
    """The recipe as run: explicit checkpoints with the metrics used.

    Local checkpoints get absolute paths, Hub ones ``hf://org/repo@<sha>/subfolder`` pinned to
    the commit they resolved to, so a re-run fetches exactly the same bytes. Re-running it
    reproduces the merge even when ``select:`` would now find other folders or trainer_state.json
    files are gone. ``output.hub`` is dropped: re-running a published recipe must not publish.

    Args:
        plan: The plan that ran.
        folder: The output folder the recipe is written into. Given, local paths are made
            relative to it where they share a parent below the root (``relative_to:
            recipe``), so the output folder and its inputs can move together, to another
            machine too, and ``output.path`` becomes `rerun_path`.
    """
    data = plan.recipe.to_yaml_dict()
    data.pop("select", None)
    data["output"].pop("hub", None)
    if plan.base is not None:
        data["base_model"] = _portable(plan.base.pinned_ref, folder)
    if folder is not None:
        data["relative_to"] = "recipe"
        data["output"]["path"] = rerun_path(folder)
    data["checkpoints"] = [
        {
            "path": _portable(c.pinned_ref, folder),
            **({"metrics": dict(c.metrics)} if c.metrics else {}),
            **({"weight": c.weight} if c.weight is not None else {}),
        }
        for c in plan.checkpoints
    ]
    # Per-layer lists stay lists (plan.params holds their values at depth 0).
    data["params"] = {
        **plan.params.model_dump(mode="json", exclude_none=True),
        **layer_params.lists_in(plan.recipe.params),
    }
    return Recipe.model_validate(data)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A GitHub-flavoured Markdown table: header, separator and rows with the same cell count.

    A ``|`` inside a cell is escaped, so a name cannot add a column.
    """

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    for row in rows:
        if len(row) != len(header):  # a bug in the caller: a broken table is never written
            raise ValueError(f"row of {len(row)} cells under a header of {len(header)}")
    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.6g}"


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks.

    A file in a Hub cache snapshot links to ``blobs/<sha256>`` when it is stored with LFS/Xet
    (every weights file): that name is the sha256 the Hub checked at download, so it is used
    as is instead of reading the file again.
    """
    digest = known_digest(path)
    if digest is not None:
        return digest
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    remember_digest(path, digest)
    return digest


def known_digest(path: Path) -> str | None:
    """The sha256 of a file when it is known without reading it: a Hub blob's name, or the
    digest cache's entry for this exact file version (`_digest_cache`); else None."""
    if path.is_symlink():
        target = path.resolve()
        if target.parent.name == "blobs" and _SHA256.match(target.name):
            return target.name
    cached = _digest_cache(path)
    if cached is not None and cached.is_file():
        with contextlib.suppress(OSError, UnicodeDecodeError):
            digest = cached.read_text(encoding="ascii").strip()
            if _SHA256.match(digest):
                return digest
    return None


def remember_digest(path: Path, digest: str) -> None:
    """Record a file's sha256 in the digest cache (best effort: a read-only or full cache
    folder only costs the next run a re-hash)."""
    cached = _digest_cache(path)
    if cached is None:
        return
    with contextlib.suppress(OSError):
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}")
        tmp.write_text(digest, encoding="ascii")
        tmp.replace(cached)


def _digest_cache(path: Path) -> Path | None:
    """Where the sha256 of this exact file version is remembered, or None (cache off).

    Keyed like git's index: path, size, mtime and inode. Re-running a merge (the usual MWA
    loop: change the penalty, run again) then costs no second read of gigabytes of inputs.
    ``MWAKIT_CACHE`` moves the cache (default ``$XDG_CACHE_HOME/mwakit``); ``off`` disables it.
    """
    root = os.environ.get("MWAKIT_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mwakit"
    )
    if root == "off":
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    name = hashlib.sha256(key.encode()).hexdigest()
    return Path(root) / "sha256" / name[:2] / name


def _inputs(c: Checkpoint) -> list[Path]:
    extra = [c.path / n for n in ("adapter_config.json", "trainer_state.json")]
    return [*c.files, *(f for f in extra if f.is_file())]


def fingerprint_files(plan: Plan) -> list[tuple[str, Path]]:
    """(checkpoint, file) of every input file the card fingerprints: weights, adapter config,
    trainer state, and the base model's weights."""
    cks = [*plan.checkpoints, *([plan.base] if plan.base is not None else [])]
    return [(c.name, f) for c in cks for f in _inputs(c)]


def fingerprints(
    plan: Plan, digests: Mapping[Path, str] | None = None
) -> list[tuple[str, str, str, int]]:
    """(checkpoint, file name, sha256, size) of every `fingerprint_files` file.

    Args:
        plan: The merge plan.
        digests: sha256 already computed (e.g. streamed by `mwakit.io.hashing.StreamHasher`
            while the merge read the file); any other file is hashed here (`sha256_file`).
    """
    known = digests or {}
    return [
        (name, f.name, known.get(f) or sha256_file(f), f.stat().st_size)
        for name, f in fingerprint_files(plan)
    ]


def _front_matter(plan: Plan) -> dict[str, Any]:
    front: dict[str, Any] = {}
    full = plan.kind == "full"
    base = plan.base_model
    # The Hub accepts only repo ids here; a local path (the usual adapter base in tests or
    # offline work) is named in the body instead.
    if base and _REPO_ID.match(base) and not Path(base).exists():
        front["base_model"] = base
        front["base_model_relation"] = "merge" if full else "adapter"
    front["library_name"] = "transformers" if full else "peft"
    front["tags"] = ["mwakit", "merge", *([] if full else ["lora"]), plan.method.name]
    task = plan.adapter_config.get("task_type") if not full else None
    if isinstance(task, str) and task in PIPELINE_TAGS:
        front["pipeline_tag"] = PIPELINE_TAGS[task]
    return front


Fingerprints = list[tuple[str, str, str, int]]


def write_assets(plan: Plan, folder: Path, streamed: Collection[Path] = ()) -> dict[Path, str]:
    """Draw the weights plot into ``folder`` and hash every input file not ``streamed``.

    Neither depends on the merge's result, so `mwakit.api.run` runs this on a background
    thread while the merge streams. The files the merge reads are hashed from the bytes it
    reads (``streamed``, see `mwakit.io.hashing`); what is left here are small files (configs,
    trainer state) and inputs the method never reads (a base model of a linear merge).
    The plot is drawn here, with Pillow (`mwakit.plot_png`: ≈ 0.15 CPU-s; matplotlib in a
    child interpreter cost 0.8–1.0).

    Returns:
        The sha256 of each file hashed, by path.
    """
    skip = set(streamed)
    # hashlib releases the GIL: this overlaps the merge for real
    digests = {f: sha256_file(f) for _, f in fingerprint_files(plan) if f not in skip}
    plot_weights(plan, folder / PLOT_FILE)
    return digests


def write_card(
    plan: Plan,
    folder: Path,
    recipe_yaml: str,
    rel_errors: dict[str, float],
    prints: Fingerprints | None = None,
    rerun: str | None = None,
    solvers: dict[str, str] | None = None,
) -> list[Path]:
    """Write README.md (and, unless ``prints`` says `write_assets` ran, the plot).

    Returns:
        The files written.
    """
    if prints is None:
        prints = fingerprints(plan, write_assets(plan, folder))
    card = folder / CARD_FILE
    text = render_card(
        plan,
        recipe_yaml,
        rel_errors,
        plot=PLOT_FILE,
        fingerprints=prints,
        rerun=rerun,
        solvers=solvers,
    )
    card.write_text(text, encoding="utf-8")
    return [folder / PLOT_FILE, card]


def tuning_lines(tuning: dict[str, Any] | None) -> list[str]:
    """The card's "Tuning" section, from the recipe's ``tuning:`` block (`mwakit tune`): what
    the merge was chosen on and how it scored against the baselines."""
    if not tuning:
        return []
    metric = tuning.get("metric", "?")
    lines = ["", "## Tuning", ""]
    lines.append(
        f"Chosen by `{tuning.get('tool', 'mwakit tune')}` on held-out data, metric "
        f"`{metric}`: {tuning.get('reason', '')}".rstrip()
    )
    data = tuning.get("data") or {}
    if data:
        lines += ["", "| split | file | rows | sha256 |", "|---|---|---|---|"]
        for split, d in data.items():
            d = d if isinstance(d, dict) else {}
            name = Path(str(d.get("path", ""))).name
            lines.append(f"| {split} | `{name}` | {d.get('rows', '')} | `{d.get('sha256', '')}` |")
    results = tuning.get("results") or {}
    if results:
        lines += ["", f"| merge | candidate | VAL {metric} | TEST {metric} |", "|---|---|---|---|"]

        def cell(r: dict[str, Any], k: str) -> str:
            v, se = r.get(k), r.get(f"{k}_se")
            if not isinstance(v, int | float):
                return "—"
            return f"{v:.4f}" + (f" ± {se:.2g}" if isinstance(se, int | float) else "")

        for label, r in results.items():
            r = r if isinstance(r, dict) else {}
            lines.append(
                f"| {label} | {r.get('name', '')} | {cell(r, 'val')} | {cell(r, 'test')} |"
            )
        lines += ["", "± is one standard error over the rows. TEST was not used to choose."]
    return lines


def render_card(
    plan: Plan,
    recipe_yaml: str,
    rel_errors: dict[str, float],
    *,
    plot: str | None = None,
    fingerprints: Sequence[tuple[str, str, str, int]] = (),
    rerun: str | None = None,
    solvers: dict[str, str] | None = None,
) -> str:
    """README.md for the merged checkpoint: Hub front matter, method, checkpoints, recipe.

    Args:
        plan: The merge plan.
        recipe_yaml: The resolved recipe text (``mwakit.yaml``).
        rel_errors: Relative truncation error per module (delta space re-factorised).
        plot: The weights plot's file name in the folder, to link.
        fingerprints: (checkpoint, file, sha256, size) of each input file.
        rerun: Where the recipe re-runs to (its ``output.path``, relative to the folder),
            when its paths are relative to the folder (``relative_to: recipe``).
        solvers: How each dense ΔW was re-factorised (`mwakit.lowrank.Refactored.solver`).
    """
    full = plan.kind == "full"
    front = _front_matter(plan)
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
    title = plan.recipe.name or ("Merged model" if full else "Merged LoRA adapter")
    lines += [f"# {title}", ""]
    lines += [
        f"This {'model' if full else 'adapter'} was merged by "
        f"[mwakit](https://pypi.org/project/mwakit/) {__version__} "
        f"from {plural(len(plan.checkpoints), 'checkpoint')} with **{plan.method.name}** "
        f"({plan.method.summary}).",
        "",
        f"- Formula: `{plan.method.formula}`",
        f"- Reference: {plan.method.reference}",
    ]
    # A full merge with base_model names it once below, as θ_0 of the task vectors.
    theta0 = full and plan.base is not None
    if plan.base_model and "base_model" not in front and not theta0:
        lines.append(f"- Base model: `{plan.base_model}`")
    params = plan.params.model_dump(mode="json")
    mwa = params if plan.method.name == "mwa" else None
    raw_mwa = plan.recipe.params if mwa is not None else {}
    if plan.recipe.weighting is not None:
        from mwakit.methods.mwa import Params as MwaParams

        raw_mwa = plan.recipe.weighting.mwa
        mwa = layer_params.resolve(MwaParams, raw_mwa, 0.0).model_dump(mode="json")
        lines.append("- Weights: MWA (`weighting: {mwa: ...}`) feeding the method's weights")
    if mwa is not None and layer_params.is_list(raw_mwa.get("penalty")):
        # A per-layer penalty: say so rather than show only its first layer's value.
        mwa["penalty"] = f"{raw_mwa['penalty']} over the layers"
    if mwa is not None:
        lines.append(
            f"- Reading of MWA: `transform: {mwa['transform']}` — "
            f"{_READINGS[mwa['transform']]}; "
            f"metric `{mwa['metric']}`, penalty p = {mwa['penalty']}"
        )
    if full:
        if plan.base is not None:
            lines.append(f"- Base model (θ_0 of the task vectors): `{plan.base.ref}`")
    else:
        space = {
            "factors": "factors (A and B merged; same rank; scalings folded into B)",
            "concat": "delta, rank concatenation (the merged ΔW is exact)",
            "svd": f"delta, re-factorised to rank {plan.recipe.delta_rank} with QR + small SVD",
            "dense": f"delta: the method acts on each ΔW_i = s_i·B_i·A_i, the result is "
            f"re-factorised to rank {plan.recipe.delta_rank} with a truncated SVD (large "
            "modules: a randomized sketch certified within 1 % of the optimal error)",
            "full": "delta: the method acts on each ΔW_i = s_i·B_i·A_i and the merged ΔW is "
            "stored exactly, as full-rank factors (no truncation)",
        }[plan.lora_mode]
        lines.append(f"- LoRA space: {space}")
    if rel_errors and plan.lora_mode != "full":  # full: nothing truncated, every error 0
        worst = max(rel_errors.items(), key=lambda kv: kv[1])
        mean = sum(rel_errors.values()) / len(rel_errors)
        lines.append(
            f"- Truncation error (relative Frobenius): mean {mean:.3g}, max {worst[1]:.3g} "
            f"at `{worst[0]}`{solver_note(solvers or {})}"
        )
    metric_names = sorted({k for c in plan.checkpoints for k in c.metrics})
    # The weighting metric first, then the usual ones; step has its own column.
    first = list(dict.fromkeys([plot_metric(plan) or "loss", "loss", "eval_loss"]))
    shown = [m for m in first if m in metric_names and m != "step"] + [
        m for m in metric_names if m not in (*first, "step", *_NOISE)
    ][:3]
    lines += ["", "## Checkpoints", ""]
    rows = [
        [
            c.name,
            f"`{c.ref}`",
            f"`{c.revision}`" if c.revision else "local",
            "" if c.step is None else str(c.step),
            *(_fmt(c.metrics.get(m)) for m in shown),
            f"{w:.6f}",
        ]
        for c, w in zip(plan.checkpoints, plan.weights, strict=True)
    ]
    lines += markdown_table(["checkpoint", "source", "revision", "step", *shown, "weight"], rows)
    if plot:
        caption = plot_caption(plan)
        lines += ["", f"![{caption[0].upper()}{caption[1:]}]({plot})"]
    if plan.recipe.rules:
        lines += [
            "",
            "Per-tensor rules (first match wins) change the weights of matching tensors; "
            "see the recipe below.",
        ]
    lines += tuning_lines(plan.recipe.tuning)
    if plan.warnings:
        lines += ["", "## Notes", ""] + [f"- {w}" for w in plan.warnings]
    if fingerprints:
        lines += ["", "## Input fingerprints", ""]
        lines += markdown_table(
            ["checkpoint", "file", "bytes", "sha256"],
            [[c, f, str(n), f"`{h}`"] for c, f, h, n in fingerprints],
        )
    lines += ["", "## Reproduce", "", "```bash", f"pip install mwakit=={__version__}"]
    if rerun is not None:
        lines += [
            f"mwakit run {RESOLVED_RECIPE}   # in this folder; writes {rerun}",
            f'for f in *.safetensors; do cmp "$f" "{rerun}/$f"; done   # the same bytes',
        ]
    else:
        lines.append(f"mwakit run {RESOLVED_RECIPE}")
    lines += ["```", ""]
    if rerun is not None:
        lines += [
            f"Local paths in `{RESOLVED_RECIPE}` are relative to this folder (`relative_to: "
            "recipe`), so `mwakit run path/to/this/folder/mwakit.yaml` works from anywhere, and "
            "on another machine when the inputs keep their place relative to this folder; "
            "inputs with no common parent folder keep absolute paths.",
            "",
        ]
    lines += [
        f"The recipe as run (`{RESOLVED_RECIPE}` in this folder; Hub inputs pinned to the "
        "commit they resolved to, `output.hub` left out so a re-run does not publish):",
        "",
        "```yaml",
        recipe_yaml.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


_SOLVER_WORDS = {
    "randomized": "randomized sketch",
    "exact": "dense SVD",
    "fallback": "dense SVD after an uncertified sketch",
}


def solver_note(solvers: dict[str, str]) -> str:
    """``"; re-factorised by: 220 randomized sketch, 4 dense SVD"`` (empty without solvers)."""
    counts = [
        f"{sum(1 for v in solvers.values() if v == key)} {words}"
        for key, words in _SOLVER_WORDS.items()
        if key in solvers.values()
    ]
    return f"; re-factorised by: {', '.join(counts)}" if counts else ""
