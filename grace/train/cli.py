"""`python -m grace train` (and `accelerate launch -m grace train`): one --option per TrainConfig field.

    python -m grace train --teacher T --student S --bits 4 --steps 1000 --data shapes --out runs/w4
    accelerate launch -m grace train ...        # one process per GPU (bf16 autocast, DDP)
    python -m grace train --resume runs/w4      # continue from the run's latest checkpoint
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .config import TrainConfig


def field_defaults() -> dict:
    return {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


def build_parser() -> argparse.ArgumentParser:
    """transformers' HfArgumentParser over TrainConfig, with every default SUPPRESSed: only the options
    given appear in the parsed namespace, so --resume can take the rest from the checkpoint's saved
    configuration. The help still shows each field's default."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(TrainConfig, prog="python -m grace train", description=__doc__.split("\n\n")[0])
    defaults = field_defaults()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        if action.help and action.dest in defaults and action.const is not False:
            action.help = f"{action.help} (default: {defaults[action.dest]})"
        if action.dest == "adam_betas":       # HfArgumentParser has no tuple fields: two floats
            action.type, action.nargs, action.metavar = float, 2, ("B1", "B2")
        action.default, action.required = argparse.SUPPRESS, False
    return parser


def config_from_args(argv: list[str]) -> TrainConfig:
    from .checkpoint import read_checkpoint_config

    given = vars(build_parser().parse_args(argv))
    if given.get("resume"):
        saved = read_checkpoint_config(given["resume"])
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{**{k: v for k, v in saved.items() if k in known}, "out": None, "stop_after": None,
                              **given})
    if "student" not in given:
        raise ValueError("a student checkpoint is required (--student)")
    return TrainConfig(**given)


def main(argv: list[str] | None = None) -> int:
    from ..data.conversations import DataError
    from .checkpoint import CheckpointError
    from .loop import train

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = config_from_args(argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        train(config)    # prints where the results are; raises on failure
    except (CheckpointError, DataError):
        return 1         # already reported in plain words (stderr and the metrics end line)
    return 0
