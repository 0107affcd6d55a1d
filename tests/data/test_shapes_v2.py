"""The shapes task v2: determinism, variety of sizes, aspect ratios, backgrounds, shades and edges, answers that
match the scene, and the pixel budget (4-64 visual tokens) on the task's pictures and on extreme uploads."""

import hashlib
import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from grace.data import shapes_v2
from grace.data.shapes import QUESTION_TYPES, describe
from grace.data.shapes_v2 import MAX_PIXELS, MIN_PIXELS, ShapesV2Stream, draw_scene, make_sample, sample_rng
from grace.image_budget import MAX_ASPECT, fit_picture, seen_as
from grace.tiny import TinyConfig, build_image_processor
from grace.train.models import set_pixel_budget


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_processor():
    processor = build_image_processor(TinyConfig())
    set_pixel_budget(type("P", (), {"image_processor": processor})(), MIN_PIXELS, MAX_PIXELS)
    return processor


def test_samples_are_deterministic_and_splits_apart():
    assert png(make_sample("test", 0, 7).image) == png(make_sample("test", 0, 7).image)
    hashes = {split: {hashlib.sha1(png(make_sample(split, 0, i).image)).hexdigest() for i in range(30)}
              for split in ("train", "validation", "test")}
    assert not hashes["train"] & hashes["test"] and not hashes["validation"] & hashes["test"]
    assert make_sample("train", 0, 3).id != make_sample("train", 1, 3).id
    with pytest.raises(ValueError, match="split must be one of"):
        make_sample("dev", 0, 0)


def test_pictures_vary_in_size_aspect_background_shade_and_edges():
    sizes, styles, antialias, fills = [], Counter(), Counter(), set()
    for index in range(160):
        image, shapes, how = draw_scene(sample_rng("train", 0, index))
        sizes.append(image.size)
        styles[how["background"]] += 1
        antialias[how["antialias"]] += 1
        pixels = np.asarray(image)
        for s in shapes:       # the shape's centre pixel holds its fill
            cx, cy = (s.box[0] + s.box[2]) // 2, (s.box[1] + 2 * s.box[3]) // 3   # inside a triangle too
            fills.add(tuple(pixels[cy, cx]))
    sides = [v for size in sizes for v in size]
    aspects = [max(w, h) / min(w, h) for w, h in sizes]
    assert min(sides) >= 40 and max(sides) <= 320 and min(sides) < 80 and max(sides) > 250
    assert max(aspects) > 2.5 and max(aspects) <= 3.0 + 1e-6
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
    assert set(styles) == set(shapes_v2.BACKGROUNDS) and set(antialias) == {True, False}
    assert len(fills) > 100          # shades vary: hardly two shapes share a colour
    # anti-aliased pictures have in-between pixels at shape edges, hard-edged plain ones do not
    drawn = [draw_scene(sample_rng("train", 1, i)) for i in range(60)]
    hard = next(image for image, _, how in drawn if how["background"] == "plain" and not how["antialias"])
    smooth = next((image, shapes) for image, shapes, how in drawn if how["background"] == "plain" and how["antialias"])
    assert len({tuple(p) for p in np.asarray(hard).reshape(-1, 3)}) <= 4
    assert len({tuple(p) for p in np.asarray(smooth[0]).reshape(-1, 3)}) > 1 + len(smooth[1]) + 4


def test_answers_follow_the_scene():
    types = Counter()
    for index in range(200):
        sample = make_sample("test", 0, index)
        types[sample.type] += 1
        ordered = sorted(sample.shapes, key=lambda s: s.center_x)
        if sample.type == "describe":
            assert sample.answer == describe(ordered)
        if sample.type == "left":
            assert sample.answer == ordered[0].kind
        if sample.type == "count":
            assert sample.answer == ["one", "two", "three"][len(sample.shapes) - 1]
    assert set(types) == set(QUESTION_TYPES)


def test_every_task_picture_fits_the_budget(image_processor):
    tokens = []
    for index in range(120):
        image = make_sample("validation", 0, index).image
        view = seen_as(image_processor, image)
        grid = image_processor(images=[fit_picture(image)])["image_grid_thw"][0]
        assert view.visual_tokens == int(grid.prod()) // 4 and view.width == int(grid[2]) * 16
        tokens.append(view.visual_tokens)
    assert min(tokens) >= 4 and max(tokens) <= 64
    assert np.mean(np.array(tokens) >= 16) > 0.6        # most pictures give 16 visual tokens or more


@pytest.mark.parametrize("size", [(4000, 3000), (10, 10), (1, 1), (6000, 8), (8, 6000), (640, 480), (1000, 300),
                                  (300, 1000), (32000, 40)])
def test_extreme_uploads_are_resized_into_the_budget(image_processor, size):
    image = Image.new("RGB", size, (200, 30, 30))
    view = seen_as(image_processor, image)
    assert 4 <= view.visual_tokens <= 64, view
    assert view.describe() == f"seen as {view.width}×{view.height}, {view.visual_tokens} visual tokens"
    fitted = fit_picture(image)
    assert max(fitted.size) / min(fitted.size) <= MAX_ASPECT + 1e-6
    grid = image_processor(images=[fitted])["image_grid_thw"][0]
    assert int(grid.prod()) // 4 == view.visual_tokens


def test_the_trainer_streams_v2_and_the_evaluator_reads_its_splits():
    from grace.evaluation.shapes import read_shapes
    from grace.train.sampler import build_dataset

    stream = build_dataset("shapes-v2", 3, 64)
    assert isinstance(stream, ShapesV2Stream)
    assert png(stream[11]["image"]) == png(make_sample("train", 3, 11).image)
    items = read_shapes("shapes-v2-test", 3)
    assert [i.answer for i in items] == [make_sample("test", 0, i).answer for i in range(3)]
    assert png(items[0].image) == png(make_sample("test", 0, 0).image)


def test_write_split_round_trips(tmp_path):
    import json

    path = shapes_v2.write_split(tmp_path, "validation", 4, seed=2)
    records = json.loads(path.read_text())
    for index, record in enumerate(records):
        assert (tmp_path / record["image"]).read_bytes() == png(make_sample("validation", 2, index).image)
        assert record["conversations"][1]["value"] == make_sample("validation", 2, index).answer
