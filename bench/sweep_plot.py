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
