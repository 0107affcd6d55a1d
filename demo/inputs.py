"""Gradio inputs whose values are checked on the server by `validate`, whatever a client sends.

The instances' preprocess is replaced rather than the components subclassed: gradio's component
metaclass writes a .pyi copy of any module that defines a component subclass.
"""

from __future__ import annotations

import functools
import logging

import gradio as gr
from gradio.utils import get_upload_folder

from . import validate

log = logging.getLogger(__name__)


class BadImage(validate.InvalidInput):
    """What an image input hands on for an upload that is not a usable image; its message says why."""


def decode_upload(limits: validate.UploadLimits, payload):
    """Preprocess of the app's image inputs: the checked RGB image, or a BadImage saying what is wrong.

    Only two kinds of payload are read: bytes the request carries (a data: URL) and a file inside
    Gradio's upload folder (or a folder the operator allowed, such as the examples). Gradio's own
    preprocess is not used: a raw API call naming a server path without `meta` skips its upload check.
    """
    if payload is None:
        return None
    url = getattr(payload, "url", None) if not isinstance(payload, dict) else payload.get("url")
    path = getattr(payload, "path", None) if not isinstance(payload, dict) else payload.get("path")
    try:
        if isinstance(url, str) and url.startswith("data:"):
            return validate.read_data_url(url, limits)
        if not isinstance(path, str) or not path:
            raise validate.InvalidInput(validate.NOT_AN_IMAGE)
        return validate.read_upload(path, limits)
    except validate.InvalidInput as err:
        log.info("refused an image: %s", err)
        return BadImage(str(err))


def upload_folders(extra: list) -> list:
    return [get_upload_folder(), *extra]


def checked_image(limits: validate.UploadLimits, **kwargs) -> gr.Image:
    """A gr.Image whose uploads go through `decode_upload` (the handler gets a PIL image or a BadImage)."""
    image = gr.Image(type="pil", image_mode=None, **kwargs)
    image.preprocess = functools.partial(decode_upload, limits)
    return image


def passthrough(component):
    """Hand the raw value to the handler (checked there by `validate.number` / `flag`): gradio's own
    conversion would fail on a malformed number with an error the client cannot read."""
    component.preprocess = lambda payload: payload
    return component
