"""A PNG of the zoo's bits sweep (accuracy against bits per method) drawn with PIL alone (no plotting library
is a dependency). Used by bench/zoo_results.py; docs/zoo_sweep.png is its output."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = {"ptq-rtn": (214, 96, 40), "qat-ce": (60, 110, 200), "qat-grace": (30, 150, 70)}
NAMES = {"ptq-rtn": "round-to-nearest PTQ", "qat-ce": "CE-only QAT", "qat-grace": "GRACE QAT"}


def _font(size: int):
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def draw_sweep(rows: list[dict], bf16: float | None, out: Path, width: int = 760, height: int = 460) -> Path:
    image = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(image)
    font, small = _font(15), _font(12)
    left, right, top, bottom = 70, width - 200, 40, height - 60
    bits = sorted({r["bits"] for r in rows})
    xs = {b: left + (math.log2(b) - math.log2(min(bits))) / max(1e-9, math.log2(max(bits)) - math.log2(min(bits)))
          * (right - left) for b in bits}
    low = max(0.0, math.floor(min([r["min"] for r in rows] + [bf16 or 1]) * 10) / 10 - 0.05)
    low = min(low, 0.5)

    def y(v):
        return bottom - (v - low) / (1.0 - low) * (bottom - top)

    d.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    tick = math.ceil(low * 10 - 1e-9) / 10
    while tick <= 1.0001:
        d.line((left - 4, y(tick), right, y(tick)), fill=(230, 230, 230))
        d.text((left - 40, y(tick) - 7), f"{tick:.1f}", fill="black", font=small)
        tick += 0.1
    for b, x in xs.items():
        d.text((x - 12, bottom + 8), f"W{b}", fill="black", font=small)
    d.text((left + (right - left) // 2 - 90, bottom + 30), "weight bits (group 128)", fill="black", font=font)
    d.text((10, top - 30), "accuracy, shapes v2 test split", fill="black", font=font)
    if bf16 is not None:
        for x in range(left, right, 8):
            d.line((x, y(bf16), x + 4, y(bf16)), fill=(90, 90, 90))
        d.text((left + 6, y(bf16) - 16), f"GRACE BF16 {bf16:.3f}", fill=(90, 90, 90), font=small)
    for offset, method in zip((-6, 0, 6), NAMES):
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["bits"])
        colour = COLOURS[method]
        coords = [(xs[r["bits"]] + offset, y(r["mean"])) for r in points]
        if len(coords) > 1:
            d.line(coords, fill=colour, width=3)
        for r, (x, v) in zip(points, coords):
            d.line((x, y(r["min"]), x, y(r["max"])), fill=colour, width=2)
            d.ellipse((x - 4, v - 4, x + 4, v + 4), fill=colour)
    for i, method in enumerate(NAMES):
        yy = top + 40 + 24 * i
        d.line((right + 10, yy, right + 34, yy), fill=COLOURS[method], width=3)
        d.text((right + 40, yy - 8), NAMES[method], fill="black", font=small)
    d.text((right + 10, top + 120), "mean over seeds;\nbars: lowest to\nhighest seed", fill=(90, 90, 90), font=small)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out


def draw_trace(steps: list[dict], out: Path, title: str = "") -> Path:
    """The Train tab's four panels (losses, CKA, IB controller, confidence gate) of one run's metrics, as a PNG."""
    panels = [("Losses", [("loss", "total", (17, 24, 39)), ("ce", "CE", (37, 99, 235)),
                          ("gdkd", "gated DKD", (22, 163, 74)), ("rcka", "R-CKA", (220, 38, 38))], None),
              ("CKA alignment (student vs teacher)", [("cka", "CKA", (124, 58, 237))], (0, 1)),
              ("IB controller", [("ema", "EMA of L_GDKD", (22, 163, 74)), ("tau", "tau (target)", (107, 114, 128)),
                                 ("beta", "beta (right axis)", (220, 38, 38))], None),
              ("Confidence gate", [("gate_mean", "mean", (37, 99, 235)), ("gate_min", "min", (147, 197, 253)),
                                   ("gate_max", "max", (30, 64, 175))], (0, 1))]
    width, height = 1000, 640
    image = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(image)
    font, small = _font(15), _font(11)
    d.text((10, 6), title, fill="black", font=font)
    xs_all = [s["step"] for s in steps]
    for index, (name, series, fixed) in enumerate(panels):
        col, row = index % 2, index // 2
        left, top = 60 + col * 500, 50 + row * 300
        right, bottom = left + 400, top + 220
        d.rectangle((left, top, right, bottom), outline=(150, 150, 150))
        d.text((left, top - 20), name, fill="black", font=font)
        main = [k for k, _, _ in series if k != "beta"]
        values = [s[k] for s in steps for k in main if s.get(k) is not None]
        if not values:
            continue
        lo, hi = fixed or (min(values), max(values))
        if hi - lo < 1e-9:
            hi = lo + 1e-3
        x0, x1 = min(xs_all), max(max(xs_all), min(xs_all) + 1)

        def px(x):
            return left + (x - x0) / (x1 - x0) * (right - left)

        for k, label, colour in series:
            axis = (0.0, 1.05) if k == "beta" else (lo, hi)
            pts = [(px(s["step"]), bottom - (s[k] - axis[0]) / (axis[1] - axis[0]) * (bottom - top))
                   for s in steps if s.get(k) is not None]
            if len(pts) > 1:
                d.line(pts, fill=colour, width=2)
        for j, (k, label, colour) in enumerate(series):
            d.line((left + 8, bottom + 18 + 14 * j, left + 26, bottom + 18 + 14 * j), fill=colour, width=2)
            d.text((left + 30, bottom + 11 + 14 * j), label, fill="black", font=small)
        d.text((left - 48, top - 4), f"{hi:.3g}", fill="black", font=small)
        d.text((left - 48, bottom - 10), f"{lo:.3g}", fill="black", font=small)
        d.text((right - 40, bottom + 4), f"step {x1}", fill="black", font=small)
        if any(k == "beta" for k, _, _ in series):
            d.text((right + 4, top - 4), "1.0", fill=(220, 38, 38), font=small)
            d.text((right + 4, bottom - 10), "0", fill=(220, 38, 38), font=small)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out
