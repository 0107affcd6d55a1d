"""The shipped accelerate config for DeepSpeed ZeRO-2 parses into what the trainer expects. (DeepSpeed itself
is not needed for this: accelerate reads the file and builds its plugin without it.)"""

import pytest

from grace.train.deepspeed_zero import ACCELERATE_ZERO2, configure_deepspeed


def launch_environment(monkeypatch, config_file):
    """What `accelerate launch --config_file FILE -m grace train ...` puts in each process's environment."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "-m", "grace", "train",
                                               "--steps", "3"])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join([*defaults.deepspeed_config, "mixed_precision"])
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    return args, env


def test_zero2_config_launches_grace_train_with_bf16(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    args, env = launch_environment(monkeypatch, ACCELERATE_ZERO2)
    assert args.use_deepspeed and args.zero_stage == 2 and args.mixed_precision == "bf16"
    assert args.module and args.training_script == "grace" and args.training_script_args[0] == "train"
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == 2 and plugin.deepspeed_config["zero_optimization"]["stage"] == 2
    assert plugin.deepspeed_config["zero_optimization"]["offload_optimizer"]["device"] == "none"
    configure_deepspeed(plugin, max_grad_norm=0.7)      # the TrainConfig's clip norm goes to the engine
    assert plugin.deepspeed_config["gradient_clipping"] == 0.7


def test_zero3_is_refused_in_words(monkeypatch, tmp_path):
    from accelerate.utils import DeepSpeedPlugin

    zero3 = tmp_path / "zero3.yaml"
    zero3.write_text(ACCELERATE_ZERO2.read_text().replace("zero_stage: 2", "zero_stage: 3"))
    launch_environment(monkeypatch, zero3)
    with pytest.raises(ValueError, match="stage 3 shards the parameters"):
        configure_deepspeed(DeepSpeedPlugin(), max_grad_norm=1.0)


def test_a_deepspeed_launch_on_a_cpu_machine_says_it_trains_without_it(models, tmp_path, monkeypatch, capsys):
    """accelerate runs DeepSpeed only on GPUs; on CPU the trainer says it trains as plain processes instead.
    (Needs deepspeed itself, an optional dependency: accelerate builds its plugin from the launch's settings.)"""
    pytest.importorskip("deepspeed")
    import torch

    import grace
    from grace.train.deepspeed_zero import deepspeed_requested

    from train_helpers import settings

    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the launch does run DeepSpeed")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert deepspeed_requested()
    result = grace.train(settings(models, tmp_path / "run", teacher="none", bits=16, steps=1))
    assert result.outcome == "finished"
    err = capsys.readouterr().err
    assert "DeepSpeed was asked for, but accelerate runs it only on GPUs" in err and "1 plain" in err
