"""A second, independent renderer of the shapes task (numpy rasterisation with coverage anti-aliasing, other
shades, canvas sizes, backgrounds and placement), used to check that models learned the task rather than the
training renderer's quirks.

Follows the task's definition only (v2): pictures 40-320 px a side with aspect ratio up to 3:1, a light plain,
gradient or noisy background, 1-3 non-overlapping shapes from {circle, square, triangle} in {red, green, blue,
yellow}, each 15-40 % of the shorter side, and the five question templates with lower-case answers.
`render_scene(rng, v2=False)` keeps the square canvases of v1.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SHADES = {"red": [(205, 25, 35), (235, 60, 50)], "green": [(30, 150, 50), (60, 175, 70)],
          "blue": [(30, 60, 200), (60, 100, 235)], "yellow": [(240, 210, 40), (225, 190, 20)]}
KINDS = ("circle", "square", "triangle")
NUMBER = {1: "one", 2: "two", 3: "three"}


def _mask(kind, cx, cy, half, h, w, samples=1):
    """Coverage in [0, 1] of each pixel (samples x samples points per pixel; 1: hard edges)."""
    if samples > 1:
        offsets = (np.arange(samples) + 0.5) / samples - 0.5
        return np.mean([_mask(kind, cx - dx, cy - dy, half, h, w) for dx in offsets for dy in offsets], axis=0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= half ** 2
    if kind == "square":
        return (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)
    # upward triangle inside the square of side 2*half: apex at top centre
    top, bottom = cy - half, cy + half
    t = (yy - top) / (2 * half)
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= t * half)


def _canvas(rng: np.random.Generator, v2: bool):
    if not v2:
        w = h = int(rng.integers(64, 161))
        canvas = np.empty((h, w, 3), dtype=np.float32)
        canvas[:] = rng.integers(215, 256, size=3)
        return canvas
    short = int(rng.integers(40, 200))
    long = int(min(320, short * rng.uniform(1.0, 3.0)))
    h, w = (short, long) if rng.random() < 0.5 else (long, short)
    top, bottom = rng.integers(190, 256, size=3), rng.integers(190, 256, size=3)
    style = rng.integers(3)
    if style == 0:                                        # plain
        canvas = np.broadcast_to(top, (h, w, 3)).astype(np.float32)
    elif style == 1:                                      # vertical or horizontal two-colour ramp
        t = np.linspace(0, 1, h if rng.random() < 0.5 else w, dtype=np.float32)
        t = t[:, None] if len(t) == h else t[None, :]
        canvas = top + t[..., None] * (bottom - top).astype(np.float32)
        canvas = np.broadcast_to(canvas, (h, w, 3)).astype(np.float32)
    else:                                                 # uniform noise on a plain colour
        canvas = top + rng.uniform(-10, 10, size=(h, w, 3))
    return canvas.astype(np.float32).copy()


def render_scene(rng: np.random.Generator, v2: bool = True):
    canvas = _canvas(rng, v2)
    h, w = canvas.shape[:2]
    short = min(w, h)
    count = int(rng.integers(1, 4))
    placed = []
    for _ in range(500):
        if len(placed) == count:
            break
        size = rng.uniform(0.15, 0.40) * short
        half = size / 2
        cx, cy = rng.uniform(half, w - half), rng.uniform(half, h - half)
        # boxes apart (no overlap) and centres apart horizontally, so "left" is unambiguous
        if all(abs(cx - px) > half + ph + 1 or abs(cy - py) > half + ph + 1 for px, py, ph, _, _ in placed) and \
                all(abs(cx - px) > 0.1 * w for px, *_ in placed):
            placed.append((cx, cy, half, str(rng.choice(KINDS)), str(rng.choice(list(SHADES)))))
    samples = 3 if (v2 and rng.random() < 0.5) else 1
    for cx, cy, half, kind, color in placed:
        shades = SHADES[color]
        fill = np.array(shades[int(rng.integers(len(shades)))], dtype=np.float32)
        if v2:
            fill = np.clip(fill * rng.uniform(0.85, 1.08), 0, 255)
        cover = _mask(kind, cx, cy, half, h, w, samples).astype(np.float32)[..., None]
        canvas = canvas * (1 - cover) + fill * cover
    image = Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8))
    return image, sorted(placed, key=lambda s: s[0])


def question_for(rng: np.random.Generator, shapes):
    kinds = [s[3] for s in shapes]
    qtype = str(rng.choice(["color", "count", "exist", "left", "describe"]))
    if qtype == "color":
        unique = [k for k in KINDS if kinds.count(k) == 1]
        if not unique:
            qtype = "count"
        else:
            kind = str(rng.choice(unique))
            return "color", f"What color is the {kind}?", next(s[4] for s in shapes if s[3] == kind)
    if qtype == "count":
        return "count", "How many shapes are there?", NUMBER[len(shapes)]
    if qtype == "exist":
        if rng.random() < 0.5:
            _, _, _, kind, color = shapes[int(rng.integers(len(shapes)))]
        else:
            present = {(s[3], s[4]) for s in shapes}
            absent = [(k, c) for k in KINDS for c in SHADES if (k, c) not in present]
            kind, color = absent[int(rng.integers(len(absent)))]
        answer = "yes" if any(s[3] == kind and s[4] == color for s in shapes) else "no"
        return "exist", f"Is there a {color} {kind}?", answer
    if qtype == "left":
        return "left", "What shape is on the left?", shapes[0][3]
    parts = [f"a {s[4]} {s[3]}" for s in shapes]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return "describe", "Describe the image.", text


def alt_items(n: int = 200, seed: int = 2026, v2: bool = True):
    """n (image, question, answer, type) items from this renderer, deterministic in `seed`."""
    from grace.evaluation import EvalItem

    rng = np.random.default_rng(seed)
    items = []
    while len(items) < n:
        image, shapes = render_scene(rng, v2)
        if not shapes:
            continue
        qtype, question, answer = question_for(rng, shapes)
        items.append(EvalItem(question, answer, qtype, image))
    return items
