"""The weights plot: each checkpoint's merge weight against the metric that weighted it.

A PNG — the model card's ``weights.png``, or ``mwakit plan --plot FILE.png`` — is drawn with
Pillow in this process (`mwakit.plot_png`); SVG and PDF with matplotlib's object-oriented API
on the Agg canvas (no pyplot, no global backend change), imported only when one is drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mwakit.errors import OutputError
from mwakit.io.atomic import replace_file

if TYPE_CHECKING:
    from mwakit.planner import Plan

PLOT_FILE = "weights.png"
#: The formats `--plot` can write, by file extension, and the metadata that would make two
#: drawings of the same plot differ (software version, creation date).
PLOT_FORMATS: dict[str, dict[str, Any]] = {
    "png": {"Software": None},
    "svg": {"Date": None},
    "pdf": {"CreationDate": None, "Producer": None},
}


def plot_metric(plan: Plan) -> str | None:
    """The metric that weighted the checkpoints (MWA's ``metric``), or None."""
    if plan.recipe.weighting is not None:
        from mwakit.methods.mwa import Params as MwaParams

        return str(plan.recipe.weighting.mwa.get("metric", MwaParams().metric))
    metric = getattr(plan.params, "metric", None)
    return metric if isinstance(metric, str) else None


def _axis(plan: Plan) -> tuple[str, list[float]]:
    """The x axis: the weighting metric, else the step, else the checkpoint's position."""
    metric = plot_metric(plan)
    for name in (metric, "step"):
        if name is None:
            continue
        xs = [
            c.metrics.get(name, float(c.step) if name == "step" and c.step is not None else None)
            for c in plan.checkpoints
        ]
        if all(x is not None for x in xs):
            return name, [float(x) for x in xs if x is not None]
    return "checkpoint", [float(i) for i in range(len(plan.checkpoints))]


def plot_caption(plan: Plan) -> str:
    """What the plot shows, in words: ``weight of each checkpoint against loss``.

    Without a metric or a step for every checkpoint (an unweighted merge of plain adapter
    folders) the points are in the recipe's order, and the caption says so.
    """
    name, _ = _axis(plan)
    if name == "checkpoint":
        return "weight of each checkpoint, in the recipe's order"
    return f"weight of each checkpoint against {name}"


def plot_data(plan: Plan) -> dict[str, Any]:
    """What the plot shows, as plain data: x axis name and values, weights, labels, title."""
    name, xs = _axis(plan)
    return {
        "name": "checkpoint (position in the recipe)" if name == "checkpoint" else name,
        "xs": xs,
        "ws": list(plan.weights),
        "labels": [f"step {c.step}" if c.step is not None else c.name for c in plan.checkpoints],
        "title": f"{plan.method.name}: {plot_caption(plan)}",
    }


def plot_format(path: str | Path) -> str:
    """The format of a plot file, from its extension.

    Raises:
        UsageError: The extension is not one of .png, .svg or .pdf.
    """
    from mwakit.errors import UsageError

    fmt = Path(path).suffix.lower().removeprefix(".")
    if fmt not in PLOT_FORMATS:
        given = f"extension .{fmt}" if fmt else "no extension"
        raise UsageError(
            f"the plot file has {given}: mwakit draws {', '.join(PLOT_FORMATS)}",
            where=str(path),
            fix="end the file name with .png, .svg or .pdf",
        )
    return fmt


def draw(data: dict[str, Any], path: str | Path, fmt: str | None = None) -> Path:
    """Draw `plot_data`'s figure into a file: PNG, or ``fmt`` (``svg``, ``pdf``).

    A PNG (the model card's, and ``mwakit plan --plot x.png``) is drawn with Pillow in this
    process (`mwakit.plot_png`, ≈ 0.15 CPU-s); SVG and PDF with matplotlib, whose import alone
    takes ≈ 0.45 s.
    """
    if (fmt or "png") == "png":
        from mwakit.plot_png import draw_png

        return draw_png(data, path)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    xs, ws = data["xs"], data["ws"]
    fig = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.vlines(xs, 0, ws, colors="#9db4d3", linewidth=2)
    ax.plot(xs, ws, "o", color="#1f5fa8")
    for label, x, w in zip(data["labels"], xs, ws, strict=True):
        ax.annotate(label, (x, w), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=8)  # fmt: skip
    ax.set_xlabel(data["name"])
    ax.set_ylabel("weight")
    ax.set_ylim(min([*ws, 0.0]) * 1.2, max([*ws, 0.0]) * 1.2 or 1.0)
    ax.set_title(data["title"])
    ax.grid(alpha=0.3)
    out = Path(path)
    # No version or date entries, so the file does not change with the matplotlib version.
    fmt = fmt or "png"
    import matplotlib

    # A fixed salt for the SVG's element ids: the same plot gives the same bytes.
    with matplotlib.rc_context({"svg.hashsalt": "mwakit"}):
        fig.savefig(out, format=fmt, metadata=PLOT_FORMATS[fmt])
    return out


def plot_weights(plan: Plan, path: str | Path, fmt: str | None = None) -> Path:
    """Draw each checkpoint's weight against its metric value into a PNG file.

    Points are labelled with the step (or name) of their checkpoint; the x axis is the MWA
    metric, else the step, else the checkpoint's position in the recipe.

    Args:
        plan: The merge plan (its checkpoints, metrics and final weights).
        path: The file to write.
        fmt: ``png`` (default), ``svg`` or ``pdf``.

    Returns:
        The path written.
    """
    return draw(plot_data(plan), path, fmt)


def check_plot_path(path: str | Path) -> None:
    """Refuse a plot file that cannot be written, before any work.

    Raises:
        UsageError: The extension is not .png, .svg or .pdf.
        OutputError: The path is a folder, or its folder is missing or not a folder.
    """
    plot_format(path)
    target = Path(path)
    parent = target.parent
    if target.is_dir():
        raise OutputError(
            "the plot path is a folder", where=str(target), fix="give a file name, e.g. weights.png"
        )
    if not parent.is_dir():
        raise OutputError(
            f"folder {parent} {'is not a folder' if parent.exists() else 'does not exist'}",
            where=str(target),
            fix="create the folder first, or write the plot elsewhere",
        )


def save_plot(plan: Plan, path: str | Path) -> Path:
    """`plot_weights` into ``path`` atomically: drawn beside it, renamed when complete.

    The format follows the extension (`plot_format`).

    Raises:
        UsageError: The extension is not .png, .svg or .pdf.
        OutputError: The path cannot be written (`check_plot_path`, or the OS refuses).
    """
    check_plot_path(path)
    target = Path(path)
    fmt = plot_format(target)
    try:
        replace_file(target, lambda tmp: plot_weights(plan, tmp, fmt), suffix=f".{fmt}")
    except OSError as err:
        raise OutputError(
            f"cannot write the plot: {err.strerror or err}",
            where=str(target),
            fix="write it into a folder you can write to (--plot PATH)",
        ) from err
    return target
