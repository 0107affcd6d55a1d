"""Every knob of the app, read from environment variables; `app.py`'s command line overrides them.

Nothing here imports torch or touches a GPU: settings are read before anything heavy is loaded.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# name -> (default, meaning); the README's table of environment variables is generated from this.
ENVIRONMENT = {
    "GRACE_HOST": ("127.0.0.1 (0.0.0.0 when SPACE_ID is set)", "address the server binds"),
    "GRACE_PORT": ("7860", "port the server listens on"),
    "GRACE_AUTH": ("unset", "`user:pass` (comma-separated for several users) to require a login"),
    "GRACE_SHARE": ("0", "1 opens a public gradio.live share link (off by default)"),
    "GRACE_CACHE_BYTES": ("8GiB", "memory budget of the model cache (`6e9`, `4GiB`, `500MB`); least recently "
                                  "used models are evicted past it"),
    "GRACE_DEVICE": ("cuda when available, else cpu", "device the models are loaded on"),
    "GRACE_MAX_FILE_SIZE": ("10mb", "largest image accepted, however it arrives (upload or inline `data:` URL)"),
    "GRACE_MAX_IMAGE_PIXELS": ("25000000", "largest image (width x height) accepted; bigger ones, and "
                                            "decompression bombs, are refused"),
    "GRACE_MAX_QUESTION_CHARS": ("1000", "longest question accepted"),
    "GRACE_MAX_NEW_TOKENS": ("512", "upper limit of the max-new-tokens slider"),
    "GRACE_CONCURRENCY": ("2", "requests of one kind served at once; the rest wait in the queue"),
    "GRACE_QUEUE_SIZE": ("64", "requests that may wait in the queue; beyond it new ones are told to retry"),
    "GRACE_ZOO": ("assets/zoo", "folder of the offline zoo (one sub-folder per variant)"),
    "GRACE_FIXTURES": ("../shared/fixtures", "tiny random checkpoints used when the zoo is absent "
                                             "(development models, gibberish answers)"),
    "GRACE_HUB": ("auto", "`auto`: offer the Hub releases when the Hub answers or they are cached; "
                          "`on` / `off` force it"),
    "GRACE_FAMILIES": ("unset", 'extra model families as JSON: `{"name": {"label": "folder or repo id", ...}}`'),
    "GRACE_ALLOW_LOCAL": ("unset", "folders (separated by `:`) whose checkpoints become a family and whose "
                                   "ShareGPT4V *.json files become training data choices"),
    "GRACE_DEFAULT_FAMILY": ("Hub releases on a GPU, else the offline zoo", "family selected when the page opens"),
    "GRACE_RUNS_DIR": ("runs", "where training jobs write their checkpoints and metrics.jsonl"),
    "GRACE_TRAIN": ("1; `view` on a public Space without GRACE_AUTH",
                    "`1`: the Train tab starts and stops jobs; `view`: it only shows the runs (no start, stop, "
                    "resume or delete); `0`: no Train tab and no training endpoints"),
    "GRACE_TRAIN_MAX_STEPS": ("5000", "most optimizer steps a job started from the UI may run"),
    "GRACE_RUNS_MAX_BYTES": ("20GB", "disk budget of the runs folder: the oldest finished runs are deleted past it"),
    "GRACE_RUNS_MAX_AGE_DAYS": ("30", "finished runs older than this are deleted (0 keeps them)"),
    "GRACE_UPLOADS_MAX_AGE_HOURS": ("24", "uploads and downloads in Gradio's cache older than this are deleted"),
    "GRACE_PRELOAD": ("1 on a ZeroGPU Space, else 0", "load the default family's columns at start-up (on CPU; "
                                                       "ZeroGPU moves them to the GPU inside each call)"),
}


def settings_table() -> str:
    """The README's table of environment variables (`python -m demo.settings` prints it)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| `{name}` | {default} | {meaning} |" for name, (default, meaning) in ENVIRONMENT.items()]
    return "\n".join(rows)

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30,
          "gib": 2**30, "ti": 2**40, "tib": 2**40}


class SettingsError(ValueError):
    """An environment variable or command-line option has a value the app cannot use."""


def parse_bytes(text: str | int) -> int:
    """'8GiB' -> 8589934592, '6e9' -> 6000000000, '500MB' -> 500000000."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match or (match.group(2) or "").lower() not in _UNITS:
        raise SettingsError(f"not a size in bytes: {text!r} (examples: 6e9, 4GiB, 500MB)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def parse_auth(text: str | None) -> list[tuple[str, str]] | None:
    if not text:
        return None
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise SettingsError("GRACE_AUTH must be user:pass (comma-separated for several users)")
        pairs.append((user, password))
    return pairs


def parse_family_option(text: str) -> tuple[str, dict[str, str]]:
    """'NAME=label:path,label:path' -> (NAME, {label: path}). Paths may hold ':' after the first."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise SettingsError(f"--family expects NAME=label:path,label:path..., got {text!r}")
    variants = {}
    for item in rest.split(","):
        label, sep, source = item.strip().partition(":")
        if not sep or not label.strip() or not source.strip():
            raise SettingsError(f"--family {name}: expected label:path, got {item!r}")
        variants[label.strip()] = source.strip()
    return name.strip(), variants


def parse_families_json(text: str | None) -> dict[str, dict[str, str]]:
    """GRACE_FAMILIES: {"name": {"label": "source"}} or {"name": [{"label": ..., "source": ...}]}."""
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise SettingsError(f"GRACE_FAMILIES is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise SettingsError("GRACE_FAMILIES must be a JSON object: {\"family\": {\"label\": \"path or repo\"}}")
    families = {}
    for name, variants in raw.items():
        if isinstance(variants, list):
            try:
                variants = {v["label"]: v["source"] for v in variants}
            except (TypeError, KeyError):
                raise SettingsError(f"GRACE_FAMILIES[{name!r}]: list items need 'label' and 'source'") from None
        if not isinstance(variants, dict) or not variants or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in variants.items()):
            raise SettingsError(f"GRACE_FAMILIES[{name!r}] must map labels to folders or repo ids")
        families[str(name)] = dict(variants)
    return families


