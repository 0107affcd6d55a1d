"""Checks on what users send: uploads (where they are, size, format, decompression bombs, truncation,
shape), questions, numbers. Gradio-free so it can be tested alone; the tabs turn `InvalidInput` into
`gr.Error` / validator messages.

An image reaches the server in one of two ways and both are checked here before anything decodes it:
a file Gradio stored in its upload folder (`read_upload`), or bytes the request carries as a `data:` URL
(`read_data_url`). A path anywhere else is refused with the same message as a file that is not an
image, so a request cannot learn whether some server path exists.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from grace.chat import MAX_SEED, InvalidRequest, check_image

NOT_AN_IMAGE = "That file is not an image this app can read. Please upload a PNG, JPEG, WebP, GIF or BMP image."


class InvalidInput(ValueError):
    """Something the user sent cannot be used; the message says what and how to fix it."""


@dataclass
class UploadLimits:
    max_bytes: int                                    # GRACE_MAX_FILE_SIZE
    max_pixels: int                                   # GRACE_MAX_IMAGE_PIXELS
    folders: list[Path] = field(default_factory=list)  # Gradio's upload folder and operator-allowed ones

    def too_big(self, size: int) -> InvalidInput:
        return InvalidInput(f"The file is too big: {size / 1e6:.1f} MB, the limit is {self.max_bytes / 1e6:.1f} MB.")


def limit_pixels(max_pixels: int) -> None:
    """Make every PIL open in this process refuse decompression bombs (PIL raises above twice this)."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def inside(path: Path, folders: list[Path]) -> bool:
    real = Path(os.path.realpath(path))
    return any(real.is_relative_to(Path(os.path.realpath(folder))) for folder in folders)


def read_upload(path: str | os.PathLike, limits: UploadLimits) -> Image.Image:
    """The checked RGB image stored at `path`, which must be a regular file inside `limits.folders`."""
    try:
        path = Path(os.path.realpath(path))
        if not inside(path, limits.folders):
            raise InvalidInput(NOT_AN_IMAGE)
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise InvalidInput(NOT_AN_IMAGE)
            if info.st_size > limits.max_bytes:
                raise limits.too_big(info.st_size)
            data = f.read(limits.max_bytes + 1)
    except InvalidInput:
        raise
    except (OSError, ValueError):   # missing, a folder, unreadable, a name with a NUL: all the same answer
        raise InvalidInput(NOT_AN_IMAGE) from None
    return decode_image(data, limits)


def read_data_url(url: str, limits: UploadLimits) -> Image.Image:
    """The checked RGB image carried in a `data:[type];base64,...` URL, sized before it is decoded."""
    header, sep, body = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise InvalidInput(NOT_AN_IMAGE)
    if len(body) * 3 // 4 > limits.max_bytes + 3:
        raise limits.too_big(len(body) * 3 // 4)
    try:
        data = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(NOT_AN_IMAGE) from None
    if len(data) > limits.max_bytes:
        raise limits.too_big(len(data))
    return decode_image(data, limits)


def decode_image(data: bytes, limits: UploadLimits) -> Image.Image:
    """Read the header (size first: a bomb is refused before any pixel is decoded), then decode."""
    max_pixels = limits.max_pixels
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x MAX_IMAGE_PIXELS; treat that as the bomb it may be.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))   # lazy: parses the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidInput(f"The image is too large: more than {max_pixels:,} pixels. "
                           "Please upload a smaller image.") from None
    except Exception:   # PIL signals "not an image" in many ways
        raise InvalidInput(NOT_AN_IMAGE) from None
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidInput(f"The image is too large: {width}x{height} = {width * height:,} pixels, the limit is "
                           f"{max_pixels:,}. Please upload a smaller image.")
    try:
        check_image(image)
    except InvalidRequest as err:
        raise InvalidInput(str(err)) from None
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except Exception:   # truncated / corrupt data surfaces as OSError, SyntaxError, ValueError, ...
        raise InvalidInput("The image is damaged or truncated and could not be decoded. "
                           "Please upload it again or try another file.") from None


