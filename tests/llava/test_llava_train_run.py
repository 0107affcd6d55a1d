"""A few steps of a tiny LLaVA-1.5 W4 GRACE run through grace.train: R-CKA over the image tokens, the same
objectives, and the releases a LLaVA run writes (the GRACE LLaVA QAT layout, then its AWQ export)."""

import json
import math

import torch

import grace
from grace.llava.tiny import TinyLlavaConfig, save_tiny_llava_pair
from grace.train import TrainConfig, train
from llava_helpers import LLAVA_FIXTURES, clip_tiny, copy_fixture, no_tower_env, offline_hub  # noqa: F401 (fixtures)


def test_tiny_llava_w4_grace_run(tmp_path):
    torch.set_num_threads(1)
    teacher, student, tower = save_tiny_llava_pair(
        tmp_path / "models", TinyLlavaConfig(hidden=256, layers=2, intermediate=512, heads=4),
        TinyLlavaConfig(hidden=128, layers=2, intermediate=256, heads=4, kv_heads=2), seed=3)
    config = TrainConfig(student=str(student), teacher=str(teacher), vision_tower=str(tower), out=str(tmp_path / "run"),
                         data="shapes", bits=4, group_size=128, steps=6, batch_size=2, lr=3e-3, scale_lr=3e-3,
                         warmup_steps=1, kd_warmup=1, rcka_warmup=1, omega=5.0, tau=0.0, log_every=100,
                         checkpoint_every=100, checkpoint_minutes=0)
    result = train(config)
    assert result.outcome == "finished" and result.step == 6
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if line["event"] == "step"]
    assert len(steps) == 6
    for s in steps:
        assert all(math.isfinite(s[k]) for k in ("loss", "ce", "gdkd", "rcka", "cka")) and 0 <= s["cka"] <= 1
    assert steps[-1]["ce"] < steps[0]["ce"]
    final = grace.load(result.final, device="cpu", vision_tower=tower)
    assert (final.kind, final.format, len(final.quantized_modules)) == ("int4", "grace-qat", 14)
    config_json = json.loads((result.final / "config.json").read_text())
    assert config_json["model_type"] == "llava_llama" and config_json["qat"]["num_replaced"] == 14
    exported = grace.load(result.export, device="cpu", vision_tower=tower)
    assert exported.format == "grace-awq" and (result.export / "tokenizer.model").is_file()
