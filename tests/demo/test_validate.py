"""demo/validate.py and demo/inputs.py: what users send is checked before anything decodes or runs it."""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

pytest.importorskip("gradio")

from app_server import REPO  # noqa: E402
from demo import validate  # noqa: E402
from demo.inputs import BadImage, decode_upload  # noqa: E402

NOT_AN_IMAGE = validate.NOT_AN_IMAGE


def png_bytes(size=(40, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels with almost no data: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def limits(tmp_path) -> validate.UploadLimits:
    (tmp_path / "uploads").mkdir()
    return validate.UploadLimits(max_bytes=100_000, max_pixels=1_000_000, folders=[tmp_path / "uploads"])


def test_an_upload_in_the_upload_folder_is_decoded(limits, tmp_path):
    path = tmp_path / "uploads" / "rgba.png"
    path.write_bytes(png_bytes(mode="RGBA"))
    image = validate.read_upload(path, limits)
    assert image.mode == "RGB" and image.size == (40, 30)


def test_paths_outside_the_upload_folder_all_get_the_same_message(limits, tmp_path):
    """Whether a server path exists, is a folder, a picture or a text file must not show (issue 11.1)."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png_bytes())
    (outside / "notes.txt").write_text("hello")
    (tmp_path / "uploads" / "link.png").symlink_to(outside / "secret.png")
    probes = [outside / "secret.png", outside / "notes.txt", outside / "missing.png", outside, Path("/etc/passwd"),
              tmp_path / "uploads" / ".." / "elsewhere" / "secret.png", tmp_path / "uploads" / "link.png",
              tmp_path / "uploads" / "missing.png", tmp_path / "uploads", "/dev/zero", "bad\0name"]
    messages = set()
    for probe in probes:
        with pytest.raises(validate.InvalidInput) as refused:
            validate.read_upload(probe, limits)
        messages.add(str(refused.value))
    assert messages == {NOT_AN_IMAGE}


def test_payloads_without_a_usable_path_are_refused_like_non_images(limits, tmp_path):
    (tmp_path / "elsewhere.png").write_bytes(png_bytes())
    for payload in [SimpleNamespace(path=str(tmp_path / "elsewhere.png"), url=None),   # no `meta`: raw API call
                    {"path": str(tmp_path / "elsewhere.png")}, {"path": None, "url": "http://x/y.png"},
                    {"path": "", "url": None}, SimpleNamespace(path=None, url="data:text/plain,hello")]:
        result = decode_upload(limits, payload)
        assert isinstance(result, BadImage) and str(result) == NOT_AN_IMAGE
    assert decode_upload(limits, None) is None


def test_data_urls_are_capped_before_they_are_decoded(limits):
    small = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    assert decode_upload(limits, {"path": None, "url": small}).size == (40, 30)
    big = "data:image/png;base64," + "A" * (200_000 * 4 // 3)     # 200 KB of bytes; the cap is 100 KB
    with pytest.raises(validate.InvalidInput, match="too big"):
        validate.read_data_url(big, limits)
    assert isinstance(decode_upload(limits, {"url": big}), BadImage)
    with pytest.raises(validate.InvalidInput, match="not an image"):
        validate.read_data_url("data:image/png;base64,!!!not-base64", limits)


def test_the_size_cap_applies_to_stored_uploads(limits, tmp_path):
    path = tmp_path / "uploads" / "huge.png"
    path.write_bytes(png_bytes() + b"\0" * 200_000)
    with pytest.raises(validate.InvalidInput, match="too big"):
        validate.read_upload(path, limits)


@pytest.mark.parametrize("width, height", [(1500, 1000), (7000, 7000), (60_000, 60_000)])
def test_decompression_bombs_are_refused_from_the_header(limits, tmp_path, width, height):
    path = tmp_path / "uploads" / "bomb.png"
    path.write_bytes(bomb_png(width, height))
    with pytest.raises(validate.InvalidInput, match="too large"):
        validate.read_upload(path, limits)


@pytest.mark.parametrize("size", [(6000, 8), (3, 900)])
def test_long_thin_strips_get_a_plain_sentence(limits, size):
    with pytest.raises(validate.InvalidInput, match="too long and thin") as refused:
        validate.decode_image(png_bytes(size), limits)
    assert "Error" not in str(refused.value) and "aspect ratio must be" not in str(refused.value)


def test_truncated_and_non_images(limits):
    photo = io.BytesIO()
    Image.effect_noise((256, 256), 50).convert("RGB").save(photo, format="JPEG", quality=90)
    with pytest.raises(validate.InvalidInput, match="truncated"):
        validate.decode_image(photo.getvalue()[:2000], limits)
    for junk in (b"", b"hello", b"\x89PNG\r\n\x1a\n" + os.urandom(64)):
        with pytest.raises(validate.InvalidInput):
            validate.decode_image(junk, limits)


def test_question_checks():
    assert validate.check_question("  What?  ", 10) == "What?"
    with pytest.raises(validate.InvalidInput, match="type a question"):
        validate.check_question("", 10)
    with pytest.raises(validate.InvalidInput, match="too long: 11 characters"):
        validate.check_question("x" * 11, 10)
    with pytest.raises(validate.InvalidInput, match="must be text"):
        validate.check_question({"a": 1}, 10)


def test_generation_checks_only_check_sampling_settings_when_sampling():
    greedy = validate.check_generation(16, False, "nonsense", None, 2**64, limit=64)
    assert greedy["max_new_tokens"] == 16 and not greedy["do_sample"] and greedy["seed"] is None
    sampled = validate.check_generation("16", "true", "0.5", 0.9, "7", limit=64)
    assert sampled == {"max_new_tokens": 16, "do_sample": True, "temperature": 0.5, "top_p": 0.9, "seed": 7}
    bad = [(0, False, 1, 1, 0, "between 1 and 64"), (65, False, 1, 1, 0, "between 1 and 64"),
           ("x", False, 1, 1, 0, "must be a number"), (None, False, 1, 1, 0, "must be a number"),
           (2.5, False, 1, 1, 0, "whole number"), ("nan", False, 1, 1, 0, "finite"),
           (8, True, 0, 0.9, 0, "temperature"), (8, True, 0.7, 1.5, 0, "top_p"), (8, True, "abc", 0.9, 0, "temperature"),
           (8, True, 0.7, 0.9, 2**64, "seed"), (8, True, 0.7, 0.9, -1, "seed"), (8, "maybe", 1, 1, 0, "true or false"),
           (8, True, float("inf"), 0.9, 0, "finite"), ("1e400", False, 1, 1, 0, "finite")]
    for tokens, sampling, temperature, top_p, seed, message in bad:
        with pytest.raises(validate.InvalidInput, match=message):
            validate.check_generation(tokens, sampling, temperature, top_p, seed, limit=64)


def test_example_images_exist_and_are_valid():
    examples = sorted((REPO / "assets" / "examples").glob("*.png"))
    assert len(examples) >= 3
    for path in examples:
        assert validate.open_image(path, 10**6).size == (256, 256)
