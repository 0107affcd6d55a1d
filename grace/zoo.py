"""The offline GRACE zoo (v2): a tiny Qwen3-VL family trained here on the shapes task v2, in every release layout.

    python -m grace zoo build [--out assets/zoo] [--quick] [--only STAGE ...] [--v1 DIR]

The family first learns the task on 64x64 pictures (zoo v1's recipe, stages v1-*, kept in the work folder,
not shipped; `--v1 DIR` reuses an earlier build's v1 models with the CPU time recorded then), then each model
continues on the varied pictures of grace.data.shapes_v2 under the pixel budget 4-64 visual tokens:

    teacher            the "8B" role: v1 teacher + CE on v2
    student            the "2B" role: v1 student + CE on v2 (the student baseline)
    grace-bf16         v1 GRACE student + GRACE from the v2 teacher (no quantization), in two legs of 300 + 1000
                       steps (the authors' ~1300): far from the teacher, then close to it
    grace-w8g128       GRACE QAT W8 from grace-bf16, shipped as packed INT8
    grace-w4g128-awq   GRACE QAT W4 from grace-bf16, shipped in the GRACE AWQ layout
    ptq-rtn-w8g128     round-to-nearest W8G128 of grace-bf16
    ptq-rtn-w4g128     round-to-nearest W4G128 of grace-bf16 (AWQ layout)
    qat-ce-w4g128      CE-only QAT W4 from grace-bf16
    sweep              W8/W4/W3/W2 x {RTN PTQ, CE-only QAT, GRACE QAT} from grace-bf16 (grace.zoo_sweep)

Each stage is skipped when its output is complete, so an interrupted build continues where it stopped
(training runs resume from their last checkpoint). OUT/zoo.json records the recipe, each stage's CPU and
wall time, each model's accuracy on the v2 test split and the sweep.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .data.shapes_v2 import MAX_PIXELS, MIN_PIXELS
from .tiny import TinyConfig, save_tiny

V1_STAGES = ("v1-teacher", "v1-student", "v1-grace-bf16")
VARIANTS = ("teacher", "student", "grace-bf16", "grace-w8g128", "grace-w4g128-awq", "ptq-rtn-w4g128",
            "ptq-rtn-w8g128", "qat-ce-w4g128")
STAGES = V1_STAGES + VARIANTS + ("sweep",)
BF16_LAST_LEG = "grace-bf16-leg2"          # the run whose final L_GDKD is the QAT runs' floor
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "assets" / "zoo"
PAPER = {"lr": 1e-5, "scale_lr": 2e-4, "steps": 1300, "tau": 3.0, "eta": 0.003, "rcka_warmup": 400}


@dataclass
class ZooRecipe:
    """Sizes, steps and optimiser settings of the whole family (defaults: the build that is shipped)."""

    teacher: TinyConfig = field(default_factory=TinyConfig)
    # The student (the "2B" role): half the vision depth, a narrower MLP; widths multiples of 128 so every
    # linear has whole groups of 128 input columns.
    student: TinyConfig = field(default_factory=lambda: TinyConfig(intermediate=256, vision_depth=1))
    # v1: zoo v1's recipe on 64x64 pictures (4 visual tokens)
    v1_teacher_steps: int = 8000
    v1_student_steps: int = 5000
    v1_batch_size: int = 64
    v1_lr: float = 5e-4
    # v2 continuation of the bf16 models
    teacher_steps: int = 1000
    steps: int = 300
    batch_size: int = 32
    # GRACE BF16's second leg: from the first leg's model, a fresh warm-up and cosine; 300 steps alone reached
    # 0.834, short of 0.85. tau 0.9 x probe: the student starts close to the teacher (see controller_settings)
    grace_more_steps: int = 1000
    grace_more_lr: float = 2e-4
    grace_more_tau_ratio: float = 0.9
    lr: float = 3e-4
    adam_betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.05
    warmup_ratio: float = 0.03            # the authors' warm-up ratio, then cosine to 0 as theirs
    min_lr_ratio: float = 0.0
    # QAT runs from grace-bf16 (vision frozen, merger trained, as the authors)
    # lr and steps from the validation split (300 questions, GRACE W4 from this GRACE BF16): lr 1e-4 x 60 steps
    # 98.9 % of BF16, 3e-5 x 60 99.2 %, 3e-5 x 120 100.4 % (W8: 100.8 % / 100.0 % at 60 steps)
    qat_steps: int = 120
    qat_batch_size: int = 16
    qat_lr: float = 3e-5
    qat_scale_lr: float = 6e-4
    qat_ema_decay: float = 0.95
    # GRACE: the authors' values; tau/eta set per run from a probe of L_GDKD (see controller_settings)
    temperature: float = 2.0
    alpha: float = 1.0
    dkd_beta: float = 4.0
    omega: float = 3.0
    rcka_warmup_ratio: float = 400 / 1300
    beta_init: float = 0.5
    beta_min: float = 0.1
    beta_max: float = 1.0
    ema_decay: float = 0.99
    probe_steps: int = 6
    tau_ratio: float = 0.7
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    eval_questions: int = 500
    sweep_questions: int = 300
    sweep_bits: tuple[int, ...] = (8, 4, 3, 2)
    sweep_seeds: int = 3
    seed: int = 0
    checkpoint_every: int = 200


QUICK = ZooRecipe(teacher_steps=4, v1_teacher_steps=4, v1_student_steps=4, v1_batch_size=4, steps=4, grace_more_steps=4,
                  batch_size=4, qat_steps=3,
                  qat_batch_size=2, probe_steps=2, eval_questions=6, sweep_questions=4, sweep_bits=(4, 2),
                  sweep_seeds=2, checkpoint_every=4)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def complete_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "README.md").is_file()


def controller_settings(probe_gdkd: list[float], steps: int, ratio: float, floor: float | None = None) -> dict:
    """tau and eta in these models' units, from measured L_GDKD levels.

    tau: with `floor` (QAT from GRACE BF16: the L_GDKD that GRACE BF16 reached, median of its last steps), the
    geometric mean of the probe's level (the quantized student at the start) and that floor: beta grows while
    quantization keeps the student above it and relaxes as the student recovers. Without (distilling at full
    precision): `ratio` x the probe's median, so beta climbs while the student is far off and relaxes once the
    loss has fallen by that share: 0.7 for a student far from the teacher (GRACE BF16's first leg: L_GDKD fell
    8.2 -> 0.87), 0.9 for one already close (the second leg: replaying the controller on a measured 1000-step
    L_GDKD trace from a close start, 0.9 kept beta off its bounds throughout, 0.7-0.8 pinned it at 0.1 or 1.0
    for 30-85 % of the steps). eta: the authors' gain rescaled so that the same relative distance from
    tau moves beta by the same share of its range over the same share of the run (eta x tau x steps kept)."""
    level = statistics.median(probe_gdkd)
    tau = math.sqrt(level * floor) if floor else ratio * level
    eta = PAPER["eta"] * (PAPER["tau"] / tau) * (PAPER["steps"] / steps)
    return {"tau": round(tau, 6), "eta": round(eta, 6), "probe_gdkd_median": level, "floor": floor,
            "rule": "sqrt(probe median x GRACE BF16's final L_GDKD)" if floor else f"{ratio} x probe median"}


def final_level(metrics: Path, last: int = 50) -> float | None:
    """Median L_GDKD of a run's last `last` steps (None without a GRACE run there)."""
    from .train.metrics import read_metrics

    if not metrics.is_file():
        return None
    values = [s["gdkd"] for s in read_metrics(metrics).steps[-last:] if s.get("gdkd") is not None]
    return statistics.median(values) if values else None


