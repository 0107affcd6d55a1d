"""Named recipes: `--preset qwen3vl-2b-paper` is the authors' released Qwen3-VL-2B GRACE run."""

import math

import pytest

from grace.train import train
from grace.train.cli import build_parser, config_from_args, main
from grace.train.config import PRESETS, TrainConfig

from train_helpers import read_lines, steps_of, tensors

# The values of finetune_qwen3vl_2b_grace.slurm (ForeverBlue816/GRACE), written out here once more on purpose.
AUTHORS = dict(lr=1e-5, scale_lr=2e-4, weight_decay=1e-3, warmup_ratio=0.03, min_lr_ratio=0.0, max_grad_norm=1.0,
               temperature=2.0, alpha=1.0, dkd_beta=4.0, omega=3.0, rcka_layer=-2, rcka_warmup=400, kd_warmup=0,
               tau=3.0, eta=0.003, beta_init=0.5, beta_min=0.1, beta_max=1.0, ema_decay=0.99, batch_size=2,
               grad_accum=16, min_pixels=784, max_pixels=200704, max_length=8192, freeze_vision=True,
               train_merger=True, gradient_checkpointing=True, bits=4, group_size=128,
               controller_update="last_micro_batch")


def test_preset_is_the_authors_recipe():
    config = TrainConfig.from_preset("qwen3vl-2b-paper", student="S", teacher="T", out="O")
    assert {k: getattr(config, k) for k in AUTHORS} == AUTHORS
    assert config.resolved_warmup_steps == math.ceil(0.03 * config.steps)
    assert "finetune_qwen3vl_2b_grace.slurm" in PRESETS["qwen3vl-2b-paper"]["source"]


def test_preset_help_shows_the_authors_values():
    parser = build_parser("qwen3vl-2b-paper")
    helps = {a.dest: a.help for a in parser._actions if a.option_strings}
    for name, value in AUTHORS.items():
        if name not in ("freeze_vision", "train_merger", "gradient_checkpointing", "controller_update"):
            assert helps[name].endswith(f"(default: {value})"), (name, helps[name])
    assert "finetune_qwen3vl_2b_grace.slurm" in parser.format_help()
    plain = {a.dest: a.help for a in build_parser()._actions if a.option_strings}
    assert plain["tau"].endswith("(default: 1.0)")          # without the preset: the library's defaults


def test_preset_on_the_command_line_and_its_overrides():
    config = config_from_args(["--preset", "qwen3vl-2b-paper", "--student", "S", "--teacher", "T", "--out", "O",
                               "--tau", "2.5", "--steps", "40"])
    assert config.tau == 2.5 and config.steps == 40 and config.eta == 0.003 and config.resolved_warmup_steps == 2
    assert main(["--preset", "qwen3vl-2b-paper", "--resume", "somewhere"]) == 2
    with pytest.raises(ValueError, match="unknown preset"):
        TrainConfig.from_preset("no-such-recipe", student="S", out="O")


def test_a_tiny_run_under_the_preset_keeps_beta_in_its_bounds(models, tmp_path):
    """The preset's controller (tau 3, eta 0.003, beta0 0.5 in [0.1, 1]) and its other switches on the tiny
    models: beta follows the rule and is clipped to [0.1, 1.0]; the merger trains, the rest of the vision
    tower does not; gradient checkpointing on."""
    config = TrainConfig.from_preset("qwen3vl-2b-paper", student=str(models["student"]),
                                     teacher=str(models["teacher"]), data=str(models["data"]),
                                     out=str(tmp_path / "run"),
                                     steps=60, grad_accum=1, group_size=64, num_workers=0, lr=1e-3,
                                     checkpoint_every=1000, checkpoint_minutes=0)
    result = train(config)
    steps = steps_of(read_lines(result.out))
    betas = [s["beta"] for s in steps]
    assert all(0.1 <= b <= 1.0 for b in betas)
    beta, ema = 0.5, None
    for s in steps:     # as the authors' code: each step's own L_GDKD moves the beta its (last) micro-batch uses
        ema = s["gdkd"] if ema is None else 0.99 * ema + 0.01 * s["gdkd"]
        beta = min(max(beta + 0.003 * (ema - 3.0), 0.1), 1.0)
        assert s["beta"] == pytest.approx(beta, rel=1e-9)
    # The tiny models' L_GDKD sits far below tau = 3 (in these units), so beta falls to its floor and stays.
    assert min(betas) == 0.1 and betas[-1] == 0.1 and max(s["gdkd"] for s in steps) < 3.0
    assert steps[0]["lr"] == pytest.approx(1e-3 / 2)            # warm-up: ceil(0.03 * 60) = 2 steps

    source = tensors(models["student"] / "model.safetensors")
    final = tensors(result.out / "final" / "model.safetensors")
    merger = [k for k in source if "merger" in k and k.endswith("weight")]
    frozen = [k for k in source if ".visual." in k and "merger" not in k]
    assert merger and all(not final[k].equal(source[k]) for k in merger)
    assert frozen and all(final[k].equal(source[k]) for k in frozen)