def open_image(path: str | os.PathLike, max_pixels: int) -> Image.Image:
    """A file the operator named (examples, tests): checked and decoded like an upload."""
    path = Path(path)
    return read_upload(path, UploadLimits(max_bytes=path.stat().st_size if path.is_file() else 0,
                                          max_pixels=max_pixels, folders=[path.parent]))


def check_question(question: str | None, max_chars: int) -> str:
    text = (question or "").strip() if isinstance(question, (str, type(None))) else None
    if text is None:
        raise InvalidInput("The question must be text.")
    if not text:
        raise InvalidInput("Please type a question about the image.")
    if len(text) > max_chars:
        raise InvalidInput(f"The question is too long: {len(text):,} characters, the limit is {max_chars:,}. "
                           "Please shorten it.")
    return text


def question_problem(question: str | None, max_chars: int) -> str | None:
    """The message `check_question` would raise, or None when the question is fine."""
    try:
        check_question(question, max_chars)
    except InvalidInput as err:
        return str(err)
    return None


def number(value, name: str, whole: bool = False) -> float | int:
    """A number from a form or an API call (numbers or numeric strings), or InvalidInput naming `name`."""
    if isinstance(value, bool) or value is None or (isinstance(value, str) and not value.strip()):
        raise InvalidInput(f"{name} must be a number.")
    try:
        result = float(value) if not isinstance(value, int) else value
    except (TypeError, ValueError, OverflowError):
        raise InvalidInput(f"{name} must be a number, got {str(value)[:40]!r}.") from None
    if isinstance(result, float) and not math.isfinite(result):
        raise InvalidInput(f"{name} must be a finite number.")
    if whole:
        if result != int(result):
            raise InvalidInput(f"{name} must be a whole number.")
        return int(result)
    return result


def flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1) and not isinstance(value, float):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", ""):
        return value.strip().lower() in ("true", "1", "yes")
    raise InvalidInput(f"{name} must be true or false.")


def check_generation(max_new_tokens, sampling, temperature, top_p, seed, limit: int) -> dict:
    """Generation settings from the form or the API, checked: temperature and top-p only when sampling."""
    tokens = number(max_new_tokens, "max_new_tokens", whole=True)
    if not 1 <= tokens <= limit:
        raise InvalidInput(f"max_new_tokens must be between 1 and {limit}, got {tokens}.")
    sampling = flag(sampling, "sampling")
    checked = {"max_new_tokens": tokens, "do_sample": sampling, "temperature": 0.7, "top_p": 0.9, "seed": None}
    if sampling:
        temp, nucleus = number(temperature, "temperature"), number(top_p, "top_p")
        if not 0 < temp <= 5:
            raise InvalidInput(f"temperature must be above 0 and at most 5, got {temp:g}.")
        if not 0 < nucleus <= 1:
            raise InvalidInput(f"top_p must be above 0 and at most 1, got {nucleus:g}.")
        checked.update(temperature=float(temp), top_p=float(nucleus))
        if seed not in (None, ""):
            seed = number(seed, "seed", whole=True)
            if not 0 <= seed <= MAX_SEED:
                raise InvalidInput(f"seed must be a whole number from 0 to {MAX_SEED}.")
            checked["seed"] = seed
    return checked


def training_numbers(steps, lr, scale_lr, tau, eta, omega, temperature, max_steps: int) -> tuple[dict, str | None]:
    """The Train form's numbers as floats (steps an int), and what is wrong with them (None when nothing)."""
    numbers = {}
    for name, value in (("steps", steps), ("lr", lr), ("scale_lr", scale_lr), ("tau", tau), ("eta", eta),
                        ("omega", omega), ("temperature", temperature)):
        try:
            numbers[name] = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError, OverflowError):
            numbers[name] = math.nan
    if not all(math.isfinite(x) for x in numbers.values()):
        return numbers, "steps, learning rates, τ, η, ω and temperature must be finite numbers"
    if not (numbers["steps"] == int(numbers["steps"]) and 1 <= numbers["steps"] <= max_steps):
        return numbers, f"steps must be a whole number between 1 and {max_steps}"
    if min(numbers["lr"], numbers["scale_lr"], numbers["temperature"]) <= 0:
        return numbers, "learning rates and temperature must be positive"
    numbers["steps"] = int(numbers["steps"])
    return numbers, None
