"""Turning a checkpoint name into a local folder: a folder as is, a Hub repo id via `snapshot_download`."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import GraceLoadError

# What a Qwen3-VL checkpoint needs; pytorch_model*.bin and other stray files are never fetched.
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "qat_quantized_weights.bin", "*.md"]
# What `grace.inspect` fetches: the config and the formats' JSON sidecars, no weights.
CONFIG_FILES = ["*.json"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source)) and not source.startswith((".", "/", "~"))


def resolve(source: str | os.PathLike, *, revision: str | None = None, files: list[str] = HUB_FILES) -> Path:
    """Local folder for `source`, downloading from the Hub (with progress bars) when it is a repo id:
    only the files matching the `files` patterns."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise GraceLoadError(f"{path} is a file; give the checkpoint's folder instead")
        return path
    text = str(source)
    if not is_repo_id(text):
        raise GraceLoadError(f"checkpoint folder not found: {path}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=files))
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as err:
        raise GraceLoadError(f"'{text}' is not a local folder, and the Hugging Face Hub refused it: "
                             f"{type(err).__name__}. Check the repo id (and `hf auth login` for gated repos).") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        raise GraceLoadError(
            f"'{text}' is not a local folder and is not in the Hugging Face cache ({cache}), and the Hub "
            f"could not be reached ({type(err).__name__}). Download it on a machine with network access: "
            f"`hf download {text}` (then copy the cache), or pass the path of a folder holding it."
        ) from None
