"""Shared by the tests of grace.train: tiny teacher / student settings and metrics.jsonl helpers."""

import json
from pathlib import Path

from grace.tiny import TinyConfig
from grace.train import TrainConfig

# 128-pixel processors: 16 image tokens per image, enough for a meaningful CKA.
TEACHER = TinyConfig(image_size=128)
STUDENT = TinyConfig(hidden=64, intermediate=192, heads=2, kv_heads=1, head_dim=32, vision_hidden=64,
                     vision_intermediate=128, vision_heads=2, image_size=128)
STEP_KEYS = {"step", "time", "lr", "loss", "ce", "gdkd", "rcka", "cka", "beta", "ema", "tau", "gate_mean", "gate_min",
             "gate_max", "tokens_per_s", "quant_scale", "max_steps", "eta_s", "nonfinite"}


def settings(models, out, **overrides) -> TrainConfig:
    """A short, fast GRACE W4 run on the tiny models (checkpoints by steps only unless asked)."""
    base = dict(student=str(models["student"]), teacher=str(models["teacher"]), out=str(out), data=str(models["data"]),
                bits=4, group_size=64, steps=24, batch_size=4, lr=3e-3, scale_lr=3e-3, warmup_steps=2, kd_warmup=2,
                rcka_warmup=2, omega=5.0, tau=0.0, eta=0.5, log_every=100, checkpoint_every=10, checkpoint_minutes=0)
    return TrainConfig(**{**base, **overrides})


def read_lines(out) -> list[dict]:
    """Every line of a run's metrics.jsonl, raw (not folded)."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def steps_of(lines) -> list[dict]:
    return [line for line in lines if line["event"] == "step"]


def tensors(path) -> dict:
    """Every tensor of a safetensors file, by name."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}
