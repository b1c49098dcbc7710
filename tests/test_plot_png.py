"""plot_png: the card's weights plot drawn with Pillow, deterministic and where the data says."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from mwakit.plot_png import DOT, SIZE, STEM, draw_png, nice_ticks

ROOT = Path(__file__).resolve().parents[1]


def _data(xs: list[float], ws: list[float]) -> dict[str, object]:
    return {
        "name": "loss",
        "xs": xs,
        "ws": ws,
        "labels": [f"step {i}" for i in range(len(xs))],
        "title": "mwa: weight of each checkpoint against loss",
    }


@settings(max_examples=200, deadline=None)
@given(
    st.floats(-1e6, 1e6, allow_nan=False),
    st.floats(1e-6, 1e6, allow_nan=False),
    st.integers(3, 10),
)
def test_nice_ticks_are_round_even_and_inside(lo: float, span: float, most: int) -> None:
    # A range float64 resolves with digits to spare (a plot's axis: weights, losses, steps).
    assume(span >= 1e-6 * max(1.0, abs(lo)))
    hi = lo + span
    ticks = nice_ticks(lo, hi, most)
    assert 1 <= len(ticks) <= most + 2
    assert all(lo - 1e-9 * span <= t <= hi + 1e-9 * span for t in ticks)
    if len(ticks) > 1:
        step = ticks[1] - ticks[0]
        assert all(math.isclose(b - a, step, rel_tol=1e-6) for a, b in itertools.pairwise(ticks))
        mantissa = step / 10 ** math.floor(math.log10(step))
        assert any(math.isclose(mantissa, m, rel_tol=1e-6) for m in (1, 2, 2.5, 5, 10))


def test_the_plot_puts_dots_and_stems_where_the_weights_are(tmp_path: Path) -> None:
    path = draw_png(_data([0.1, 0.5, 1.0], [0.5, 0.3, 0.2]), tmp_path / "w.png")
    im = Image.open(path).convert("RGB")
    assert im.size == SIZE
    px = im.load()
    assert px is not None
    dots = [(x, y) for x in range(SIZE[0]) for y in range(SIZE[1]) if px[x, y] == DOT]
    stems = [(x, y) for x in range(SIZE[0]) for y in range(SIZE[1]) if px[x, y] == STEM]
    # Three dots, left to right, highest first (the largest weight at the smallest loss).
    columns = sorted({x for x, _ in dots})
    groups: list[list[int]] = []
    for x in columns:
        if groups and x - groups[-1][-1] <= 1:
            groups[-1].append(x)
        else:
            groups.append([x])
    assert len(groups) == 3
    tops = [min(y for x, y in dots if x in g) for g in groups]
    assert tops[0] < tops[1] < tops[2]
    # Each stem runs down from its dot to the zero line, and is longer for a larger weight.
    lengths = [sum(1 for x, _ in stems if x in g) for g in groups]
    assert lengths[0] > lengths[1] > lengths[2] > 0


def test_negative_weights_hang_below_zero(tmp_path: Path) -> None:
    path = draw_png(_data([1.0, 2.0], [-0.5, 1.0]), tmp_path / "w.png")
    px = Image.open(path).convert("RGB").load()
    assert px is not None
    dots = [(x, y) for x in range(SIZE[0]) for y in range(SIZE[1]) if px[x, y] == DOT]
    left = [y for x, y in dots if x < SIZE[0] // 2]
    right = [y for x, y in dots if x >= SIZE[0] // 2]
    assert min(left) > max(right)  # the negative weight's dot is lower


def test_same_bytes_every_time_and_odd_data_draws(tmp_path: Path) -> None:
    for name, data in {
        "one": _data([0.7], [1.0]),
        "zeros": _data([0.0, 1.0, 2.0], [0.0, 0.0, 0.0]),
        "wide": _data([1e3 * i for i in range(1, 21)], [0.05] * 20),
    }.items():
        a = draw_png(data, tmp_path / f"{name}-a.png").read_bytes()
        b = draw_png(data, tmp_path / f"{name}-b.png").read_bytes()
        assert a == b and a.startswith(b"\x89PNG")


def test_drawing_the_png_imports_no_matplotlib(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from mwakit.plot import draw\n"
        f"draw({_data([1.0, 2.0], [0.4, 0.6])!r}, {str(tmp_path / 'w.png')!r})\n"
        "assert 'matplotlib' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
