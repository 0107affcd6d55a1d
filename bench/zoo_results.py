"""The zoo's results table: accuracy (shapes v2 test split, the independent renderer of tests/ at v2 variety,
and the v1 64x64 split of the shipped examples), bytes held and decode speed of every variant, laid out like
the GRACE release's results table; then the bits sweep from zoo.json as a table and docs/zoo_sweep.png.

    python bench/zoo_results.py [--test 500] [--alt 300] [--v1 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys

from _util import ROOT, add_common_args, apply_args, machine_info, machine_line, md_table, write_results

sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

import grace  # noqa: E402
from grace.chat import GenerationSettings, answer  # noqa: E402
from grace.evaluation import evaluate  # noqa: E402
from grace.zoo import DEFAULT_OUT  # noqa: E402

ROWS = [("teacher", "Teacher (8B role)", "BF16"), ("student", "Student baseline (2B role), CE", "BF16"),
        ("grace-bf16", "GRACE student", "BF16"), ("grace-w8g128", "GRACE student", "W8G128"),
        ("grace-w4g128-awq", "GRACE student", "W4G128 (AWQ)"), ("ptq-rtn-w8g128", "PTQ round-to-nearest", "W8G128"),
        ("ptq-rtn-w4g128", "PTQ round-to-nearest", "W4G128 (AWQ)"), ("qat-ce-w4g128", "QAT, CE only", "W4G128 (AWQ)")]


def decode_speed(loaded, image, repeats: int = 5, tokens: int = 16) -> float:
    """Median decode tokens/s (prefill excluded) of `tokens` forced new tokens."""
    speeds = []
    settings = GenerationSettings(max_new_tokens=tokens)
    loaded.model.generation_config.min_new_tokens = tokens
    for _ in range(repeats):
        result = answer(loaded, image, "Describe the image.", settings)
        if result.tokens_per_s:
            speeds.append(result.tokens_per_s)
    return statistics.median(speeds)


def language_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if "language_model" in n or n.startswith("lm_head"))


class Recorded:
    """A stage's v2 test-split result as the build recorded it in zoo.json (the same model, split and greedy
    decoding: scoring it again would give the same answers)."""

    def __init__(self, stage: dict):
        self.accuracy, self.per_type, self.n = stage["accuracy"], stage["per_type"], stage["n"]


def recorded(name: str, n: int):
    import json

    record = DEFAULT_OUT / "zoo.json"
    stage = json.loads(record.read_text()).get("stages", {}).get(name, {}) if record.is_file() else {}
    return Recorded(stage) if stage.get("n") == n and stage.get("split") == "shapes-v2-test" else None


def upload_items(size: tuple[int, int], n: int):
    """n shapes-task questions on pictures of an upload's size (beyond the task's 320 px: the budget resizes)."""
    import random

    from grace.data.shapes import ask
    from grace.data.shapes_v2 import draw_scene
    from grace.evaluation import EvalItem

    items = []
    for index in range(n):
        rng = random.Random(f"upload/{size}/{index}")
        image, shapes, _ = draw_scene(rng, size)
        kind, question, answer = ask(rng, shapes)
        items.append(EvalItem(question, answer, kind, image, id=index, bench="shapes"))
    return items


def retention(variants: dict) -> dict:
    """GRACE W8 / W4 accuracy as a share of GRACE BF16's, on each data set (the Must-show ratios)."""
    out = {}
    base = variants.get("grace-bf16")
    for name in ("grace-w8g128", "grace-w4g128-awq"):
        if base and name in variants:
            shares = {k: variants[name][k] / base[k] if base[k] else None for k in ("accuracy_test", "accuracy_alt")}
            out[name] = shares | {"text": f"{name}: {100 * shares['accuracy_test']:.1f} % of GRACE BF16 on the test "
                                          f"split, {100 * shares['accuracy_alt']:.1f} % on the independent renderer"}
    return out


def traces() -> None:
    """docs/zoo_trace_*.png: the Train tab's four panels for the zoo's GRACE runs (from the build's work folder)."""
    from grace.train.metrics import read_metrics
    from sweep_plot import draw_trace

    work = DEFAULT_OUT.parent / (DEFAULT_OUT.name + "-work") / "runs"
    for run, png, title in (("grace-bf16-leg2", "zoo_trace_bf16.png", "GRACE BF16 stage, second leg (zoo v2 build)"),
                            ("qat-grace-w4-s0", "zoo_trace_w4.png", "GRACE QAT W4G128 stage (zoo v2 build)")):
        metrics = work / run / "metrics.jsonl"
        if metrics.is_file():
            draw_trace(read_metrics(metrics).steps, ROOT / "docs" / png, title)


