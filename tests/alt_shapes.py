"""A second, independent renderer of the shapes task (numpy rasterisation, other shades, canvas sizes
and placement), used to check that models learned the task rather than the training renderer's quirks.

Follows the task's definition only: light plain background, 1-3 non-overlapping shapes from
{circle, square, triangle} in {red, green, blue, yellow}, each 15-40 % of the shorter side, and the
five question templates with lower-case answers.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SHADES = {"red": [(205, 25, 35), (235, 60, 50)], "green": [(30, 150, 50), (60, 175, 70)],
          "blue": [(30, 60, 200), (60, 100, 235)], "yellow": [(240, 210, 40), (225, 190, 20)]}
KINDS = ("circle", "square", "triangle")
NUMBER = {1: "one", 2: "two", 3: "three"}


def _mask(kind, cx, cy, half, h, w):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= half ** 2
    if kind == "square":
        return (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)
    # upward triangle inside the square of side 2*half: apex at top centre
    top, bottom = cy - half, cy + half
    t = (yy - top) / (2 * half)
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= t * half)


def render_scene(rng: np.random.Generator):
    # square, like the training images (the processor keeps the aspect ratio, so other shapes of
    # canvas give the tiny models token grids they never saw); the size still varies
    w = h = int(rng.integers(64, 161))
    short = min(w, h)
    background = rng.integers(215, 256, size=3)
    canvas = np.empty((h, w, 3), dtype=np.uint8)
    canvas[:] = background
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
    for cx, cy, half, kind, color in placed:
        shades = SHADES[color]
        canvas[_mask(kind, cx, cy, half, h, w)] = shades[int(rng.integers(len(shades)))]
    return Image.fromarray(canvas), sorted(placed, key=lambda s: s[0])


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


def alt_items(n: int = 200, seed: int = 2026):
    """n (image, question, answer, type) items from this renderer, deterministic in `seed`."""
    from grace.evaluation import EvalItem

    rng = np.random.default_rng(seed)
    items = []
    while len(items) < n:
        image, shapes = render_scene(rng)
        if not shapes:
            continue
        qtype, question, answer = question_for(rng, shapes)
        items.append(EvalItem(question, answer, qtype, image))
    return items
