"""The offline GRACE zoo: a tiny Qwen3-VL family trained here on the shapes task, in every release layout.

    python -m grace zoo build [--out assets/zoo] [--quick]

Stages (each writes one folder under OUT and is skipped when that folder is already complete, so an
interrupted build continues where it stopped; training runs resume from their last checkpoint):

    teacher            the "8B" role: the larger tiny model, trained with CE
    student            the "2B" role, CE only (the student baseline)
    grace-bf16         the student distilled from the teacher with GRACE (no quantization)
    grace-w8g128       GRACE + QAT W8, initialised from grace-bf16, shipped as packed INT8
    grace-w4g128-awq   GRACE + QAT W4, initialised from grace-bf16, shipped in the GRACE AWQ layout
    ptq-rtn-w8g128     round-to-nearest W8G128 of grace-bf16
    ptq-rtn-w4g128     round-to-nearest W4G128 of grace-bf16 (AWQ layout)
    qat-ce-w4g128      QAT W4 with CE only (no distillation), initialised from grace-bf16

Every folder loads with `grace.load` and carries a model card (README.md); OUT/zoo.json records the
recipe, each stage's CPU and wall time, and each model's accuracy on the shapes test split.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .tiny import TinyConfig, save_tiny

VARIANTS = ("teacher", "student", "grace-bf16", "grace-w8g128", "grace-w4g128-awq", "ptq-rtn-w4g128",
            "ptq-rtn-w8g128", "qat-ce-w4g128")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "assets" / "zoo"


@dataclass
class ZooRecipe:
    """Sizes, steps and optimiser settings of the whole family (defaults: the measured working recipe)."""

    teacher: TinyConfig = field(default_factory=TinyConfig)
    # The student (the "2B" role) has half the vision tower's depth and a narrower MLP. It keeps
    # two decoder layers (R-CKA aligns the penultimate one) and widths that are multiples of 128,
    # so every linear has whole groups of 128 input columns for W4G128 / W8G128.
    student: TinyConfig = field(default_factory=lambda: TinyConfig(intermediate=256, vision_depth=1))
    teacher_steps: int = 8000
    student_steps: int = 5000
    qat_steps: int = 800
    batch_size: int = 64
    lr: float = 5e-4
    adam_betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    qat_lr: float = 5e-5
    qat_scale_lr: float = 1e-3
    qat_warmup_steps: int = 50
    eval_questions: int = 500
    seed: int = 0
    checkpoint_every: int = 500


QUICK = ZooRecipe(teacher_steps=12, student_steps=12, qat_steps=6, batch_size=4, warmup_steps=2, qat_warmup_steps=1,
                  eval_questions=10, checkpoint_every=6)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "README.md").is_file()


class ZooBuilder:
    def __init__(self, out: Path, recipe: ZooRecipe, work: Path | None = None):
        self.out, self.recipe = out, recipe
        self.work = work or out.parent / (out.name + "-work")
        self.record_path = out / "zoo.json"
        self.record = json.loads(self.record_path.read_text()) if self.record_path.is_file() else {}
        self.record["recipe"] = _jsonable(asdict(recipe))
        self.record.setdefault("stages", {})
        self.built: set[str] = set()

    # -- helpers -------------------------------------------------------------------------------------
    def _save_record(self) -> None:
        """Merge this build's stages into zoo.json (stages may be built by parallel `--only` runs)."""
        self.out.mkdir(parents=True, exist_ok=True)
        on_disk = json.loads(self.record_path.read_text()) if self.record_path.is_file() else {"stages": {}}
        on_disk["stages"].update({k: self.record["stages"][k] for k in self.built})
        on_disk["recipe"] = self.record["recipe"]
        self.record = on_disk
        tmp = self.record_path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(self.record, indent=2))
        tmp.replace(self.record_path)

    def _train(self, name: str, **overrides) -> "object":
        from .train import METRICS_FILE, TrainConfig, train
        from .train.checkpoint import checkpoint_dirs

        r = self.recipe
        run_dir = self.work / "runs" / name
        base = dict(out=str(run_dir), data="shapes", image_size=r.teacher.image_size, batch_size=r.batch_size,
                    adam_betas=r.adam_betas, weight_decay=r.weight_decay, min_lr_ratio=r.min_lr_ratio,
                    seed=r.seed, checkpoint_every=r.checkpoint_every, log_every=100, max_grad_norm=1.0)
        base.update(overrides)
        if (run_dir / METRICS_FILE).is_file() and checkpoint_dirs(run_dir):
            base["resume"] = str(run_dir)      # an interrupted earlier build: continue its trajectory
        return train(TrainConfig(**base))

    def _ship(self, source: Path, name: str, card: dict) -> Path:
        target = self.out / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target)
        self._write_card(target, name, card)
        return target

    def _write_card(self, folder: Path, name: str, card: dict) -> None:
        import grace
        from .evaluation import evaluate

        loaded = grace.load(folder, device="cpu", dtype=torch.float32)
        result = evaluate(loaded, "shapes-test", limit=self.recipe.eval_questions, progress=True)
        held = grace.load(folder, device="cpu", dtype=torch.bfloat16)     # bytes as deployed (bf16 + packed)
        language = sum(t.numel() * t.element_size() for n, t in
                       list(held.model.named_parameters()) + list(held.model.named_buffers())
                       if "language_model" in n or n.startswith("lm_head"))
        card.update(kind=loaded.kind, format=loaded.format, weight_bytes=held.weight_bytes,
                    language_model_bytes=language, accuracy=result.accuracy, per_type=result.per_type, n=result.n)
        self.record["stages"].setdefault(name, {}).update(card)
        self.built.add(name)
        self._save_record()
        lines = [f"# GRACE zoo: {name}", "", card["role"], "",
                 f"- layout: `{loaded.format}` (kind `{loaded.kind}`), loads with `grace.load`",
                 f"- architecture: Qwen3-VL, {card['config']}",
                 f"- training: {card['training']}",
                 "- data: the shapes task (grace.data.shapes), a fresh 64x64 image for every sample",
                 f"- weights held (bf16 activations): {held.weight_bytes / 1e6:.2f} MB (language model "
                 f"{language / 1e6:.2f} MB)",
                 f"- shapes test accuracy ({result.n} questions, greedy): {result.accuracy:.3f} — "
                 + ", ".join(f"{k} {v:.2f}" for k, v in result.per_type.items()),
                 f"- built by `python -m grace zoo build` (stage CPU time {card.get('cpu_s', 0):.0f} s)", ""]
        (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")

    def _stage(self, name: str, build) -> Path:
        folder = self.out / name
        if _complete(folder):
            print(f"[zoo] {name}: already built, skipping", file=sys.stderr)
            return folder
        print(f"[zoo] {name}: building", file=sys.stderr, flush=True)
        cpu, wall = _cpu_seconds(), time.time()
        card = build()
        card["cpu_s"], card["wall_s"] = _cpu_seconds() - cpu, time.time() - wall
        return self._ship(card.pop("source"), name, card)

    # -- stages --------------------------------------------------------------------------------------------
    def build(self, only: list[str] | None = None) -> dict:
        r = self.recipe
        todo = only or list(VARIANTS)
        init = self.work / "init"
        teacher_init = init / "teacher"
        student_init = init / "student"
        if not _complete_init(teacher_init):
            save_tiny(teacher_init, seed=r.seed, cfg=r.teacher)
        if not _complete_init(student_init):
            save_tiny(student_init, seed=r.seed + 1, cfg=r.student)
        scratch = dict(lr=r.lr, warmup_steps=r.warmup_steps, freeze_vision=False, bits=16)
        qat = dict(lr=r.qat_lr, scale_lr=r.qat_scale_lr, warmup_steps=r.qat_warmup_steps, steps=r.qat_steps,
                   freeze_vision=True)

        def train_card(name, role, config, **train_args):
            result = self._train(name, **train_args)
            if result.outcome != "finished":
                raise RuntimeError(f"zoo stage {name} ended {result.outcome}")
            source = result.export or result.final
            settings = {k: v for k, v in train_args.items() if k not in ("student", "teacher")}
            return {"source": source, "role": role, "config": config, "training": json.dumps(settings),
                    "run": str(result.out)}

        stages = {
            "teacher": lambda: train_card("teacher", "The teacher (the 8B role), trained with cross-entropy.",
                                          _describe(r.teacher), student=str(teacher_init), teacher=None,
                                          steps=r.teacher_steps, objective="ce", **scratch),
            "student": lambda: train_card("student", "The student baseline (the 2B role), cross-entropy only.",
                                          _describe(r.student), student=str(student_init), teacher=None,
                                          steps=r.student_steps, objective="ce", **scratch),
            "grace-bf16": lambda: train_card("grace-bf16", "The GRACE BF16 student: the same initialisation as the "
                                             "baseline, distilled from the teacher with GRACE (no quantization).",
                                             _describe(r.student), student=str(student_init),
                                             teacher=str(self.out / "teacher"), steps=r.student_steps,
                                             objective="grace", **scratch),
            "grace-w8g128": lambda: train_card("grace-w8g128", "GRACE W8G128: QAT with GRACE distillation, "
                                               "initialised from GRACE BF16; shipped as packed INT8.",
                                               _describe(r.student), student=str(self.out / "grace-bf16"),
                                               teacher=str(self.out / "teacher"), bits=8, objective="grace", **qat),
            "grace-w4g128-awq": lambda: train_card("grace-w4g128", "GRACE W4G128: QAT with GRACE distillation, "
                                                   "initialised from GRACE BF16; shipped in the GRACE AWQ layout.",
                                                   _describe(r.student), student=str(self.out / "grace-bf16"),
                                                   teacher=str(self.out / "teacher"), bits=4, objective="grace",
                                                   **qat),
            "ptq-rtn-w4g128": lambda: self._ptq(4),
            "ptq-rtn-w8g128": lambda: self._ptq(8),
            "qat-ce-w4g128": lambda: train_card("qat-ce-w4g128", "CE-only QAT W4G128 (no distillation), "
                                                "initialised from GRACE BF16; AWQ layout.", _describe(r.student),
                                                student=str(self.out / "grace-bf16"), teacher=None, bits=4,
                                                objective="ce", **qat),
        }
        for name in VARIANTS:
            if name in todo:
                self._stage(name, stages[name])
        return self.record

    def _ptq(self, bits: int) -> dict:
        import grace
        from .export import save_packed
        from .quant import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        loaded = grace.load(self.out / "grace-bf16", device="cpu", dtype=torch.float32)
        quantize_(loaded.model, Int4WeightOnlyConfig() if bits == 4 else Int8WeightOnlyConfig())
        source = save_packed(loaded.model, loaded.processor, self.work / f"ptq-w{bits}")
        return {"source": source, "role": f"Round-to-nearest W{bits}G128 of GRACE BF16 (post-training, symmetric "
                f"per-group max-abs scales), a baseline for contrast.", "config": _describe(self.recipe.student),
                "training": "none (post-training quantization of grace-bf16)"}


def _complete_init(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _describe(cfg: TinyConfig) -> str:
    return (f"language model hidden {cfg.hidden}, {cfg.layers} layer(s), MLP {cfg.intermediate}, "
            f"{cfg.heads} heads / {cfg.kv_heads} KV heads; vision tower {cfg.vision_depth} layers, hidden "
            f"{cfg.vision_hidden}, MLP {cfg.vision_intermediate}; {cfg.image_size}x{cfg.image_size} images, "
            f"patch {cfg.patch_size}, merge {cfg.merge_size}")


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def build_zoo(out: str | Path = DEFAULT_OUT, quick: bool = False, work: str | Path | None = None,
              only: list[str] | None = None) -> dict:
    recipe = copy.deepcopy(QUICK if quick else ZooRecipe())
    return ZooBuilder(Path(out), recipe, Path(work) if work else None).build(only)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m grace zoo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="(re)build the zoo; finished stages are kept")
    b.add_argument("--out", default=str(DEFAULT_OUT))
    b.add_argument("--work", default=None, help="training runs and intermediates (default: OUT-work next to OUT)")
    b.add_argument("--quick", action="store_true", help="a few steps per stage: checks the pipeline, not a model")
    b.add_argument("--only", nargs="+", choices=VARIANTS, help="build just these stages (their inputs must exist)")
    b.add_argument("--fresh", action="store_true", help="delete OUT and the work folder first")
    args = parser.parse_args(argv)
    if args.fresh:
        for path in (Path(args.out), Path(args.work) if args.work else Path(args.out).parent / (Path(args.out).name + "-work")):
            shutil.rmtree(path, ignore_errors=True)
    start_cpu, start = _cpu_seconds(), time.time()
    record = build_zoo(args.out, args.quick, args.work, args.only)
    print(json.dumps({name: {k: stage.get(k) for k in ("accuracy", "weight_bytes", "cpu_s")}
                      for name, stage in record["stages"].items()}, indent=1))
    print(f"[zoo] done: {_cpu_seconds() - start_cpu:.0f} s CPU, {time.time() - start:.0f} s wall", file=sys.stderr)
    return 0
