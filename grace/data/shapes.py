"""The shapes task: synthetic images of coloured shapes with questions that have one right answer.

Fixed and deterministic, so anyone can reproduce a split or test a model on their own images:

- image: RGB (default 64x64), a random light plain background, 1-3 non-overlapping shapes
  from {circle, square, triangle} in {red, green, blue, yellow}, each 15-40 % of the shorter side;
  shapes' centres are apart horizontally, so "left" and "left to right" are never ambiguous.
- questions (answers lower-case), each sample tagged with its `type`:
    color    "What color is the {shape}?"        -> "red"   (only when exactly one {shape} is present)
    count    "How many shapes are there?"        -> "one" / "two" / "three"
    exist    "Is there a {color} {shape}?"       -> "yes" / "no"   (half and half)
    left     "What shape is on the left?"        -> the leftmost shape's kind
    describe "Describe the image."               -> "a red circle, a green square and a blue triangle"
                                                    (left to right; "a red circle" for one shape)

Sample `index` of a split is a pure function of (split, seed, index, image_size): the same
arguments give byte-identical images, different splits never share a random stream, and the
train stream is endless (`ShapesStream`), so every training step sees fresh images.
`write_split` stores a split as the LLaVA/ShareGPT4V conversation JSON the trainer reads.

    python -m grace.data.shapes OUT_DIR --split test --n 500 [--seed 0] [--image-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
QUESTION_TYPES = ("color", "count", "exist", "left", "describe")
SPLITS = ("train", "validation", "test")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
MIN_SIZE, MAX_SIZE = 0.15, 0.40     # shape size as a share of the image's shorter side
MIN_CENTER_GAP = 0.08               # horizontal gap between shape centres, share of the width
PLACEMENT_TRIES = 200


@dataclass
class Shape:
    kind: str
    color: str
    box: tuple[int, int, int, int]       # x0, y0, x1, y1 (inclusive pixels)

    @property
    def center_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass
class ShapeSample:
    id: str
    image: Image.Image
    type: str
    question: str
    answer: str
    shapes: list[Shape] = field(default_factory=list)

    def conversation(self, image_path: str | None = None) -> dict:
        """The LLaVA/ShareGPT4V record; `image` is the path when given, else the PIL image itself."""
        return {"id": self.id, "image": image_path if image_path is not None else self.image, "type": self.type,
                "conversations": [{"from": "human", "value": "<image>\n" + self.question},
                                  {"from": "gpt", "value": self.answer}]}


def sample_rng(split: str, seed: int, index: int) -> random.Random:
    """The random stream of one sample. Seeding from a string hashes it with SHA-512 (stable across
    runs and machines, unlike hash()); the split name keeps the splits' streams apart."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return random.Random(f"grace-shapes/{split}/{seed}/{index}")


def draw_scene(rng: random.Random, size: tuple[int, int] = (64, 64)) -> tuple[Image.Image, list[Shape]]:
    """A light background with 1-3 non-overlapping shapes, drawn with PIL."""
    width, height = size
    if min(width, height) < 16:
        raise ValueError(f"images must be at least 16x16 pixels, got {width}x{height}")
    background = tuple(rng.randint(215, 255) for _ in range(3))
    count = rng.randint(1, 3)
    shapes = _place_shapes(rng, count, width, height)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        fill = COLORS[shape.color]
        x0, y0, x1, y1 = shape.box
        if shape.kind == "circle":
            draw.ellipse(shape.box, fill=fill)
        elif shape.kind == "square":
            draw.rectangle(shape.box, fill=fill)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    return image, shapes


def _place_shapes(rng: random.Random, count: int, width: int, height: int) -> list[Shape]:
    """Rejection sampling: boxes that do not touch and centres at least MIN_CENTER_GAP apart in x.
    If a layout does not fit after PLACEMENT_TRIES, start over with fresh sizes (still deterministic)."""
    short = min(width, height)
    while True:
        shapes: list[Shape] = []
        for _ in range(PLACEMENT_TRIES):
            side = round(short * rng.uniform(MIN_SIZE, MAX_SIZE))
            x0, y0 = rng.randint(0, width - side), rng.randint(0, height - side)
            box = (x0, y0, x0 + side - 1, y0 + side - 1)
            candidate = Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), box)
            if all(_apart(candidate, other, width) for other in shapes):
                shapes.append(candidate)
                if len(shapes) == count:
                    return shapes


