"""Finding and reading LLaVA's CLIP vision tower.

LLaVA-1.5 checkpoints name their tower (`mm_vision_tower`, e.g. `openai/clip-vit-large-patch14-336`)
and the original loader always reads it from there, ignoring any copy inside the checkpoint. The same
here, in this order: the `vision_tower=` argument, the GRACE_VISION_TOWER environment variable (a
folder or a repo id, for offline machines and mirrors), then the Hub repo the config names
(downloaded, or read from the local Hugging Face cache when HF_HUB_OFFLINE=1). A path written in a
checkpoint's config is never opened: only what the caller names is read from disk.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPVisionConfig

from ..errors import GraceLoadError
from ..hub import is_repo_id
from . import naming

ENV_VAR = "GRACE_VISION_TOWER"
TOWER_FILES = ["config.json", "preprocessor_config.json", "*.safetensors", "*.safetensors.index.json"]


@dataclass
class VisionTower:
    path: Path
    config: CLIPVisionConfig
    preprocessor: dict          # preprocessor_config.json (CLIP's old feature-extractor style or the new one)


def _offline_hint(repo: str) -> str:
    return (f"pass vision_tower='/path/to/{repo.split('/')[-1]}' to grace.load (or --vision-tower on the CLI), "
            f"or set {ENV_VAR} to that folder, or put '{repo}' in the Hugging Face cache (`hf download {repo}`)")


def _download(repo: str, hint_repo: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        path = Path(snapshot_download(repo, allow_patterns=TOWER_FILES))
        if not any(path.glob("*.safetensors")):   # older repos ship only a pickle, read weights-only below
            path = Path(snapshot_download(repo, allow_patterns=TOWER_FILES + ["pytorch_model.bin"]))
        return path
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError):
        raise GraceLoadError(f"the vision tower '{repo}' is not a Hub repository anyone can read; "
                             + _offline_hint(hint_repo)) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError):
        raise GraceLoadError(f"the LLaVA vision tower '{repo}' could not be found: it is not in the local Hugging "
                             "Face cache and the Hub could not be reached (offline, or no network). "
                             + _offline_hint(hint_repo)) from None


def locate(config: dict, vision_tower: str | os.PathLike | None = None) -> Path:
    """The local folder of the CLIP tower a LLaVA config asks for (see the module docstring)."""
    named = str(config.get("mm_vision_tower") or config.get("vision_tower") or "")
    given = vision_tower if vision_tower is not None else os.environ.get(ENV_VAR) or None
    if given is not None:
        path = Path(given).expanduser()
        if path.is_dir():
            return path
        if is_repo_id(str(given)):
            return _download(str(given), named or str(given))
        raise GraceLoadError(f"the vision tower folder {path} does not exist (given as "
                             f"{'vision_tower=' if vision_tower is not None else ENV_VAR})")
    if not named:
        raise GraceLoadError("this LLaVA config names no vision tower (mm_vision_tower); pass vision_tower=")
    if not is_repo_id(named):
        raise GraceLoadError(f"the config's mm_vision_tower '{named}' is not a Hub repo id, and grace does not "
                             "open paths written in a checkpoint; pass vision_tower='/path/to/it' instead")
    return _download(named, named)


def read(path: Path) -> VisionTower:
    """The tower's vision config and image-processing settings (a CLIPModel or CLIPVisionModel folder)."""
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
        preprocessor = json.loads((path / "preprocessor_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise GraceLoadError(f"the vision tower folder {path} has no {Path(err.filename).name}; it should be a "
                             "CLIP checkpoint like openai/clip-vit-large-patch14-336") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GraceLoadError(f"the vision tower folder {path} holds invalid JSON ({err})") from None
    if raw.get("model_type") not in ("clip", "clip_vision_model"):
        raise GraceLoadError(f"the vision tower {path} is a '{raw.get('model_type')}' model, not CLIP")
    vision = raw.get("vision_config", raw) if raw.get("model_type") == "clip" else raw
    vision = {k: v for k, v in vision.items() if k not in ("model_type", "architectures", "transformers_version")}
    try:
        config = CLIPVisionConfig(**vision)
    except (TypeError, ValueError) as err:
        raise GraceLoadError(f"the vision tower {path} has an invalid CLIP vision config: {err}") from None
    return VisionTower(path, config, preprocessor)


def weights(tower: VisionTower) -> dict[str, torch.Tensor]:
    """The tower's vision-model tensors under the LLaVA model's names (text tower and projections dropped)."""
    from ..checkpoint_files import read_sidecar, read_tensors, safetensors_files

    if any(tower.path.glob("*.safetensors")):
        tensors = read_tensors(safetensors_files(tower.path))
    elif (tower.path / "pytorch_model.bin").is_file():
        tensors = read_sidecar(tower.path / "pytorch_model.bin")   # weights-only unpickling
    else:
        raise GraceLoadError(f"the vision tower folder {tower.path} has no weights (model.safetensors)")
    out = {}
    for key, value in tensors.items():
        name = naming.vision_tower_to_hf(key)
        if name is not None:
            out[name] = value
    if not out:
        raise GraceLoadError(f"the vision tower {tower.path} holds no vision_model.* tensors")
    return out
