"""`python -m grace eval`: accuracy of one or more models on a benchmark in its published files, the GRACE
authors' protocol by default; re-scoring saved answers; the exact prompts; the release table's row."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .benchmarks import BENCHMARKS, GRACE7, TITLES, locate, read_benchmark
from .item import BenchmarkError
from .protocol import PROTOCOLS
from .report import comparison_text, release_row, release_text, result_text
from .runner import RecordLog, dump_prompts, evaluate, rescore
from .scoring import compare


def at_least_one(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1 (leave --limit out to ask every question)")
    return number


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m grace eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=[], help="checkpoint folder or Hub repo id (repeat to compare)")
    p.add_argument("--bench", choices=BENCHMARKS + ("grace7",), help="benchmark (default: judged from --data)")
    p.add_argument("--data", help="the benchmark's file or folder as published, or shapes-test / shapes-val")
    p.add_argument("--data-root", help="with --bench grace7: the folder holding the seven benchmarks")
    p.add_argument("--protocol", choices=tuple(PROTOCOLS), default="grace", help="prompts and answer reading")
    p.add_argument("--split", help="ScienceQA split (default test) / MMMU split (default validation)")
    p.add_argument("--limit", type=at_least_one, help="first N questions of each benchmark")
    p.add_argument("--max-new-tokens", type=at_least_one, help="override the protocol's answer length")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="JSON lines only; the last is the summary")
    p.add_argument("--out", help="JSONL file receiving every prompt, reply and score")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--dump-prompts", metavar="FILE", help="write the exact prompts (JSONL); without --model, only that")
    p.add_argument("--predictions", metavar="FILE", help="score saved answers (JSONL of {id, answer}) without a model")
    return p


def check(args, p: argparse.ArgumentParser) -> None:
    if args.bench == "grace7":
        if not args.data_root:
            p.error("--bench grace7 needs --data-root DIR (the folder holding the seven benchmarks)")
    elif args.data_root:
        p.error("--data-root goes with --bench grace7; give one benchmark's --data otherwise")
    elif not args.data:
        if args.bench not in (None, "shapes"):
            p.error(f"--bench {args.bench} needs --data (the benchmark's file or folder)")
        args.data = "shapes-test"
    if args.predictions and args.model:
        p.error("--predictions scores saved answers without a model: leave out --model")
    if not (args.model or args.predictions or args.dump_prompts):
        p.error("give --model (to evaluate), --predictions (to re-score) or --dump-prompts")
    if args.resume and not args.out:
        p.error("--resume continues the run saved in --out: give --out")
    if args.out and Path(args.out).exists() and not args.resume:
        p.error(f"{args.out} exists: add --resume to continue it, or choose another --out")


def benchmarks(args) -> list[tuple[str | None, str]]:
    if args.bench == "grace7":
        root = Path(args.data_root).expanduser()
        return [(bench, str(locate(root, bench))) for bench in GRACE7]
    return [(args.bench, args.data)]


def emit(args, text: str = "", data: dict | None = None) -> None:
    if args.json:
        if data is not None:
            print(json.dumps(data, default=str), flush=True)
    elif text:
        print(text, flush=True)


def run(args) -> int:
    plan = [read_benchmark(bench, data, args.limit, args.split) for bench, data in benchmarks(args)]
    if args.dump_prompts:
        for name, items in plan:
            target = args.dump_prompts if len(plan) == 1 else f"{Path(args.dump_prompts).with_suffix('')}.{name}.jsonl"
            count = dump_prompts(items, target, protocol=args.protocol)
            print(f"wrote {count} {TITLES[name]} prompts to {target}", file=sys.stderr)
        if not (args.model or args.predictions):
            return 0
    several = len(plan) > 1
    results: dict[str, dict] = {name: {} for name, _ in plan}     # bench -> model -> result

    def done(name, model, result, missing=0):
        results[name][model] = result
        emit(args, result_text(result, missing), {"bench": name, "model": model, **result.summary()} if several else None)

    if args.predictions:
        for name, items in plan:
            for model, (result, missing) in rescore(items, args.predictions, protocol=args.protocol).items():
                result.bench = name
                done(name, model or "saved answers", result, missing)
    else:
        from ..load import load

        log = RecordLog(args.out, args.resume) if args.out else None
        try:
            for model in args.model:   # each model loaded once for all its benchmarks
                loaded = load(model, device=args.device)
                for name, items in plan:
                    done(name, model, evaluate(loaded, items, protocol=args.protocol, max_new_tokens=args.max_new_tokens,
                                               out=log, label=model, progress=True))
                del loaded
        finally:
            if log is not None:
                log.close()
    for name, by_model in results.items():
        comparison = compare(by_model)
        if not several and not comparison:
            emit(args, "", next(iter(by_model.values())).summary())
        elif not several:
            for model, result in by_model.items():
                emit(args, "", {"model": model, **result.summary()})
            emit(args, comparison_text(comparison), {"comparison": comparison})
        elif comparison:
            emit(args, f"{TITLES[name]}: " + comparison_text(comparison), {"bench": name, "comparison": comparison})
    if args.bench == "grace7":
        rows: dict[str, dict] = {}
        for name, by_model in results.items():
            for model, result in by_model.items():
                rows.setdefault(model, {})[name] = result
        emit(args, release_text({m: release_row(r) for m, r in rows.items()}),
             {"release_row": {m: release_row(r) for m, r in rows.items()}})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    check(args, p)
    try:
        return run(args)
    except BenchmarkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:   # an --out / --dump-prompts path that cannot be written
        print(f"error: {err.strerror or err} ({err.filename})" if err.filename else f"error: {err}", file=sys.stderr)
        return 2
