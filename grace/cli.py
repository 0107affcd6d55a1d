"""`python -m grace <command>`: each command lives with the code it drives and is imported on demand."""

from __future__ import annotations

import sys

COMMANDS = {
    "chat": ("grace.chat_cli", "ask a model about an image from the terminal (streams the answer)"),
    "export": ("grace.export", "convert a GRACE QAT release to the AWQ INT4 or packed INT8 layout"),
    "train": ("grace.train.cli", "run GRACE distillation (CE + gated DKD + RCKA + IB controller, QAT)"),
    "eval": ("grace.evaluation", "accuracy on the seven release benchmarks (or shapes), re-scoring, prompts, agreement"),
    "zoo": ("grace.zoo", "rebuild the offline GRACE zoo in assets/zoo"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m grace <command> [options]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:8s} {help_text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    from .errors import GraceLoadError

    module = importlib.import_module(COMMANDS[argv[0]][0])
    try:
        return int(module.main(argv[1:]) or 0)
    except GraceLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