def _int(env: dict, name: str, default: int, minimum: int = 1) -> int:
    value = env.get(name)
    if value in (None, ""):
        return default
    try:
        number = int(float(value))
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {value!r}") from None
    if number < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {number}")
    return number


def _float(env: dict, name: str, default: float) -> float:
    value = env.get(name)
    if value in (None, ""):
        return default
    try:
        number = float(value)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {value!r}") from None
    if not number >= 0:
        raise SettingsError(f"{name} must be 0 or more, got {value!r}")
    return number


def _flag(env: dict, name: str, default: bool) -> bool:
    value = env.get(name)
    if value in (None, ""):
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 7860
    auth: list[tuple[str, str]] | None = None
    share: bool = False
    cache_bytes: int = 8 * 2**30
    device: str | None = None
    max_file_size: str = "10mb"
    max_image_pixels: int = 25_000_000
    max_question_chars: int = 1000
    max_new_tokens: int = 512
    concurrency: int = 2
    queue_size: int = 64
    zoo_dir: Path = REPO_ROOT / "assets" / "zoo"
    fixtures_dir: Path = REPO_ROOT.parent / "shared" / "fixtures"
    hub: str = "auto"
    families: dict[str, dict[str, str]] = field(default_factory=dict)
    allow_local: list[Path] = field(default_factory=list)
    default_family: str | None = None
    runs_dir: Path = REPO_ROOT / "runs"
    train_mode: str = "on"            # on | view | off
    train_max_steps: int = 5000
    runs_max_bytes: int = 20 * 10**9
    runs_max_age_days: float = 30.0
    uploads_max_age_hours: float = 24.0
    preload: bool = False
    examples_dir: Path = REPO_ROOT / "assets" / "examples"

    @property
    def train(self) -> bool:
        return self.train_mode != "off"

    @train.setter
    def train(self, on: bool) -> None:
        if not on:
            self.train_mode = "off"

    @property
    def train_control(self) -> bool:
        """Jobs may be started, stopped, resumed and deleted from the app."""
        return self.train_mode == "on"

    @property
    def max_file_bytes(self) -> int:
        return parse_bytes(self.max_file_size)

    @classmethod
    def from_env(cls, env: dict | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        hub = (env.get("GRACE_HUB") or "auto").strip().lower()
        if hub not in ("auto", "on", "off"):
            raise SettingsError(f"GRACE_HUB must be auto, on or off, got {hub!r}")
        auth = parse_auth(env.get("GRACE_AUTH"))
        public_space = bool(env.get("SPACE_ID")) and not auth
        train_mode = (env.get("GRACE_TRAIN") or ("view" if public_space else "1")).strip().lower()
        train_mode = {"1": "on", "true": "on", "yes": "on", "on": "on", "view": "view", "read-only": "view",
                      "0": "off", "false": "off", "no": "off", "off": "off"}.get(train_mode)
        if train_mode is None:
            raise SettingsError("GRACE_TRAIN must be 1, view or 0")
        max_file_size = env.get("GRACE_MAX_FILE_SIZE") or "10mb"
        parse_bytes(max_file_size)
        return cls(
            host=env.get("GRACE_HOST") or ("0.0.0.0" if env.get("SPACE_ID") else "127.0.0.1"),
            port=_int(env, "GRACE_PORT", 7860),
            auth=auth,
            share=_flag(env, "GRACE_SHARE", False),
            cache_bytes=parse_bytes(env.get("GRACE_CACHE_BYTES") or "8GiB"),
            device=env.get("GRACE_DEVICE") or None,
            max_file_size=max_file_size,
            max_image_pixels=_int(env, "GRACE_MAX_IMAGE_PIXELS", 25_000_000, minimum=64),
            max_question_chars=_int(env, "GRACE_MAX_QUESTION_CHARS", 1000),
            max_new_tokens=_int(env, "GRACE_MAX_NEW_TOKENS", 512),
            concurrency=_int(env, "GRACE_CONCURRENCY", 2),
            queue_size=_int(env, "GRACE_QUEUE_SIZE", 64),
            zoo_dir=Path(env.get("GRACE_ZOO") or REPO_ROOT / "assets" / "zoo"),
            fixtures_dir=Path(env.get("GRACE_FIXTURES") or REPO_ROOT.parent / "shared" / "fixtures"),
            hub=hub,
            families=parse_families_json(env.get("GRACE_FAMILIES")),
            allow_local=[Path(p) for p in (env.get("GRACE_ALLOW_LOCAL") or "").split(os.pathsep) if p.strip()],
            default_family=env.get("GRACE_DEFAULT_FAMILY") or None,
            runs_dir=Path(env.get("GRACE_RUNS_DIR") or REPO_ROOT / "runs"),
            train_mode=train_mode,
            train_max_steps=_int(env, "GRACE_TRAIN_MAX_STEPS", 5000),
            runs_max_bytes=parse_bytes(env.get("GRACE_RUNS_MAX_BYTES") or "20GB"),
            runs_max_age_days=_float(env, "GRACE_RUNS_MAX_AGE_DAYS", 30.0),
            uploads_max_age_hours=_float(env, "GRACE_UPLOADS_MAX_AGE_HOURS", 24.0),
            preload=_flag(env, "GRACE_PRELOAD", bool(env.get("SPACES_ZERO_GPU"))),
        )


if __name__ == "__main__":
    print(settings_table())
