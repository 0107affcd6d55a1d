"""The shapes task, second version: the same scenes and questions as `grace.data.shapes`, on pictures that
look more like what users upload.

- size: about 40-320 px a side, aspect ratio up to 3:1 either way (`picture_size`);
- background: plain, a linear gradient between two light colours, or either with light pixel noise;
- shapes: 1-3 from {circle, square, triangle} in {red, green, blue, yellow}, 15-40 % of the shorter side,
  each colour in a varied shade (brightness and per-channel jitter that keeps the colour name obvious),
  drawn either hard-edged or anti-aliased (rendered at 4x and downsampled);
- questions: the five types of v1 (`grace.data.shapes.ask`), same wording and answers.

The models that read it are trained with a pixel budget (MIN_PIXELS..MAX_PIXELS, saved in their processor
config): at patch 16 and merge 2 a visual token covers 32x32 pixels, so any picture becomes 4-64 visual
tokens, most of the task's pictures 16 or more. Deterministic like v1: sample `index` of a split is a pure
function of (split, seed, index) and the splits never share a random stream.

    python -m grace.data.shapes_v2 OUT_DIR --split test --n 500 [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .shapes import COLORS, SPLITS, Shape, ShapeSample, _place_shapes, ask, write_samples

VERSION = 2
MIN_SIDE, MAX_SIDE, MAX_ASPECT = 40, 320, 3.0
MIN_PIXELS, MAX_PIXELS = 4 * 32 * 32, 64 * 32 * 32     # 4..64 visual tokens of 32x32 pixels
SUPERSAMPLE = 4
BACKGROUNDS = ("plain", "gradient", "noisy plain", "noisy gradient")


def sample_rng(split: str, seed: int, index: int) -> random.Random:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return random.Random(f"grace-shapes-v2/{split}/{seed}/{index}")


def picture_size(rng: random.Random) -> tuple[int, int]:
    """(width, height): the longer side 96-320 px, the aspect ratio log-uniform in [1, 3], either way round,
    the shorter side at least 40 px."""
    long_side = rng.randint(96, MAX_SIDE)
    aspect = MAX_ASPECT ** rng.random()
    short_side = max(MIN_SIDE, round(long_side / aspect))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def shade(rng: random.Random, color: str) -> tuple[int, int, int]:
    """A varied shade of a named colour: brightness x0.8-1.1 and +-18 per channel, clipped."""
    k = rng.uniform(0.8, 1.1)
    return tuple(int(min(255, max(0, c * k + rng.randint(-18, 18)))) for c in COLORS[color])


def background(rng: random.Random, width: int, height: int) -> tuple[np.ndarray, str]:
    style = rng.choice(BACKGROUNDS)
    first = np.array([rng.randint(200, 255) for _ in range(3)], dtype=np.float32)
    canvas = np.empty((height, width, 3), dtype=np.float32)
    canvas[:] = first
    if "gradient" in style:
        second = np.array([rng.randint(185, 255) for _ in range(3)], dtype=np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        t = xx / max(width - 1, 1) * np.cos(angle) + yy / max(height - 1, 1) * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        canvas = first + t[..., None] * (second - first)
    if "noisy" in style:
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(3, 9), canvas.shape)
        canvas = canvas + noise
    return np.clip(canvas, 0, 255).astype(np.uint8), style


def draw_scene(rng: random.Random, size: tuple[int, int] | None = None) -> tuple[Image.Image, list[Shape], dict]:
    """(image, shapes, how it was drawn): a v2 picture of 1-3 non-overlapping shapes."""
    width, height = size or picture_size(rng)
    if min(width, height) < 16:
        raise ValueError(f"images must be at least 16x16 pixels, got {width}x{height}")
    base, style = background(rng, width, height)
    shapes = _place_shapes(rng, rng.randint(1, 3), width, height)
    fills = [shade(rng, s.color) for s in shapes]
    antialias = rng.random() < 0.5
    scale = SUPERSAMPLE if antialias else 1
    # shapes go on a transparent layer (drawn at `scale`x), then over the background
    layer = Image.new("RGBA", (width * scale, height * scale), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for shape, fill in zip(shapes, fills):
        x0, y0, x1, y1 = (v * scale for v in shape.box)
        x1, y1 = x1 + scale - 1, y1 + scale - 1
        if shape.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill + (255,))
        elif shape.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill + (255,))
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill + (255,))
    if antialias:
        layer = layer.resize((width, height), Image.Resampling.BOX)
    image = Image.alpha_composite(Image.fromarray(base).convert("RGBA"), layer).convert("RGB")
    return image, shapes, {"background": style, "antialias": antialias, "size": (width, height)}


def make_sample(split: str, seed: int, index: int) -> ShapeSample:
    """Sample `index` of a v2 split: deterministic in all three arguments."""
    rng = sample_rng(split, seed, index)
    image, shapes, _ = draw_scene(rng)
    kind, question, answer = ask(rng, shapes)
    return ShapeSample(f"shapes2-{split}-{seed}-{index:07d}", image, kind, question, answer, shapes)


class ShapesV2Stream:
    """An endless map-style dataset of v2 samples as conversation records (the trainer's data='shapes-v2')."""

    def __init__(self, seed: int = 0, split: str = "train"):
        sample_rng(split, seed, 0)
        self.seed, self.split = seed, split

    def __getitem__(self, index: int) -> dict:
        return make_sample(self.split, self.seed, int(index)).conversation()


def write_split(out_dir: str | os.PathLike, split: str, n: int, seed: int = 0) -> Path:
    """Samples 0..n-1 of a v2 split as PNGs in OUT/images/ and OUT/<split>.json (written last, atomically)."""
    return write_samples(out_dir, split, n, lambda index: make_sample(split, seed, index), f"v2-{split}-{seed}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grace.data.shapes_v2",
                                     description="write a split of the shapes task v2 as conversation JSON + PNGs")
    parser.add_argument("out", help="output folder (images/ and <split>.json go there)")
    parser.add_argument("--split", choices=SPLITS, default="test")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote {args.n} samples to {write_split(args.out, args.split, args.n, args.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
