"""`python -m grace train` (and `accelerate launch -m grace train`): one --option per TrainConfig field.

    python -m grace train --teacher T --student S --bits 4 --steps 1000 --data shapes --out runs/w4
    accelerate launch -m grace train ...        # one process per GPU (bf16 autocast, DDP)
    python -m grace train --resume runs/w4      # continue from the run's latest checkpoint
    python -m grace train --preset qwen3vl-2b-paper --teacher T --student S --data D --out O   # a named recipe
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap

from .config import PRESETS, TrainConfig, preset_values


def field_defaults(preset: str | None = None) -> dict:
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    return defaults | (preset_values(preset) if preset else {})


def build_parser(preset: str | None = None) -> argparse.ArgumentParser:
    """transformers' HfArgumentParser over TrainConfig, with every default SUPPRESSed: only the options
    given appear in the parsed namespace, so --resume can take the rest from the checkpoint's saved
    configuration. The help shows each field's default, or the preset's value when one is named."""
    from transformers import HfArgumentParser

    description = __doc__.split("\n\n")[0]
    if preset:
        description += (f"\n\npreset {preset} (the defaults shown below are its values):\n  "
                        + textwrap.fill(PRESETS[preset]["source"], 96, subsequent_indent="  "))
    parser = HfArgumentParser(TrainConfig, prog="python -m grace train", description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=argparse.SUPPRESS,
                        help="start from a named recipe (its values become the defaults; see --preset NAME --help)")
    defaults = field_defaults(preset)
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "preset"):
            continue
        if action.help and action.dest in defaults and action.const is not False:
            action.help = f"{action.help} (default: {defaults[action.dest]})"
        if action.dest == "adam_betas":       # HfArgumentParser has no tuple fields: two floats
            action.type, action.nargs, action.metavar = float, 2, ("B1", "B2")
        action.default, action.required = argparse.SUPPRESS, False
    return parser


def config_from_args(argv: list[str]) -> TrainConfig:
    from .checkpoint import read_checkpoint_config

    named = argparse.ArgumentParser(add_help=False)
    named.add_argument("--preset", choices=sorted(PRESETS))
    preset = named.parse_known_args(argv)[0].preset
    given = vars(build_parser(preset).parse_args(argv))
    given.pop("preset", None)
    if preset and given.get("resume"):
        raise ValueError("--preset cannot be combined with --resume: a resumed run keeps its saved settings")
    if preset:
        given = preset_values(preset) | given
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