def _apart(a: Shape, b: Shape, width: int) -> bool:
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box, b.box
    disjoint = ax1 + 1 < bx0 or bx1 + 1 < ax0 or ay1 + 1 < by0 or by1 + 1 < ay0   # one pixel of gap at least
    return disjoint and abs(a.center_x - b.center_x) >= MIN_CENTER_GAP * width


def ask(rng: random.Random, shapes: list[Shape]) -> tuple[str, str, str]:
    """(type, question, answer) about the scene, the type drawn uniformly among the ones that apply."""
    kinds = [s.kind for s in shapes]
    single_kinds = [k for k in SHAPES if kinds.count(k) == 1]
    types = [t for t in QUESTION_TYPES if t != "color" or single_kinds]
    kind = rng.choice(types)
    left_to_right = sorted(shapes, key=lambda s: s.center_x)
    if kind == "color":
        shape_kind = rng.choice(single_kinds)
        color = next(s.color for s in shapes if s.kind == shape_kind)
        return kind, f"What color is the {shape_kind}?", color
    if kind == "count":
        return kind, "How many shapes are there?", COUNT_WORDS[len(shapes)]
    if kind == "exist":
        present = sorted({(s.color, s.kind) for s in shapes})
        if rng.random() < 0.5:
            color, shape_kind = rng.choice(present)
            answer = "yes"
        else:
            absent = [(c, k) for c in COLORS for k in SHAPES if (c, k) not in present]
            color, shape_kind = rng.choice(absent)
            answer = "no"
        return kind, f"Is there a {color} {shape_kind}?", answer
    if kind == "left":
        return kind, "What shape is on the left?", left_to_right[0].kind
    return kind, "Describe the image.", describe(left_to_right)


def describe(shapes_left_to_right: list[Shape]) -> str:
    parts = [f"a {s.color} {s.kind}" for s in shapes_left_to_right]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def make_sample(split: str, seed: int, index: int, image_size: int | tuple[int, int] = 64) -> ShapeSample:
    """Sample `index` of a split: deterministic in all four arguments."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    rng = sample_rng(split, seed, index)
    image, shapes = draw_scene(rng, size)
    kind, question, answer = ask(rng, shapes)
    return ShapeSample(f"shapes-{split}-{seed}-{index:07d}", image, kind, question, answer, shapes)


class ShapesStream:
    """An endless map-style dataset: item i is `make_sample(split, seed, i)` as a conversation record
    (its `image` a PIL image). No length: a sampler decides which indices are read."""

    def __init__(self, seed: int = 0, image_size: int = 64, split: str = "train"):
        sample_rng(split, seed, 0)   # validates the split name
        self.seed, self.image_size, self.split = seed, image_size, split

    def __getitem__(self, index: int) -> dict:
        return make_sample(self.split, self.seed, int(index), self.image_size).conversation()


def write_split(out_dir: str | os.PathLike, split: str, n: int, seed: int = 0, image_size: int = 64) -> Path:
    """Write samples 0..n-1 of a split: PNGs in OUT/images/, records in OUT/<split>.json (paths relative
    to the JSON's folder)."""
    return write_samples(out_dir, split, n, lambda index: make_sample(split, seed, index, image_size),
                         f"{split}-{seed}")


def write_samples(out_dir: str | os.PathLike, split: str, n: int, sample_at, name: str) -> Path:
    """PNGs of sample_at(0..n-1) as OUT/images/<name>-<index>.png and their records in OUT/<split>.json.
    The JSON is written last, through a temporary file, so it never lists images that are not there."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(n):
        sample = sample_at(index)
        relative = f"images/{name}-{index:07d}.png"
        sample.image.save(out / relative, format="PNG")
        records.append(sample.conversation(relative))
    json_path = out / f"{split}.json"
    tmp = json_path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(records, indent=1), encoding="utf-8")
    os.replace(tmp, json_path)
    return json_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grace.data.shapes",
                                     description="write a split of the shapes task as conversation JSON + PNGs")
    parser.add_argument("out", help="output folder (images/ and <split>.json go there)")
    parser.add_argument("--split", choices=SPLITS, default="test")
    parser.add_argument("--n", type=int, default=500, help="number of samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    path = write_split(args.out, args.split, args.n, args.seed, args.image_size)
    print(f"wrote {args.n} samples to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
