"""The weights plot as a PNG, drawn with Pillow in this process.

The model card's ``weights.png`` used to be drawn by matplotlib in a child interpreter, so that
its import (≈ 0.45 s) would not hold this process's GIL during a merge: 0.8–1.0 CPU-s per
`mwakit run` (measured), a fifth of a LoRA merge's CPU on a 2-core box. Pillow draws the same
figure — stems from 0 to each weight, a dot per checkpoint labelled with its step, grid, ticks,
axis labels, title — in ≈ 0.15 CPU-s, in the merge's own process. `mwakit.plot.draw` sends PNGs
here and SVG/PDF (`mwakit plan --plot x.svg`) to matplotlib.

Same bytes for the same data (no metadata is written); the text is set in matplotlib's DejaVu
Sans when that font is installed (found without importing matplotlib), else Pillow's own.
"""

from __future__ import annotations

import importlib.util
import math
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import ImageDraw, ImageFont

__all__ = ["draw_png", "nice_ticks"]

SIZE = (640, 400)
STEM = (0x9D, 0xB4, 0xD3)
DOT = (0x1F, 0x5F, 0xA8)
GRID = (0xE7, 0xE7, 0xE7)  # matplotlib's #b0b0b0 at alpha 0.3, on white
INK = (0x1A, 0x1A, 0x1A)


def nice_ticks(lo: float, hi: float, most: int = 8) -> list[float]:
    """Round tick values covering [lo, hi]: multiples of 1, 2, 2.5 or 5 × 10^k, at most
    ``most`` + 1 of them inside the range (matplotlib's ``MaxNLocator`` idea)."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / most
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * mag >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9)
    last = math.floor(hi / step + 1e-9)
    # Products of integers and the step: no accumulated error; -0.0 printed as 0.
    return [(k * step) + 0.0 for k in range(first, last + 1)]


def _label(v: float, ticks: list[float]) -> str:
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(v) or 1.0
    decimals = max(0, -math.floor(math.log10(step) + 1e-9) + (1 if _digits(step) > 1 else 0))
    return f"{v:.{decimals}f}"


def _digits(step: float) -> int:
    """Significant digits of a tick step (1 for 1, 2, 5; 2 for 2.5 × 10^k)."""
    mantissa = step / 10.0 ** math.floor(math.log10(step))
    return 2 if abs(mantissa - round(mantissa)) > 1e-6 else 1


@cache
def _font_file() -> str | None:
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        return None
    ttf = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    return str(ttf) if ttf.is_file() else None


@cache
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    from PIL import ImageFont

    path = _font_file()
    if path is not None:
        return ImageFont.truetype(path, px)
    try:
        return ImageFont.load_default(px)  # a scalable font (Pillow ≥ 10.1)
    except TypeError:
        return ImageFont.load_default()


def _size(draw: ImageDraw.ImageDraw, text: str, px: int) -> tuple[int, int]:
    box = draw.textbbox((0, 0), text, font=_font(px))
    return int(box[2] - box[0]), int(box[3] - box[1])


def draw_png(data: dict[str, Any], path: str | Path) -> Path:
    """Draw `mwakit.plot.plot_data`'s figure into a PNG file of 640×400 pixels.

    Args:
        data: ``name`` (x axis), ``xs``, ``ws`` (weights), ``labels``, ``title``.
        path: The file to write.

    Returns:
        The path written.
    """
    from PIL import Image, ImageDraw

    xs = [float(x) for x in data["xs"]]
    ws = [float(w) for w in data["ws"]]
    im = Image.new("RGB", SIZE, "white")
    d = ImageDraw.Draw(im)
    # The y range as matplotlib's figure had it: 0 included, 20 % headroom for the labels.
    y0, y1 = min([*ws, 0.0]) * 1.2, max([*ws, 0.0]) * 1.2 or 1.0
    # The x range: the points, 5 % margins (one point: ±1 around it).
    lo, hi = min(xs), max(xs)
    pad = (hi - lo) * 0.05 if hi > lo else max(abs(lo) * 0.05, 1.0)
    x0, x1 = lo - pad, hi + pad
    yt, xt = nice_ticks(y0, y1), nice_ticks(x0, x1, most=6)
    ylabels = [_label(v, yt) for v in yt]
    tick_px, label_px, title_px, note_px = 13, 14, 16, 11
    left = 10 + _size(d, "weight", label_px)[1] + 8 + max(_size(d, t, tick_px)[0] for t in ylabels)
    left += 10
    top, right, bottom = 12 + _size(d, "Ag", title_px)[1] + 10, SIZE[0] - 14, SIZE[1] - 50

    def px(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x0) / (x1 - x0) * (right - left),
            bottom - (y - y0) / (y1 - y0) * (bottom - top),
        )

    for v, text in zip(yt, ylabels, strict=True):
        _, y = px(x0, v)
        d.line([(left, y), (right, y)], fill=GRID)
        d.line([(left - 4, y), (left, y)], fill=INK)
        d.text((left - 7, y), text, fill=INK, font=_font(tick_px), anchor="rm")
    for v in xt:
        x, _ = px(v, y0)
        d.line([(x, top), (x, bottom)], fill=GRID)
        d.line([(x, bottom), (x, bottom + 4)], fill=INK)
        d.text((x, bottom + 7), _label(v, xt), fill=INK, font=_font(tick_px), anchor="mt")
    _, zero = px(x0, 0.0)
    for x, w in zip(xs, ws, strict=True):
        sx, sy = px(x, w)
        d.line([(sx, zero), (sx, sy)], fill=STEM, width=2)
    for x, w, text in zip(xs, ws, data["labels"], strict=True):
        sx, sy = px(x, w)
        d.ellipse([sx - 4, sy - 4, sx + 4, sy + 4], fill=DOT)
        d.text((sx, sy - 7), str(text), fill=INK, font=_font(note_px), anchor="mb")
    d.rectangle([left, top, right, bottom], outline=INK)
    d.text(((left + right) / 2, bottom + 27), data["name"], fill=INK, font=_font(label_px),
           anchor="mt")  # fmt: skip
    d.text(((left + right) / 2, 10), data["title"], fill=INK, font=_font(title_px), anchor="mt")
    # The y label, turned a quarter: drawn on its own strip, rotated, pasted.
    tw, th = _size(d, "weight", label_px)
    strip = Image.new("RGB", (tw + 4, th + 6), "white")
    ImageDraw.Draw(strip).text((2, 0), "weight", fill=INK, font=_font(label_px))
    turned = strip.rotate(90, expand=True)
    im.paste(turned, (10, int((top + bottom) / 2 - turned.size[1] / 2)))
    out = Path(path)
    im.save(out, format="PNG")
    return out