class ZooBuilder:
    def __init__(self, out: Path, recipe: ZooRecipe, work: Path | None = None, v1: Path | None = None):
        self.out, self.recipe = out, recipe
        self.work = work or out.parent / (out.name + "-work")
        self.v1_source = v1
        self.record_path = out / "zoo.json"
        self.record = json.loads(self.record_path.read_text()) if self.record_path.is_file() else {}
        self.record["recipe"] = _jsonable(asdict(recipe))
        self.record["pixel_budget"] = {"min_pixels": recipe.min_pixels, "max_pixels": recipe.max_pixels,
                                       "visual_tokens": [recipe.min_pixels // 1024, recipe.max_pixels // 1024]}
        from .zoo_cards import deviations

        self.record["deviations"] = deviations(recipe)
        self.record.setdefault("stages", {})
        self.built: set[str] = set()

    # -- record --------------------------------------------------------------------------------------------
    def save_record(self, extra: dict | None = None) -> None:
        """Merge this build's stages into zoo.json (stages may be built by parallel `--only` runs)."""
        self.out.mkdir(parents=True, exist_ok=True)
        on_disk = json.loads(self.record_path.read_text()) if self.record_path.is_file() else {"stages": {}}
        on_disk.setdefault("stages", {}).update({k: self.record["stages"][k] for k in self.built})
        on_disk.update({k: self.record[k] for k in ("recipe", "pixel_budget", "deviations")})
        on_disk.update(extra or {})
        self.record = on_disk
        tmp = self.record_path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(self.record, indent=2))
        tmp.replace(self.record_path)

    # -- training ------------------------------------------------------------------------------------------
    def train(self, name: str, **overrides):
        from .train import METRICS_FILE, TrainConfig, train
        from .train.checkpoint import checkpoint_dirs

        r = self.recipe
        run_dir = self.work / "runs" / name
        base = dict(out=str(run_dir), data="shapes-v2", adam_betas=r.adam_betas, weight_decay=r.weight_decay,
                    warmup_ratio=r.warmup_ratio, min_lr_ratio=r.min_lr_ratio, seed=r.seed,
                    checkpoint_every=r.checkpoint_every, log_every=50, max_grad_norm=1.0,
                    min_pixels=r.min_pixels, max_pixels=r.max_pixels)
        base.update(overrides)
        if base.get("stop_after") is None and (run_dir / METRICS_FILE).is_file() and checkpoint_dirs(run_dir):
            base["resume"] = str(run_dir)      # an interrupted earlier build: continue its trajectory
        result = train(TrainConfig(**base))
        if result.outcome != "finished" and base.get("stop_after") is None:
            raise RuntimeError(f"zoo run {name} ended {result.outcome}")
        return result

    def grace_args(self, name: str, student: Path, steps: int, batch_size: int, ema_decay: float,
                   tau_ratio: float | None = None, **more) -> dict:
        """The authors' GRACE settings scaled to this run, tau/eta from a short probe of L_GDKD."""
        from .train.metrics import read_metrics

        r = self.recipe
        args = dict(student=str(student), teacher=str(self.out / "teacher"), objective="grace", steps=steps,
                    batch_size=batch_size, temperature=r.temperature, alpha=r.alpha, dkd_beta=r.dkd_beta,
                    omega=r.omega, rcka_layer=-2, kd_warmup=0, rcka_warmup=round(r.rcka_warmup_ratio * steps),
                    beta_init=r.beta_init, beta_min=r.beta_min, beta_max=r.beta_max, ema_decay=ema_decay,
                    controller_update="last_micro_batch", **more)
        probe_file = self.work / "probes" / f"{name}.json"
        if probe_file.is_file():
            probe = json.loads(probe_file.read_text())
        else:   # a few steps of the same run, thrown away; only their L_GDKD is kept
            shutil.rmtree(self.work / "probes" / name, ignore_errors=True)
            self.train(f"../probes/{name}", **{**args, "tau": 1.0, "eta": 0.0, "stop_after": r.probe_steps,
                                               "checkpoint_minutes": 0})
            steps_logged = read_metrics(self.work / "probes" / name / "metrics.jsonl").steps
            probe = {"gdkd": [s["gdkd"] for s in steps_logged if s.get("gdkd") is not None]}
            shutil.rmtree(self.work / "probes" / name, ignore_errors=True)
            probe_file.write_text(json.dumps(probe))
        floor = final_level(self.work / "runs" / BF16_LAST_LEG / "metrics.jsonl") if args.get("bits", 16) < 16 else None
        control = controller_settings(probe["gdkd"], steps, tau_ratio or r.tau_ratio, floor)
        args.update(tau=control["tau"], eta=control["eta"])
        args["_probe"] = control | {"probe_gdkd": probe["gdkd"]}
        return args

    def qat_args(self, method: str, bits: int, seed: int) -> tuple[str, dict]:
        r = self.recipe
        name = f"qat-{method}-w{bits}-s{seed}"
        common = dict(bits=bits, steps=r.qat_steps, batch_size=r.qat_batch_size, lr=r.qat_lr,
                      scale_lr=r.qat_scale_lr, freeze_vision=True, train_merger=True, seed=r.seed + seed)
        student = self.out / "grace-bf16"
        if method == "grace":
            common.pop("steps"), common.pop("batch_size")
            return name, self.grace_args(name, student, r.qat_steps, r.qat_batch_size, r.qat_ema_decay, **common)
        return name, dict(student=str(student), teacher=None, objective="ce", **common)

    def run_card(self, name: str, args: dict, role: str, config: str, ship: str = "export") -> dict:
        probe = args.pop("_probe", None)
        result = self.train(name, **args)
        source = (result.export or result.final) if ship == "export" else result.final
        settings = {k: v for k, v in args.items() if k not in ("student", "teacher")}
        card = {"source": source, "role": role, "config": config, "training": settings, "run": str(result.out),
                "initialised_from": str(Path(args["student"]).name)}
        if probe:
            card["controller"] = probe | _beta_trace(result.metrics)
        return card

    # -- shipping -------------------------------------------------------------------------------------------
    def ship(self, source: Path, folder: Path, name: str, card: dict) -> Path:
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(source, folder)
        from .zoo_cards import write_card

        card.update(write_card(folder, name, card, self.recipe))
        self.record["stages"].setdefault(name, {}).update(_jsonable(card))
        self.built.add(name)
        self.save_record()
        return folder

    def stage(self, name: str, build, folder: Path) -> Path:
        if complete(folder):
            print(f"[zoo] {name}: already built, skipping", file=sys.stderr)
            return folder
        print(f"[zoo] {name}: building", file=sys.stderr, flush=True)
        cpu, wall = cpu_seconds(), time.time()
        card = build()
        card.setdefault("cpu_s", cpu_seconds() - cpu)
        card["wall_s"] = time.time() - wall
        return self.ship(card.pop("source"), folder, name, card)

    # -- stages ---------------------------------------------------------------------------------------------
    def build(self, only: list[str] | None = None) -> dict:
        r = self.recipe
        todo = only or list(STAGES)
        v1 = self.work / "v1"
        inits = {"teacher": (self.work / "init" / "teacher", r.teacher, r.seed),
                 "student": (self.work / "init" / "student", r.student, r.seed + 1)}
        for folder, cfg, seed in inits.values():
            if not (folder / "model.safetensors").is_file():
                save_tiny(folder, seed=seed, cfg=cfg)
        t_desc, s_desc = _describe(r.teacher), _describe(r.student)
        v1_common = dict(data="shapes", image_size=64, batch_size=r.v1_batch_size, lr=r.v1_lr, warmup_steps=100,
                         warmup_ratio=0.0, min_lr_ratio=0.1, freeze_vision=False, bits=16, min_pixels=None,
                         max_pixels=None, checkpoint_every=500)
        bf16 = dict(steps=r.steps, batch_size=r.batch_size, lr=r.lr, freeze_vision=False, bits=16)

        def v1_stage(name, role, desc, args):
            if self.v1_source is not None:       # an earlier build's v1 models, with the CPU time it recorded
                source = self.v1_source / name
                earlier = _earlier_cpu(self.v1_source, name)
                return {"source": source, "role": role, "config": desc, "training": f"reused from {self.v1_source}",
                        "cpu_s": earlier}
            return self.run_card(name, args, role, desc, ship="final")

        stages = {
            "v1-teacher": lambda: v1_stage("v1-teacher", "v1 teacher (64x64 pictures), CE", t_desc, dict(
                student=str(inits["teacher"][0]), teacher=None, objective="ce", steps=r.v1_teacher_steps, **v1_common)),
            "v1-student": lambda: v1_stage("v1-student", "v1 student (64x64 pictures), CE", s_desc, dict(
                student=str(inits["student"][0]), teacher=None, objective="ce", steps=r.v1_student_steps, **v1_common)),
            "v1-grace-bf16": lambda: v1_stage("v1-grace-bf16", "v1 GRACE student (64x64 pictures)", s_desc, dict(
                student=str(inits["student"][0]), teacher=str(v1 / "v1-teacher"), objective="grace",
                steps=r.v1_student_steps, tau=1.0, eta=0.01, beta_init=1.0, beta_min=0.0, beta_max=5.0,
                kd_warmup=50, rcka_warmup=100, omega=1.0, **v1_common)),
            "teacher": lambda: self.run_card("teacher", dict(student=str(v1 / "v1-teacher"), teacher=None,
                                             objective="ce", **{**bf16, "steps": r.teacher_steps}), "The teacher (the 8B role): the v1 teacher "
                                             "trained on with cross-entropy on the v2 pictures.", t_desc, "final"),
            "student": lambda: self.run_card("student", dict(student=str(v1 / "v1-student"), teacher=None,
                                             objective="ce", **bf16), "The student baseline (the 2B role): the v1 "
                                             "student trained on with cross-entropy only.", s_desc, "final"),
            "grace-bf16": lambda: self.grace_bf16(v1 / "v1-grace-bf16", s_desc),
            "grace-w8g128": lambda: self.run_card(*self.qat_args("grace", 8, 0), "GRACE W8G128: QAT with GRACE "
                                                  "distillation from GRACE BF16; shipped as packed INT8.", s_desc),
            "grace-w4g128-awq": lambda: self.run_card(*self.qat_args("grace", 4, 0), "GRACE W4G128: QAT with GRACE "
                                                      "distillation from GRACE BF16; shipped in the GRACE AWQ "
                                                      "layout.", s_desc),
            "ptq-rtn-w4g128": lambda: self.ptq(4),
            "ptq-rtn-w8g128": lambda: self.ptq(8),
            "qat-ce-w4g128": lambda: self.run_card(*self.qat_args("ce", 4, 0), "CE-only QAT W4G128 (no distillation) "
                                                   "from GRACE BF16; AWQ layout.", s_desc),
        }
        for name in STAGES:
            if name not in todo:
                continue
            if name == "sweep":
                from .zoo_sweep import run_sweep

                self.save_record({"sweep": run_sweep(self)})
            else:
                self.stage(name, stages[name], (v1 if name in V1_STAGES else self.out) / name)
        return self.record

    def grace_bf16(self, v1_student: Path, desc: str) -> dict:
        """GRACE BF16 in two legs, each with its own warm-up, cosine and controller probe: `steps` from the v1 GRACE
        student, then `grace_more_steps` from the first leg's model. A finished first leg (its final model and
        leg.json) is kept, as a finished stage is: a rebuild with more steps continues from it."""
        r = self.recipe
        leg1_dir = self.work / "runs" / "grace-bf16"
        record = leg1_dir / "leg.json"
        if record.is_file() and complete_model(leg1_dir / "final"):
            leg1 = json.loads(record.read_text())
        else:
            cpu = cpu_seconds()
            leg1 = self.run_card("grace-bf16", self.grace_args(
                "grace-bf16", v1_student, r.steps, r.batch_size, r.ema_decay, lr=r.lr, freeze_vision=False, bits=16),
                "first leg", desc, "final")
            leg1["cpu_s"] = cpu_seconds() - cpu
            record.write_text(json.dumps(_jsonable(leg1), indent=1))
        cpu = cpu_seconds()
        card = self.run_card(BF16_LAST_LEG, self.grace_args(
            BF16_LAST_LEG, leg1_dir / "final", r.grace_more_steps, r.batch_size, r.ema_decay, r.grace_more_tau_ratio,
            lr=r.grace_more_lr, freeze_vision=False, bits=16), "The GRACE BF16 student: the v1 GRACE student "
            "distilled from the v2 teacher with GRACE (no quantization), in two legs.", desc, "final")
        card["cpu_s"] = (leg1.get("cpu_s") or 0) + cpu_seconds() - cpu
        card["initialised_from"] = "v1-grace-bf16"
        card["first_leg"] = {k: leg1.get(k) for k in ("training", "controller", "cpu_s", "reused_from") if k in leg1}
        return card

    def ptq(self, bits: int) -> dict:
        import grace
        from .export import save_packed
        from .quant import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        loaded = grace.load(self.out / "grace-bf16", device="cpu", dtype=torch.float32)
        quantize_(loaded.model, Int4WeightOnlyConfig() if bits == 4 else Int8WeightOnlyConfig())
        source = save_packed(loaded.model, loaded.processor, self.work / f"ptq-w{bits}")
        return {"source": source, "role": f"Round-to-nearest W{bits}G128 of GRACE BF16 (post-training, symmetric "
                f"per-group max-abs scales), a baseline for contrast.", "config": _describe(self.recipe.student),
                "training": "none (post-training quantization of grace-bf16)", "initialised_from": "grace-bf16"}


def _beta_trace(metrics: Path, bounds: tuple[float, float] = (0.1, 1.0)) -> dict:
    """How the controller behaved: beta's range, the share of steps it sat at a bound, a thinned trace."""
    from .train.metrics import read_metrics

    steps = [s for s in read_metrics(metrics).steps if s.get("beta") is not None]
    if not steps:
        return {}
    betas = [s["beta"] for s in steps]
    at_bound = sum(1 for b in betas if min(abs(b - bounds[0]), abs(b - bounds[1])) < 1e-6) / len(betas)
    return {"beta_first": betas[0], "beta_last": betas[-1], "beta_lowest": min(betas), "beta_highest": max(betas),
            "share_at_bound": at_bound, "gdkd_first": steps[0].get("gdkd"), "gdkd_last": steps[-1].get("gdkd"),
            "beta_trace": [round(b, 4) for b in betas[:: max(1, len(betas) // 40)]]}


def _earlier_cpu(source: Path, name: str) -> float | None:
    record = source / "zoo-v1.json"
    if not record.is_file():
        return None
    stages = json.loads(record.read_text()).get("stages", {})
    return stages.get(name.removeprefix("v1-"), {}).get("cpu_s")


def _describe(cfg: TinyConfig) -> str:
    return (f"language model hidden {cfg.hidden}, {cfg.layers} layer(s), MLP {cfg.intermediate}, "
            f"{cfg.heads} heads / {cfg.kv_heads} KV heads; vision tower {cfg.vision_depth} layers, hidden "
            f"{cfg.vision_hidden}, MLP {cfg.vision_intermediate}; patch {cfg.patch_size}, merge {cfg.merge_size}")


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def build_zoo(out: str | Path = DEFAULT_OUT, quick: bool = False, work: str | Path | None = None,
              only: list[str] | None = None, v1: str | Path | None = None) -> dict:
    recipe = copy.deepcopy(QUICK if quick else ZooRecipe())
    return ZooBuilder(Path(out), recipe, Path(work) if work else None, Path(v1) if v1 else None).build(only)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m grace zoo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="(re)build the zoo; finished stages are kept")
    b.add_argument("--out", default=str(DEFAULT_OUT))
    b.add_argument("--work", default=None, help="training runs and intermediates (default: OUT-work next to OUT)")
    b.add_argument("--quick", action="store_true", help="a few steps per stage: checks the pipeline, not a model")
    b.add_argument("--only", nargs="+", choices=STAGES, help="build just these stages (their inputs must exist)")
    b.add_argument("--v1", default=None, help="a folder with v1-teacher, v1-student, v1-grace-bf16 (and zoo-v1.json) "
                                              "from an earlier build, used instead of training the v1 stages")
    b.add_argument("--fresh", action="store_true", help="delete OUT and the work folder first")
    args = parser.parse_args(argv)
    if args.fresh:
        for path in (Path(args.out), Path(args.work) if args.work else Path(args.out).parent / (Path(args.out).name + "-work")):
            shutil.rmtree(path, ignore_errors=True)
    start_cpu, start = cpu_seconds(), time.time()
    record = build_zoo(args.out, args.quick, args.work, args.only, args.v1)
    print(json.dumps({name: {k: stage.get(k) for k in ("accuracy", "weight_bytes", "cpu_s")}
                      for name, stage in record["stages"].items()}, indent=1))
    print(f"[zoo] done: {cpu_seconds() - start_cpu:.0f} s CPU, {time.time() - start:.0f} s wall", file=sys.stderr)
    return 0


TRAIN_TAB_KEYS = ("bits", "lr", "scale_lr", "tau", "eta", "omega", "temperature", "alpha", "dkd_beta", "beta_init",
                  "beta_min", "beta_max", "ema_decay", "rcka_warmup", "kd_warmup", "freeze_vision", "train_merger",
                  "controller_update")


def train_defaults(zoo: str | Path = DEFAULT_OUT, steps: int = 300, batch_size: int = 4) -> dict:
    """TrainConfig fields for a short GRACE job on the zoo (the Train tab's default): the zoo's GRACE W4 run's
    settings (the authors' recipe scaled to these models, tau/eta as measured for them), on data 'shapes-v2',
    GRACE BF16 as student and the zoo teacher; `steps` and `batch_size` sized for a minute or two on a CPU
    (the R-CKA warm-up scaled to the run). {} when the zoo has no such record."""
    record = Path(zoo) / "zoo.json"
    stages = json.loads(record.read_text()).get("stages", {}) if record.is_file() else {}
    training = stages.get("grace-w4g128-awq", {}).get("training")
    if not isinstance(training, dict):
        return {}
    values = {k: training[k] for k in TRAIN_TAB_KEYS if k in training}
    run_steps = int(training.get("steps") or steps)
    values["rcka_warmup"] = round(values.get("rcka_warmup", 0) * steps / run_steps)
    values["eta"] = values["eta"] * run_steps / steps if "eta" in values else None   # same gain per run
    budget = json.loads(record.read_text()).get("pixel_budget", {})
    return {k: v for k, v in values.items() if v is not None} | {
        "student": str(Path(zoo) / "grace-bf16"), "teacher": str(Path(zoo) / "teacher"), "data": "shapes-v2",
        "objective": "grace", "steps": steps, "batch_size": batch_size,
        "min_pixels": budget.get("min_pixels"), "max_pixels": budget.get("max_pixels")}
