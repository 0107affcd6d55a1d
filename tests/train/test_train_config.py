"""TrainConfig checks its values; the command line is built from it (transformers' HfArgumentParser)."""

import dataclasses

import pytest

from grace.train.cli import build_parser, config_from_args, main
from grace.train.config import TrainConfig


def test_bad_configuration_is_reported():
    with pytest.raises(ValueError, match="bits must be 2, 3, 4, 8 or 16"):
        TrainConfig(student="s", out="o", bits=5)
    with pytest.raises(ValueError, match="needs a teacher"):
        TrainConfig(student="s", out="o", objective="grace")
    with pytest.raises(ValueError, match="beta_min <= beta_init"):
        TrainConfig(student="s", out="o", beta_init=9.0)
    with pytest.raises(ValueError, match="checkpoint_minutes must be >= 0"):
        TrainConfig(student="s", out="o", checkpoint_minutes=-1)
    with pytest.raises(ValueError, match="a student checkpoint is required"):
        TrainConfig(student="", out="o")
    with pytest.raises(TypeError):
        TrainConfig(out="o")                    # student has no default
    assert TrainConfig(student="s", out="o", teacher="none").resolved_objective == "ce"
    assert TrainConfig(student="s", out="o", teacher="t").resolved_objective == "grace"


def test_command_line_maps_onto_the_config():
    config = config_from_args(["--student", "S", "--teacher", "T", "--out", "O", "--bits", "8", "--lr", "1e-3",
                               "--adam-betas", "0.8", "0.95", "--no-freeze-vision", "--max_length", "64",
                               "--objective", "kd"])
    assert (config.student, config.teacher, config.bits, config.lr, config.adam_betas) == ("S", "T", 8, 1e-3,
                                                                                           (0.8, 0.95))
    assert config.freeze_vision is False and config.max_length == 64 and config.objective == "kd"
    defaults = TrainConfig(student="S", out="O")
    untouched = {f.name for f in dataclasses.fields(TrainConfig)} - {"student", "teacher", "out", "bits", "lr",
                                                                     "adam_betas", "freeze_vision", "max_length",
                                                                     "objective"}
    assert all(getattr(config, name) == getattr(defaults, name) for name in untouched)


def test_only_given_options_are_parsed_so_resume_can_fill_the_rest():
    assert vars(build_parser().parse_args(["--steps", "5"])) == {"steps": 5}


def test_help_lists_every_field_with_its_default():
    text = build_parser().format_help()
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}" in text, f.name
    assert "(default: 0.0001)" in text and "(default: 1.0)" in text


def test_command_line_errors_exit_2_with_a_message(capsys):
    assert main(["--student", "s", "--out", "o", "--steps", "0"]) == 2
    assert "steps must be at least 1" in capsys.readouterr().err
    assert main(["--out", "o"]) == 2
    assert "student checkpoint is required" in capsys.readouterr().err
    assert main(["--resume", "/nonexistent/run"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--bits", "5", "--student", "s", "--out", "o"])         # argparse: not one of the choices
