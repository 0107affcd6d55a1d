"""Checks on what users send: images (format, size, decompression bombs, truncation), questions, settings.

Gradio-free so it can be tested alone; the tabs turn `InvalidInput` into `gr.Error` / validator messages.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError


class InvalidInput(ValueError):
    """Something the user sent cannot be used; the message says what and how to fix it."""


def limit_pixels(max_pixels: int) -> None:
    """Make every PIL open in this process refuse decompression bombs (PIL raises above twice this)."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def open_image(path: str | Path, max_pixels: int) -> Image.Image:
    """Open, fully decode and convert an uploaded image to RGB, or raise InvalidInput saying why not."""
    name = Path(path).name
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x MAX_IMAGE_PIXELS; treat that as the bomb it may be.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidInput(f"The image is too large: more than {max_pixels:,} pixels. "
                           "Please upload a smaller image.") from None
    except UnidentifiedImageError:
        raise InvalidInput(f"'{name}' is not an image this app can read (PNG, JPEG, WebP, GIF, BMP, ...).") from None
    except OSError as err:
        raise InvalidInput(f"'{name}' could not be read: {err}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidInput("The image is empty (zero width or height).")
    if width * height > max_pixels:
        raise InvalidInput(f"The image is too large: {width}x{height} = {width * height:,} pixels, the limit is "
                           f"{max_pixels:,}. Please upload a smaller image.")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:   # PIL reports truncated / corrupt data as these
        raise InvalidInput(f"The image '{name}' is damaged or truncated and could not be decoded ({err}). "
                           "Please upload it again or try another file.") from None


def check_question(question: str | None, max_chars: int) -> str:
    text = (question or "").strip()
    if not text:
        raise InvalidInput("Please type a question about the image.")
    if len(text) > max_chars:
        raise InvalidInput(f"The question is too long: {len(text):,} characters, the limit is {max_chars:,}.")
    return text


def question_problem(question: str | None, max_chars: int) -> str | None:
    """The message `check_question` would raise, or None when the question is fine."""
    try:
        check_question(question, max_chars)
    except InvalidInput as err:
        return str(err)
    return None


def check_generation(max_new_tokens, temperature, top_p, limit: int) -> tuple[int, float, float]:
    """Numbers from the form or the API, checked: (max_new_tokens, temperature, top_p)."""
    try:
        tokens, temp, nucleus = float(max_new_tokens), float(temperature), float(top_p)
    except (TypeError, ValueError):
        raise InvalidInput("max_new_tokens, temperature and top_p must be numbers.") from None
    if not all(map(math.isfinite, (tokens, temp, nucleus))):
        raise InvalidInput("max_new_tokens, temperature and top_p must be finite numbers.")
    if not 1 <= tokens <= limit:
        raise InvalidInput(f"max_new_tokens must be between 1 and {limit}, got {tokens:g}.")
    if not 0 < temp <= 5:
        raise InvalidInput(f"temperature must be above 0 and at most 5, got {temp:g}.")
    if not 0 < nucleus <= 1:
        raise InvalidInput(f"top_p must be above 0 and at most 1, got {nucleus:g}.")
    return int(tokens), temp, nucleus
