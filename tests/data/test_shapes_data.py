"""The shapes task: determinism, disjoint splits, scene rules, answers checked against the scene and pixels."""

import hashlib
import io
import json
from collections import Counter

import pytest

from grace.data.shapes import COLORS, Shape, ShapesStream, describe, make_sample, write_split


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def expected_answer(sample) -> str:
    """The answer recomputed from the scene, independently of grace.data.shapes.ask."""
    shapes, q = sample.shapes, sample.question
    ordered = sorted(shapes, key=lambda s: (s.box[0] + s.box[2]) / 2)
    if sample.type == "color":
        kind = q.removeprefix("What color is the ").removesuffix("?")
        matching = [s for s in shapes if s.kind == kind]
        assert len(matching) == 1, f"color asked about {kind} with {len(matching)} of them present"
        return matching[0].color
    if sample.type == "count":
        return ["one", "two", "three"][len(shapes) - 1]
    if sample.type == "exist":
        color, kind = q.removeprefix("Is there a ").removesuffix("?").split()
        return "yes" if any(s.color == color and s.kind == kind for s in shapes) else "no"
    if sample.type == "left":
        return ordered[0].kind
    words = [f"a {s.color} {s.kind}" for s in ordered]
    return {1: "{}", 2: "{} and {}", 3: "{}, {} and {}"}[len(words)].format(*words)


def background_point(shapes, size=64):
    return next((x, y) for y in range(size) for x in range(size)
                if not any(s.box[0] <= x <= s.box[2] and s.box[1] <= y <= s.box[3] for s in shapes))


QUESTIONS = {"color": "What color is the ", "count": "How many shapes are there?", "exist": "Is there a ",
             "left": "What shape is on the left?", "describe": "Describe the image."}


def test_answers_match_the_scene_and_the_pixels():
    types, exist_answers = Counter(), Counter()
    for index in range(300):
        sample = make_sample("train", 7, index)
        image = sample.image
        assert image.mode == "RGB" and image.size == (64, 64)
        assert sample.question.startswith(QUESTIONS[sample.type])
        assert sample.answer == expected_answer(sample) and sample.answer == sample.answer.lower()
        assert 1 <= len(sample.shapes) <= 3
        assert all(channel >= 215 for channel in image.getpixel(background_point(sample.shapes)))
        for shape in sample.shapes:
            x0, y0, x1, y1 = shape.box
            side = x1 - x0 + 1
            assert side == y1 - y0 + 1 and 0.15 * 64 - 0.5 <= side <= 0.40 * 64 + 0.5
            assert 0 <= x0 and x1 < 64 and 0 <= y0 and y1 < 64
            # What was drawn is what the metadata says: the box centre lies inside every shape.
            assert image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == COLORS[shape.color]
        for i, a in enumerate(sample.shapes):
            for b in sample.shapes[i + 1:]:
                overlap_x = a.box[0] <= b.box[2] and b.box[0] <= a.box[2]
                overlap_y = a.box[1] <= b.box[3] and b.box[1] <= a.box[3]
                assert not (overlap_x and overlap_y), "shapes overlap"
        types[sample.type] += 1
        if sample.type == "exist":
            exist_answers[sample.answer] += 1
    assert set(types) == set(QUESTIONS) and min(types.values()) >= 30
    assert 0.35 <= exist_answers["yes"] / sum(exist_answers.values()) <= 0.65


def test_same_arguments_same_bytes_and_splits_are_disjoint():
    assert png_bytes(make_sample("test", 0, 5).image) == png_bytes(make_sample("test", 0, 5).image)
    hashes = {split: {hashlib.sha1(png_bytes(make_sample(split, 0, i).image)).hexdigest() for i in range(40)}
              for split in ("train", "validation", "test")}
    assert all(len(h) == 40 for h in hashes.values())      # images within a split differ
    assert not hashes["train"] & hashes["validation"]
    assert not hashes["train"] & hashes["test"] and not hashes["validation"] & hashes["test"]
    assert make_sample("train", 0, 1).id != make_sample("train", 1, 1).id
    with pytest.raises(ValueError, match="split"):
        make_sample("dev", 0, 0)


def test_any_image_size():
    sample = make_sample("test", 0, 3, image_size=(96, 48))
    assert sample.image.size == (96, 48)
    assert all(s.box[2] < 96 and s.box[3] < 48 and s.box[2] - s.box[0] + 1 <= 0.4 * 48 + 0.5 for s in sample.shapes)
    with pytest.raises(ValueError, match="16x16"):
        make_sample("test", 0, 0, image_size=8)


def test_describe_wording():
    box = (0, 0, 9, 9)
    red_circle, blue_square, green_triangle = Shape("circle", "red", box), Shape("square", "blue", box), Shape(
        "triangle", "green", box)
    assert describe([red_circle]) == "a red circle"
    assert describe([red_circle, blue_square]) == "a red circle and a blue square"
    assert describe([green_triangle, red_circle, blue_square]) == "a green triangle, a red circle and a blue square"


def test_write_split_is_reproducible_conversation_json(tmp_path):
    first = write_split(tmp_path / "a", "validation", 6, seed=3)
    second = write_split(tmp_path / "b", "validation", 6, seed=3)
    assert first.name == "validation.json" and first.read_bytes() == second.read_bytes()
    records = json.loads(first.read_text())
    assert len(records) == 6
    for index, record in enumerate(records):
        assert set(record) == {"id", "image", "type", "conversations"}
        assert not record["image"].startswith("/")
        png = first.parent / record["image"]
        assert png.read_bytes() == (second.parent / record["image"]).read_bytes()
        assert png.read_bytes() == png_bytes(make_sample("validation", 3, index).image)
        human, gpt = record["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and gpt["value"] == make_sample("validation", 3, index).answer
    assert not list(first.parent.glob("*.partial"))


def test_stream_is_endless_and_indexed():
    stream = ShapesStream(seed=2, image_size=64)
    far = stream[500_000]
    sample = make_sample("train", 2, 500_000)
    assert far["conversations"][1]["value"] == sample.answer
    assert png_bytes(far["image"]) == png_bytes(sample.image)
    assert far["conversations"][0]["value"] == "<image>\n" + sample.question
