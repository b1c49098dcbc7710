"""The tune plot: VAL against the MWA penalty (one line per variant) and the chosen weights.

matplotlib's object-oriented API on the Agg canvas, as `mwakit.plot`; written atomically.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mwakit.errors import OutputError
from mwakit.io.atomic import replace_file

if TYPE_CHECKING:
    from mwakit.tune.candidates import Space
    from mwakit.tune.run import _Tuner
    from mwakit.tune.select import Choice


def plot_data(tuner: _Tuner, choice: Choice, space: Space) -> dict[str, Any]:
    """What the plot shows: VAL per penalty per MWA variant, uniform's VAL, chosen weights."""
    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    uniform = None
    for c, s in tuner.scored.values():
        if c.kind == "mwa" and c.penalty is not None:
            lines[f"{c.transform}, window {c.loss_window}"].append((c.penalty, s.value))
        if c.kind == "uniform" and len(c.members) == space.n:
            uniform = s.value
    try:
        weights = choice.candidate.weight_vector(space)
    except Exception:  # a metric MWA cannot read (a MetricError): no bars, still a plot
        weights = []
    return {
        "lines": {k: sorted(v) for k, v in lines.items()},
        "uniform": uniform,
        "weights": weights,
        "names": list(space.names),
        "chosen": choice.candidate.name,
        "metric": tuner.context.get("metric", "metric"),
    }


def draw(path: Path, tuner: _Tuner, choice: Choice, space: Space) -> Path:
    """Draw the plot into ``path`` (PNG), atomically.

    Raises:
        OutputError: The file cannot be written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    d = plot_data(tuner, choice, space)
    fig = Figure(figsize=(10, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax, bx = fig.subplots(1, 2)
    for label, pts in d["lines"].items():
        ax.plot([p for p, _ in pts], [v for _, v in pts], "o-", label=label)
    if d["uniform"] is not None:
        ax.axhline(d["uniform"], color="grey", linestyle="--", label="uniform (p = 0)")
    if d["lines"]:
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("MWA penalty p")
    ax.set_ylabel(f"VAL {d['metric']}")
    ax.set_title("VAL against the penalty")
    ax.grid(alpha=0.3)
    if d["weights"]:
        bx.bar(range(len(d["weights"])), d["weights"], color="#1f5fa8")
        bx.set_xticks(range(len(d["names"])), d["names"], rotation=60, fontsize=7, ha="right")
    bx.set_ylabel("weight")
    bx.set_title(f"chosen: {d['chosen']}")
    bx.grid(alpha=0.3, axis="y")
    target = Path(path)
    try:
        replace_file(
            target,
            lambda tmp: fig.savefig(tmp, format="png", metadata={"Software": None}),
            suffix=".png",
        )
    except OSError as err:
        raise OutputError(
            f"cannot write the tune plot: {err.strerror or err}",
            where=str(target),
            fix="write --out into a folder you can write to",
        ) from err
    return target
