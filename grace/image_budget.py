"""How a model sees a picture: the pixel budget of its processor (Qwen-VL's min_pixels / max_pixels, saved in
the checkpoint's preprocessor config), the size a picture is resized to and the visual tokens it becomes.

    view = grace.seen_as(loaded, image)       # ImageView(width=192, height=128, visual_tokens=24, ...)
    view.describe()                           # "seen as 192x128, 24 visual tokens"

Qwen-VL's resize keeps the aspect ratio, so a picture thinner than about 1:8 cannot fit a small budget (a
6000x8 strip would come out 32 px high and hundreds of tokens long, and past 1:200 the processor refuses
it). `fit_picture` pads such a strip with its own edge colour to MAX_ASPECT first; every picture the chat and
evaluation helpers pass to a processor goes through it (grace.chat refuses, in words, strips past 1:200 before
that, as the processor would; `seen_as` answers for any size).
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

MAX_ASPECT = 8.0


@dataclass(frozen=True)
class ImageView:
    width: int                # as the vision tower sees it
    height: int
    visual_tokens: int        # image tokens in the language model's sequence
    patches: int              # vision-tower patches
    original: tuple[int, int]
    min_pixels: int
    max_pixels: int

    def describe(self) -> str:
        return f"seen as {self.width}×{self.height}, {self.visual_tokens} visual tokens"


def pixel_budget(processor) -> tuple[int, int, int, int]:
    """(min_pixels, max_pixels, patch_size, merge_size) of a Qwen-VL processor (or its image processor)."""
    image_processor = getattr(processor, "image_processor", processor)
    size = dict(getattr(image_processor, "size", None) or {})
    low = size.get("shortest_edge") or getattr(image_processor, "min_pixels", None) or 56 * 56
    high = size.get("longest_edge") or getattr(image_processor, "max_pixels", None) or 28 * 28 * 1280
    return int(low), int(high), int(image_processor.patch_size), int(image_processor.merge_size)


def fit_picture(image: Image.Image) -> Image.Image:
    """The picture in RGB, a strip thinner than 1:MAX_ASPECT padded (centred, with its mean edge colour)."""
    image = image.convert("RGB")
    width, height = image.size
    long_side, short_side = max(width, height), max(1, min(width, height))
    if long_side / short_side <= MAX_ASPECT:
        return image
    need = int(-(-long_side // MAX_ASPECT))
    edge = image.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))
    size = (width, need) if width >= height else (need, height)
    canvas = Image.new("RGB", size, edge)
    canvas.paste(image, ((size[0] - width) // 2, (size[1] - height) // 2))
    return canvas


def resized_size(width: int, height: int, processor) -> tuple[int, int]:
    """(width, height) Qwen-VL's smart resize gives a picture of this size under the processor's budget."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    low, high, patch, merge = pixel_budget(processor)
    h, w = smart_resize(height, width, factor=patch * merge, min_pixels=low, max_pixels=high)
    return w, h


def _fixed_square(processor) -> tuple[int, int] | None:
    """(side, patch) of a processor that makes every picture one fixed square (LLaVA-1.5's CLIP crop), else None."""
    image_processor = getattr(processor, "image_processor", processor)
    if getattr(image_processor, "merge_size", None) is not None:
        return None                                            # Qwen-VL: a pixel budget, not a fixed size
    crop = getattr(image_processor, "crop_size", None)
    side = crop if isinstance(crop, int) else (crop.get("height") if isinstance(crop, dict) else
                                               getattr(crop, "height", None))    # a dict or transformers' SizeDict
    patch = getattr(processor, "patch_size", None)
    return (int(side), int(patch)) if side and patch else None


def seen_as(model_or_processor, image: Image.Image) -> ImageView:
    """How a loaded model (grace.load's LoadedModel) or a processor sees `image`: after fit_picture and the
    processor's resize, its size and the number of visual tokens. LLaVA-1.5 pads every picture to a square and
    resizes it to its CLIP crop (336x336, 576 tokens of 14 px)."""
    processor = getattr(model_or_processor, "processor", model_or_processor)
    square = _fixed_square(processor)
    if square is not None:
        side, patch = square
        tokens = (side // patch) ** 2
        return ImageView(side, side, tokens, tokens, image.size, side * side, side * side)
    fitted = fit_picture(image)
    low, high, patch, merge = pixel_budget(processor)
    width, height = resized_size(*fitted.size, processor)
    patches = (width // patch) * (height // patch)
    return ImageView(width, height, patches // (merge * merge), patches, image.size, low, high)