def sweep_section() -> str | None:
    """The sweep of zoo.json as a markdown table, and its plot as docs/zoo_sweep.png."""
    from grace.zoo_sweep import read_sweep
    from sweep_plot import NAMES, draw_sweep

    sweep = read_sweep(DEFAULT_OUT / "zoo.json")
    if not sweep:
        return None
    draw_sweep(sweep["rows"], sweep.get("bf16"), ROOT / "docs" / "zoo_sweep.png")
    cells = {}
    for r in sweep["rows"]:
        spread = f" ± {r['std']:.3f} (n={r['n_seeds']})" if r["n_seeds"] > 1 else ""
        cells[(r["method"], r["bits"])] = f"{r['mean']:.3f}{spread}"
    bits = sorted({r["bits"] for r in sweep["rows"]}, reverse=True)
    rows = [[NAMES[m]] + [cells.get((m, b), "-") for b in bits] for m in NAMES]
    bytes_row = {r["bits"]: r for r in sweep["rows"]}
    rows.append(["bytes of the quantized linears (held / ideal b-bit)"] +
                [f"{bytes_row[b]['container_bytes'] / 1e3:.0f} kB / {bytes_row[b]['ideal_bytes'] / 1e3:.0f} kB"
                 for b in bits])
    return (f"Bits sweep from GRACE BF16 ({sweep['bf16']:.3f}), first {sweep['questions']} questions of the shapes "
            f"v2 test split; mean ± standard deviation over seeds:\n\n"
            + md_table(["method"] + [f"W{b}G128" for b in bits], rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_args(parser)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--alt", type=int, default=300)
    parser.add_argument("--v1", type=int, default=200)
    parser.add_argument("--uploads", type=int, default=20, help="questions on 640x480 and on 1000x300 pictures")
    args = parser.parse_args()
    apply_args(args)
    from alt_shapes import alt_items
    from grace.data.shapes import make_sample

    alt = alt_items(args.alt)
    image = make_sample("test", 0, 0).image
    from grace.data.shapes_v2 import make_sample as make_v2

    image = make_v2("test", 0, 0).image
    rows, payload = [], {"variants": {}}
    for name, model, precision in ROWS:
        folder = DEFAULT_OUT / name
        if not (folder / "README.md").is_file():
            print(f"skipping {name}: not built", file=sys.stderr)
            continue
        exact = grace.load(folder, device="cpu", dtype=torch.float32)
        own = recorded(name, args.test) or evaluate(exact, "shapes-v2-test", limit=args.test, progress=True)
        other = evaluate(exact, alt, progress=True)
        v1 = evaluate(exact, "shapes-test", limit=args.v1, progress=True)
        uploads = {f"{w}x{h}": evaluate(exact, upload_items((w, h), args.uploads), progress=False).accuracy
                   for w, h in ((640, 480), (1000, 300))}
        held = grace.load(folder, device="cpu", dtype=torch.bfloat16)
        speed = decode_speed(held, image)
        entry = {"accuracy_test": own.accuracy, "per_type_test": own.per_type, "accuracy_alt": other.accuracy,
                 "per_type_alt": other.per_type, "accuracy_v1_64px": v1.accuracy,
                 "accuracy_uploads": uploads, "weight_bytes": held.weight_bytes,
                 "language_model_bytes": language_bytes(held.model), "decode_tokens_per_s": speed}
        payload["variants"][name] = entry
        rows.append([model, precision, f"{own.accuracy:.3f}", f"{other.accuracy:.3f}", f"{v1.accuracy:.3f}", " / ".join(f"{a:.2f}" for a in uploads.values()),
                     " / ".join(f"{own.per_type.get(t, 0):.2f}" for t in ("color", "count", "exist", "left", "describe")),
                     f"{held.weight_bytes / 1e6:.2f}", f"{entry['language_model_bytes'] / 1e6:.2f}", f"{speed:.0f}"])
    headers = ["Model", "Precision", f"shapes v2 test ({args.test})", f"independent renderer v2 ({args.alt})",
               f"v1 64x64 ({args.v1})", f"640x480 / 1000x300 ({args.uploads} each)",
               "color / count / exist / left / describe", "weights MB", "language model MB", "decode tok/s"]
    info = machine_info()
    table = md_table(headers, rows)
    print(table)
    ratios = retention(payload["variants"])
    payload["retention"] = ratios
    for line in ratios.values():
        print(line["text"])
    traces()
    sweep = sweep_section()
    if sweep:
        payload["sweep_table"] = sweep
        print(sweep)
    print(f"\nMachine: {machine_line(info)}. Accuracy with fp32 activations, greedy; bytes and speed with bf16 "
          "activations (INT8/INT4 linears packed).")
    if not args.no_write:
        payload.update(machine=info, table=table)
        write_results("zoo_results", payload, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
