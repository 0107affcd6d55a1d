"""One benchmark question as every reader hands it over, and the image sources a question may carry."""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

LETTERS = "ABCDEFGHIJ"


class BenchmarkError(ValueError):
    """A benchmark's files are missing or not in the published layout. The message says what was expected."""


class Base64Image(str):
    """A base64-encoded picture (VLMEvalKit TSV cell), decoded only when a model needs it."""


@dataclass
class EvalItem:
    question: str
    answer: str                       # gold: an option letter, "1"/"0" (yes/no), or free text
    type: str = "all"                 # the breakdown the summary's per_category uses
    image: Any = None                 # None, one source (PIL image, path, bytes, HF image dict, Base64Image) or a list
    options: list[tuple[str, str]] | None = None   # (letter, text) in prompt order
    id: Any = None                    # the benchmark's own question id (a dict for HallusionBench)
    bench: str = "shapes"
    kind: str = ""                    # choice | yesno | open | exact  (default: choice with options, else exact)
    hint: str | None = None
    pick: str = "first"               # which valid letter in a reply counts: first (authors' rule) or last (MMStar)
    groups: dict[str, str] = field(default_factory=dict)   # extra breakdowns, e.g. {"subject": ..., "modality": ...}
    error: str | None = None          # the question cannot be asked as published: scored wrong, as the authors do

    def __post_init__(self):
        if not self.kind:
            self.kind = "choice" if self.options else "exact"

    @property
    def letters(self) -> str:
        """Letters a reply may pick: those of the listed options (MMStar without option columns: A-D)."""
        return "".join(letter for letter, _ in self.options) if self.options else "ABCD"

    @property
    def image_sources(self) -> list:
        if self.image is None:
            return []
        return list(self.image) if isinstance(self.image, (list, tuple)) else [self.image]

    def load_images(self) -> list[Image.Image]:
        return [open_image(source) for source in self.image_sources]

    def load_image(self) -> Image.Image | None:
        images = self.load_images()
        return images[0] if images else None


def open_image(source) -> Image.Image:
    """An RGB picture from any source a benchmark file holds; a plain ValueError when it cannot be read."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    try:
        if isinstance(source, Base64Image):
            data = base64.b64decode(source, validate=False)
        elif isinstance(source, dict):
            data = source.get("bytes")
            if not data:
                if source.get("path") and Path(source["path"]).is_file():
                    return open_image(Path(source["path"]))
                raise ValueError("the image cell holds no bytes")
        elif isinstance(source, (bytes, bytearray)):
            data = bytes(source)
        else:
            with Image.open(Path(source)) as img:
                return img.convert("RGB")
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except (OSError, binascii.Error, Image.DecompressionBombError, SyntaxError) as err:
        name = str(source) if isinstance(source, (str, Path)) and not isinstance(source, Base64Image) else "embedded image"
        raise ValueError(f"cannot read image ({name}): {err}") from None


def has_image(cell) -> bool:
    """Whether a parquet image cell holds a picture (HF image struct, raw bytes or a PIL image)."""
    if isinstance(cell, dict):
        return cell.get("bytes") is not None and len(cell.get("bytes")) > 0
    if isinstance(cell, (bytes, bytearray)):
        return len(cell) > 0
    return isinstance(cell, Image.Image)


def missing(value) -> bool:
    """pandas' notion of an empty cell (None / NaN), which the authors' readers skip."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def plain(value):
    """A cell as a plain Python value: NaN -> None, numpy scalars -> int/float/str, 3.0 -> 3."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str, bytes)):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return int(value)
    return value


def text(value) -> str:
    value = plain(value)
    return "" if value is None else str(value)


def cell(value) -> str:
    """A table cell as the authors' scripts print it: str() of what pandas read ("" when empty), so a float
    column shows 4.0, exactly as their prompts did."""
    return "" if missing(value) else str(value)
