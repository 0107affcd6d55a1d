"""Evaluation as the GRACE release reports it: seven benchmarks read from their published files, the authors'
protocol (or LLaVA's), JSONL records with resume, re-scoring saved answers, and agreement between variants.

    from grace.evaluation import evaluate, rescore, read_benchmark, build_prompt, extract
    result = evaluate("ForeverBlue/Qwen3-VL-2B-GRACE-W4G128", "data/MMBench_DEV_EN.tsv", out="mmbench.jsonl")
"""

from .benchmarks import BENCHMARKS, GRACE7, detect, locate, read_benchmark
from .item import LETTERS, BenchmarkError, EvalItem, open_image
from .protocol import (PROTOCOLS, Protocol, build_prompt, extract, first_letter, get_protocol, is_correct,
                       last_letter, leading_letter, normalize, open_match, yes_no)
from .report import release_row
from .runner import RecordLog, dump_prompts, evaluate, read_predictions, rescore
from .scoring import EvalResult, compare, id_key, score_one, score_replies, summarize

__all__ = ["BENCHMARKS", "GRACE7", "LETTERS", "PROTOCOLS", "BenchmarkError", "EvalItem", "EvalResult", "Protocol",
           "RecordLog", "build_prompt", "compare", "detect", "dump_prompts", "evaluate", "extract", "first_letter",
           "get_protocol", "id_key", "is_correct", "last_letter", "leading_letter", "locate", "normalize",
           "open_image", "open_match", "read_benchmark", "read_predictions", "release_row", "rescore", "score_one",
           "score_replies", "summarize", "yes_no"]

# `grace.evaluate` is the function; the pieces hang off it too (grace.evaluate.rescore, .build_prompt, ...).
for _name in ("rescore", "dump_prompts", "read_benchmark", "build_prompt", "extract", "is_correct", "compare",
              "summarize", "score_replies", "read_predictions", "release_row"):
    setattr(evaluate, _name, globals()[_name])


def main(argv):   # `python -m grace eval`
    from .cli import main as cli_main

    return cli_main(argv)
