"""The model families the app offers: name -> variants (label, source, kind).

The browser only ever picks a family name and variant labels from this registry; the sources
(folders, Hub repo ids) are decided here, by the operator, never by a request.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .settings import Settings

log = logging.getLogger(__name__)

HUB_FAMILY = "GRACE Qwen3-VL-2B (Hugging Face Hub)"
ZOO_FAMILY = "offline zoo (assets/zoo)"
DEV_FAMILY = "development models (random weights)"
TRAINED_PREFIX = "trained: "
LOCAL_PREFIX = "local: "

HUB_VARIANTS = [  # label, repo id, kind, shown by default
    ("GRACE BF16", "ForeverBlue/Qwen3-VL-2B-GRACE-BF16", "bf16", True),
    ("GRACE W8G128", "ForeverBlue/Qwen3-VL-2B-GRACE-W8G128", "int8", True),
    ("GRACE W4G128-AWQ", "ForeverBlue/Qwen3-VL-2B-GRACE-W4G128-AWQ", "int4", True),
    ("Qwen3-VL-2B-Instruct (baseline)", "Qwen/Qwen3-VL-2B-Instruct", "bf16", False),
    # the rival a user would pick instead: post-training quantized (no distillation), same base model
    ("AutoRound W4A16 (PTQ)", "Vishva007/Qwen3-VL-2B-Instruct-W4A16-AutoRound-GPTQ", "int4", False),
]
LLAVA_FAMILY = "GRACE LLaVA-1.5-7B (Hugging Face Hub)"
LLAVA_VARIANTS = [  # label, repo id, kind, shown by default
    ("GRACE W4G128 (QAT, as INT4)", "ForeverBlue/LLaVA-1.5-7B-GRACE-W4G128", "int4", True),
    ("GRACE W4G128-AWQ", "ForeverBlue/LLaVA-1.5-7B-GRACE-W4G128-AWQ", "int4", True),
    ("LLaVA-1.5-7B fp16 (reference)", "llava-hf/llava-1.5-7b-hf", "bf16", True),
]
# what the GRACE LLaVA releases load their vision tower from (their config's mm_vision_tower)
LLAVA_VISION_TOWER = "openai/clip-vit-large-patch14-336"
ZOO_VARIANTS = [  # folder under assets/zoo, label, kind, shown by default
    ("grace-bf16", "GRACE BF16", "bf16", True),
    ("grace-w8g128", "GRACE W8G128", "int8", True),
    ("grace-w4g128-awq", "GRACE W4G128-AWQ", "int4", True),
    ("teacher", "teacher", "bf16", False),
    ("student", "student (before distillation)", "bf16", False),
    ("ptq-rtn-w8g128", "PTQ RTN W8G128", "int8", False),
    ("ptq-rtn-w4g128", "PTQ RTN W4G128", "int4", False),
    ("qat-ce-w4g128", "QAT CE-only W4G128", "int4", False),
]
DEV_VARIANTS = [  # fixture folder, label, kind, shown by default
    ("qwen3vl-tiny-bf16", "BF16", "bf16", True),
    ("qwen3vl-tiny-grace-w8g128-qat", "W8G128 (QAT)", "int8", True),
    ("qwen3vl-tiny-grace-w4g128-awq", "W4G128-AWQ", "int4", True),
    ("qwen3vl-tiny-grace-w4g128-qat", "W4G128 (QAT)", "int4", False),
    ("qwen3vl-tiny-hf-awq", "HF AWQ INT4", "int4", False),
]


@dataclass(frozen=True)
class Variant:
    label: str
    source: str          # local folder or Hub repo id, handed to grace.load
    kind: str            # bf16 | int8 | int4
    default: bool = True  # one of the columns shown when the family is picked


@dataclass
class Family:
    name: str
    variants: list[Variant]
    note: str = ""       # shown under the family picker (e.g. "random weights")

    def variant(self, label: str) -> Variant:
        for v in self.variants:
            if v.label == label:
                return v
        raise KeyError(f"family '{self.name}' has no variant '{label}' "
                       f"(it has: {', '.join(v.label for v in self.variants)})")

    @property
    def labels(self) -> list[str]:
        return [v.label for v in self.variants]

    @property
    def default_labels(self) -> list[str]:
        return [v.label for v in self.variants if v.default] or self.labels[:3]

    def reference(self, labels: list[str]) -> str | None:
        """The column other answers are compared with: the first BF16 one, else the first one."""
        chosen = [self.variant(label) for label in labels]
        for v in chosen:
            if v.kind == "bf16":
                return v.label
        return chosen[0].label if chosen else None


@dataclass
class Registry:
    """Families by name, safe to read and extend from many threads (trained runs are added live)."""

    families: dict[str, Family] = field(default_factory=dict)
    default: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, family: Family) -> None:
        if not family.variants:
            raise ValueError(f"family '{family.name}' has no variants")
        with self._lock:
            self.families[family.name] = family
            self.default = self.default or family.name

    def get(self, name: str | None) -> Family:
        with self._lock:
            if name in self.families:
                return self.families[name]
            known = ", ".join(self.families) or "none"
        raise KeyError(f"unknown model family '{name}' (available: {known})")

    def names(self) -> list[str]:
        with self._lock:
            return list(self.families)


# -- building the registry ------------------------------------------------------------------------------

def is_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def detect_kind(source: str, fallback: str = "bf16") -> str:
    """bf16 / int8 / int4 of a local checkpoint, from `grace.inspect` (config and sidecars; no weights read).

    A folder that cannot be inspected, or a Hub repo id (not fetched at start-up), is listed with
    `fallback`: loading it will say what it is, or what is wrong."""
    import grace

    folder = Path(source)
    if not folder.is_dir():
        return fallback
    try:
        return grace.inspect(folder).kind
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint gets the fallback
        log.warning("could not inspect %s: %s", source, err)
        return fallback


def zoo_family(zoo_dir: Path) -> Family | None:
    """The zoo family once its BF16 / W8 / W4 columns are built (a partly built zoo is not offered)."""
    if not all(is_checkpoint(zoo_dir / folder) for folder, _, _, default in ZOO_VARIANTS if default):
        return None
    variants = [Variant(label, str(zoo_dir / folder), kind, default)
                for folder, label, kind, default in ZOO_VARIANTS if is_checkpoint(zoo_dir / folder)]
    return Family(ZOO_FAMILY, variants, "GRACE's offline zoo: tiny Qwen3-VL models trained on the shapes task.")


def dev_family(fixtures_dir: Path) -> Family | None:
    variants = [Variant(label, str(fixtures_dir / folder), kind, default)
                for folder, label, kind, default in DEV_VARIANTS if is_checkpoint(fixtures_dir / folder)]
    return Family(DEV_FAMILY, variants, "The offline zoo (assets/zoo) is not built yet: these are tiny models "
                  "with random weights, so their answers are gibberish. Build the zoo with `python -m grace zoo`.") \
        if variants else None


def hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # no cache, odd cache layout: treat as not cached
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        import httpx
        from huggingface_hub import constants

        url = f"{constants.ENDPOINT}/api/models/{HUB_VARIANTS[0][1]}"
        return httpx.head(url, timeout=timeout, follow_redirects=True).status_code < 500
    except Exception:  # DNS, proxy, timeout: all mean "not reachable now"
        return False


def hub_family(mode: str) -> Family | None:
    """The Hub releases, when forced on, when the Hub answers, or when every default release is cached."""
    if mode == "off":
        return None
    if mode == "auto" and not (all(hub_cached(repo) for _, repo, _, default in HUB_VARIANTS if default)
                               or hub_reachable()):
        return None
    return Family(HUB_FAMILY, [Variant(*v) for v in HUB_VARIANTS],
                  "The published GRACE releases of Qwen3-VL-2B (downloaded on first use).")


def llava_family(mode: str) -> Family | None:
    """The GRACE LLaVA-1.5-7B releases and the fp16 llava-hf reference, like `hub_family` (their CLIP tower too)."""
    if mode == "off":
        return None
    needed = [repo for _, repo, _, default in LLAVA_VARIANTS if default] + [LLAVA_VISION_TOWER]
    if mode == "auto" and not (all(hub_cached(repo) for repo in needed) or hub_reachable()):
        return None
    return Family(LLAVA_FAMILY, [Variant(*v) for v in LLAVA_VARIANTS],
                  "GRACE's LLaVA-1.5-7B W4 releases (QAT and AWQ) next to the fp16 base model; the CLIP "
                  f"vision tower comes from {LLAVA_VISION_TOWER} (downloaded on first use).")


def operator_family(name: str, variants: dict[str, str]) -> Family:
    return Family(name, [Variant(label, source, detect_kind(source)) for label, source in variants.items()],
                  "Added by the operator.")


def local_families(folders: list[Path]) -> list[Family]:
    """One family per allowed folder: the folder itself if it is a checkpoint, else its checkpoint sub-folders."""
    families = []
    for folder in folders:
        folder = folder.expanduser().resolve()
        found = [folder] if is_checkpoint(folder) else sorted(p for p in folder.glob("*") if is_checkpoint(p))
        if not found:
            log.warning("--allow-local %s: no checkpoint folders (with config.json) found", folder)
            continue
        variants = [Variant(p.name, str(p), detect_kind(str(p)), default=i < 3) for i, p in enumerate(found)]
        families.append(Family(LOCAL_PREFIX + folder.name, variants,
                               f"Checkpoints in {folder} (allowed by the operator)."))
    return families


def training_data_files(folders: list[Path]) -> list[Path]:
    """ShareGPT4V-style *.json files inside the allowed folders (the only data paths a job may use)."""
    files = []
    for folder in folders:
        folder = folder.expanduser().resolve()
        if folder.is_file() and folder.suffix == ".json":
            files.append(folder)
        elif folder.is_dir():
            files.extend(sorted(p for p in folder.glob("*.json") if p.is_file()))
    return files


def build_registry(settings: Settings, on_gpu: bool = False) -> Registry:
    registry = Registry()
    offline = zoo_family(settings.zoo_dir) or dev_family(settings.fixtures_dir)
    hub = hub_family(settings.hub)
    ordered = [hub, offline] if (hub and on_gpu) else [offline, hub]
    for family in ordered + [llava_family(settings.hub)]:
        if family:
            registry.add(family)
    for name, variants in settings.families.items():
        registry.add(operator_family(name, variants))
    for family in local_families(settings.allow_local):
        registry.add(family)
    if settings.default_family:
        registry.get(settings.default_family)   # a typo in the operator's choice should fail loudly
        registry.default = settings.default_family
    return registry


def trained_family(run_name: str, outputs: dict[str, str], teacher: Variant | None, student: Variant | None,
                   bits: int) -> Family:
    """The family a finished training run adds to Compare: the teacher (the reference), the student before
    distillation (so the change is visible) and the run's releases.

    outputs is the trainer's end record: final/ (QAT release, or bf16 for 16 bits) and export/ (AWQ INT4 or
    packed INT8); training checkpoints and the metrics file are not loadable models and are left out.
    """
    labels = {"final": "trained BF16" if bits == 16 else f"trained W{bits}G128 (QAT release)",
              "export": "trained W4G128-AWQ" if bits == 4 else "trained W8G128 (packed INT8)"}
    variants = [Variant(f"teacher: {teacher.label}", teacher.source, teacher.kind)] if teacher else []
    if student is not None:
        variants.append(Variant(f"student before distillation: {student.label}", student.source, student.kind))
    fallback = "bf16" if bits == 16 else f"int{bits}"
    for key, path in outputs.items():
        if key in labels and path and is_checkpoint(Path(path)):
            variants.append(Variant(labels[key], str(path), detect_kind(str(path), fallback)))
    return Family(TRAINED_PREFIX + run_name, variants, f"Checkpoints written by the training run {run_name}.")
