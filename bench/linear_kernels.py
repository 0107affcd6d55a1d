"""Linear kernels on Qwen3-VL-2B's decoder shapes: bf16 F.linear vs Int8Linear vs Int4Linear.

    python bench/linear_kernels.py [--quick] [--threads N]

Part 1, at M = 1 and 16 rows, all variants interleaved in one loop:
  * bf16 activations: bf16 F.linear vs Int8Linear vs Int4Linear (bf16 modules);
  * fp32 activations (reference): fp32 F.linear vs Int8Linear / Int4Linear built with dtype=float32,
    through their forward as it stands (so whichever kernel/dequant path the thresholds pick);
  * the error of each against an fp64 matmul with its own (dequantized) weight.
Part 2, the thresholds: Int8Linear's per-group int8 kernel loop vs its dequantize path (bf16 and
fp32 activations), and the fp32 Int4Linear's kernel vs its dequantize path, at M = 1..16 (and
beyond in full mode, to find where they cross), forced by patching the modules' thresholds
(int8.KERNEL_MAX_ROWS / int8.FP32_KERNEL_MAX_ROWS / int4.FP32_KERNEL_MAX_ROWS).

Codes and scales are random (speed does not depend on them). Writes bench/results/linear_kernels.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _util as U  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import grace.quant.int4 as q4  # noqa: E402
import grace.quant.int8 as q8  # noqa: E402

SHAPES = [(2048, 2048), (2048, 6144), (6144, 2048)]    # (in, out): q/o_proj, gate/up_proj, down_proj
BIG = 1 << 30


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def shape_name(i: int, o: int) -> str:
    return f"{i}→{o}"


def modules_for(i: int, o: int):
    return {
        "int8_bf16": U.random_int8(i, o, dtype=torch.bfloat16, seed=1),
        "int4_bf16": U.random_int4(i, o, dtype=torch.bfloat16, seed=2),
        "int8_fp32": U.random_int8(i, o, dtype=torch.float32, seed=1),
        "int4_fp32": U.random_int4(i, o, dtype=torch.float32, seed=2),
    }


def int8_limit_name(dtype: torch.dtype) -> str:
    """The Int8Linear threshold that applies to activations of `dtype` (fp32 has its own since 1b3b0d7)."""
    return "FP32_KERNEL_MAX_ROWS" if dtype == torch.float32 and hasattr(q8, "FP32_KERNEL_MAX_ROWS") else "KERNEL_MAX_ROWS"


def int8_path(m: int, dtype: torch.dtype = torch.bfloat16) -> str:
    return "kernel" if m <= getattr(q8, int8_limit_name(dtype)) else "dequant"


def int4_fp32_path(m: int) -> str:
    return "kernel" if m <= q4.FP32_KERNEL_MAX_ROWS else "dequant"


@torch.inference_mode()
def part1(shapes, ms, rounds) -> list[dict]:
    rows = []
    for i, o in shapes:
        mods = modules_for(i, o)
        w_bf16 = mods["int4_bf16"].dequantize()                     # a bf16 weight of realistic magnitude
        w_fp32 = w_bf16.float()
        for m in ms:
            g = torch.Generator().manual_seed(m)
            xb = torch.randn(m, i, generator=g).to(torch.bfloat16)
            xf = xb.float()
            fns = {
                "bf16_linear": lambda: F.linear(xb, w_bf16),
                "int8_bf16": lambda: mods["int8_bf16"](xb),
                "int4_bf16": lambda: mods["int4_bf16"](xb),
                "fp32_linear": lambda: F.linear(xf, w_fp32),
                "int8_fp32": lambda: mods["int8_fp32"](xf),
                "int4_fp32": lambda: mods["int4_fp32"](xf),
            }
            samples, load = U.time_interleaved(fns, rounds)
            errors = {
                "bf16_linear": rel_err(F.linear(xb, w_bf16), xb.double() @ w_bf16.double().t()),
                "fp32_linear": rel_err(F.linear(xf, w_fp32), xf.double() @ w_fp32.double().t()),
            }
            for key in ("int8_bf16", "int4_bf16", "int8_fp32", "int4_fp32"):
                x = xb if key.endswith("bf16") else xf
                ref = x.double() @ mods[key].dequantize().double().t()
                errors[key] = rel_err(mods[key](x), ref)
            rows.append({
                "in": i, "out": o, "m": m, "load": load,
                "time": {k: U.summary(v) for k, v in samples.items()},
                "speedup": {
                    "int8_bf16_vs_bf16": U.paired_ratio(samples["bf16_linear"], samples["int8_bf16"]),
                    "int4_bf16_vs_bf16": U.paired_ratio(samples["bf16_linear"], samples["int4_bf16"]),
                    "int8_fp32_vs_fp32": U.paired_ratio(samples["fp32_linear"], samples["int8_fp32"]),
                    "int4_fp32_vs_fp32": U.paired_ratio(samples["fp32_linear"], samples["int4_fp32"]),
                },
                "path": {"int8": int8_path(m), "int8_fp32": int8_path(m, torch.float32), "int4_bf16": "kernel",
                         "int4_fp32": int4_fp32_path(m)},
                "rel_l2_error": errors,
            })
            t = rows[-1]["time"]
            print(f"  {shape_name(i, o)} M={m}: " + ", ".join(f"{k} {U.fmt_us(v['median_s'])}us" for k, v in t.items()) + U.load_note(load),
                  file=sys.stderr, flush=True)
    return rows


@torch.inference_mode()
def int8_sweep(shapes, ms, fp32_max_m, rounds) -> list[dict]:
    rows = []
    for i, o in shapes:
        lb = U.random_int8(i, o, dtype=torch.bfloat16, seed=1)
        lf = U.random_int8(i, o, dtype=torch.float32, seed=1)
        w = lb.dequantize()

        def run(mod, x, limit):
            with U.patched(q8, int8_limit_name(x.dtype), limit):
                return mod(x)

        for m in ms:
            xb = torch.randn(m, i, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
            xf = xb.float()
            fns = {"bf16_loop": lambda: run(lb, xb, BIG), "bf16_dequant": lambda: run(lb, xb, -1),
                   "bf16_linear": lambda: F.linear(xb, w)}
            if m <= fp32_max_m:
                fns |= {"fp32_loop": lambda: run(lf, xf, BIG), "fp32_dequant": lambda: run(lf, xf, -1)}
            samples, load = U.time_interleaved(fns, rounds)
            row = {"in": i, "out": o, "m": m, "load": load, "time": {k: U.summary(v) for k, v in samples.items()},
                   "dequant_over_loop": {"bf16": U.paired_ratio(samples["bf16_dequant"], samples["bf16_loop"])}}
            if m <= fp32_max_m:
                row["dequant_over_loop"]["fp32"] = U.paired_ratio(samples["fp32_dequant"], samples["fp32_loop"])
            rows.append(row)
            print(f"  int8 sweep {shape_name(i, o)} M={m}: " + ", ".join(
                f"{k} {U.fmt_us(v['median_s'])}us" for k, v in row["time"].items()) + U.load_note(load), file=sys.stderr, flush=True)
    return rows


@torch.inference_mode()
def int4_fp32_sweep(shapes, ms, rounds) -> list[dict]:
    rows = []
    for i, o in shapes:
        lf = U.random_int4(i, o, dtype=torch.float32, seed=2)
        lb = U.random_int4(i, o, dtype=torch.bfloat16, seed=2)
        w = lf.dequantize()
        lf.dequantize()            # the CPU layout's inverse permutation is cached: keep its build out of timing

        def run(mod, x, limit):
            with U.patched(q4, "FP32_KERNEL_MAX_ROWS", limit):
                return mod(x)

        for m in ms:
            xf = torch.randn(m, i, generator=torch.Generator().manual_seed(m))
            fns = {"fp32_kernel": lambda: run(lf, xf, BIG), "fp32_dequant": lambda: run(lf, xf, -1),
                   "fp32_linear": lambda: F.linear(xf, w),
                   # alternative: a bf16 module, activations cast to bf16 (the bf16 kernel), cast back
                   "bf16_kernel_cast": lambda: lb(xf.to(torch.bfloat16)).float()}
            samples, load = U.time_interleaved(fns, rounds)
            rows.append({"in": i, "out": o, "m": m, "load": load, "time": {k: U.summary(v) for k, v in samples.items()},
                         "dequant_over_kernel": U.paired_ratio(samples["fp32_dequant"], samples["fp32_kernel"]),
                         "bf16_cast_error": rel_err(lb(xf.to(torch.bfloat16)).float(),
                                                    xf.double() @ lf.dequantize().double().t()),
                         "fp32_kernel_error": rel_err(run(lf, xf, BIG), xf.double() @ w.double().t())})
            print(f"  int4 fp32 sweep {shape_name(i, o)} M={m}: " + ", ".join(
                f"{k} {U.fmt_us(v['median_s'])}us" for k, v in rows[-1]["time"].items()) + U.load_note(load), file=sys.stderr, flush=True)
    return rows


def crossover(rows, key_fn) -> dict:
    """Per shape: the largest M such that the kernel is faster at every tested M up to it."""
    out = {}
    for row in rows:
        name = shape_name(row["in"], row["out"])
        r = key_fn(row)
        if r is None:
            continue
        state = out.setdefault(name, {"kernel_faster_up_to": 0, "broken": False, "first_dequant_faster": None})
        if not state["broken"] and r > 1.0:
            state["kernel_faster_up_to"] = row["m"]
        elif not state["broken"]:
            state["broken"] = True
            state["first_dequant_faster"] = row["m"]
    for state in out.values():
        del state["broken"]
    return out


def quiet(row) -> str:
    """Rounds with the other processes quiet / rounds run (all rounds are used when too few were quiet)."""
    load = row["load"]
    return f"{load['quiet_rounds']}/{load['rounds']}"


def render(res: dict) -> str:
    md = []
    med = lambda row, k: U.fmt_us(row["time"][k]["median_s"])  # noqa: E731
    md.append("#### bf16 activations (bf16 modules): median µs per call; speedup = bf16 time / variant time")
    md.append(U.md_table(
        ["shape (in→out)", "M", "bf16 F.linear", "Int8Linear", "Int4Linear", "INT8 speedup", "INT4 speedup", "quiet"],
        [[shape_name(r["in"], r["out"]), r["m"], med(r, "bf16_linear"), f"{med(r, 'int8_bf16')} ({r['path']['int8']})",
          med(r, "int4_bf16"), f"{r['speedup']['int8_bf16_vs_bf16']:.2f}×", f"{r['speedup']['int4_bf16_vs_bf16']:.2f}×",
          quiet(r)] for r in res["part1"]]))
    md.append("")
    md.append("#### fp32 activations (reference; modules built with dtype=float32, current thresholds)")
    md.append(U.md_table(
        ["shape (in→out)", "M", "fp32 F.linear", "Int8Linear", "Int4Linear", "INT8 speedup", "INT4 speedup", "quiet"],
        [[shape_name(r["in"], r["out"]), r["m"], med(r, "fp32_linear"),
          f"{med(r, 'int8_fp32')} ({r['path'].get('int8_fp32', r['path']['int8'])})",
          f"{med(r, 'int4_fp32')} ({r['path']['int4_fp32']})", f"{r['speedup']['int8_fp32_vs_fp32']:.2f}×",
          f"{r['speedup']['int4_fp32_vs_fp32']:.2f}×", quiet(r)] for r in res["part1"]]))
    md.append("")
    md.append("#### Error vs an fp64 matmul with the same (dequantized) weight: ‖y − y_ref‖ / ‖y_ref‖")
    md.append(U.md_table(
        ["shape (in→out)", "M", "bf16 F.linear", "Int8 (bf16)", "Int4 (bf16)", "fp32 F.linear", "Int8 (fp32)",
         "Int4 (fp32)"],
        [[shape_name(r["in"], r["out"]), r["m"]] + [f"{r['rel_l2_error'][k]:.1e}" for k in
                                                   ("bf16_linear", "int8_bf16", "int4_bf16", "fp32_linear",
                                                    "int8_fp32", "int4_fp32")] for r in res["part1"]]))
    md.append("")
    th = res["thresholds"]
    fp32_th = th.get("int8.FP32_KERNEL_MAX_ROWS")
    md.append(f"#### Int8Linear: per-group int8 kernel loop vs dequantize + F.linear (µs; KERNEL_MAX_ROWS is "
              f"{th['int8.KERNEL_MAX_ROWS']}" + (f", FP32_KERNEL_MAX_ROWS {fp32_th}" if fp32_th is not None else "")
              + "); ratio > 1: the loop is faster")
    rows = []
    for r in res["int8_sweep"]:
        fp32 = ([med(r, "fp32_loop"), med(r, "fp32_dequant"), f"{r['dequant_over_loop']['fp32']:.2f}"]
                if "fp32" in r["dequant_over_loop"] else ["–", "–", "–"])
        rows.append([shape_name(r["in"], r["out"]), r["m"], med(r, "bf16_loop"), med(r, "bf16_dequant"),
                     f"{r['dequant_over_loop']['bf16']:.2f}", med(r, "bf16_linear")] + fp32 + [quiet(r)])
    md.append(U.md_table(["shape", "M", "bf16: loop", "bf16: dequant", "dequant/loop", "(bf16 F.linear)",
                          "fp32: loop", "fp32: dequant", "dequant/loop", "quiet"], rows))
    md.append("")
    md.append(f"#### Int4Linear, fp32 module and activations: kernel vs dequantize path (µs; FP32_KERNEL_MAX_ROWS is "
              f"{res['thresholds']['int4.FP32_KERNEL_MAX_ROWS']}); ratio > 1: the kernel is faster")
    md.append(U.md_table(
        ["shape", "M", "fp32 kernel", "dequant path", "dequant/kernel", "(fp32 F.linear)",
         "(bf16 module, x cast to bf16)", "error of the bf16 cast", "quiet"],
        [[shape_name(r["in"], r["out"]), r["m"], med(r, "fp32_kernel"), med(r, "fp32_dequant"),
          f"{r['dequant_over_kernel']:.2f}", med(r, "fp32_linear"), med(r, "bf16_kernel_cast"),
          f"{r['bf16_cast_error']:.1e}", quiet(r)] for r in res["int4_fp32_sweep"]]))
    md.append("")
    md.append("#### Crossovers (largest M up to which the kernel wins at every tested M)")
    lines = []
    for label, key in (("Int8 bf16", "int8_bf16"), ("Int8 fp32", "int8_fp32"), ("Int4 fp32", "int4_fp32")):
        for shape, c in res["crossover"][key].items():
            first = c["first_dequant_faster"]
            lines.append(f"- {label} {shape}: kernel faster up to M={c['kernel_faster_up_to']}; dequant first faster at "
                         f"{'M=' + str(first) if first else 'no tested M'}")
    md.append("\n".join(lines))
    md.append("")
    md.append("#### Targets")
    md.append("\n".join(f"- {t}" for t in res["targets"]))
    md.append("")
    md.append("`quiet`: timing rounds during which other processes used < 0.25 cores / rounds run; when fewer than "
              "a third were quiet, all rounds are used and the row was measured under contention.")
    return "\n".join(md)


def targets(part1_rows) -> list[str]:
    out = []
    for r in part1_rows:
        if r["m"] != 1:
            continue
        s8, s4 = r["speedup"]["int8_bf16_vs_bf16"], r["speedup"]["int4_bf16_vs_bf16"]
        shape = shape_name(r["in"], r["out"])
        if (r["in"], r["out"]) == (2048, 6144):
            out.append(f"INT4 ≥ 2× bf16 at M=1, {shape}: {s4:.2f}× — {'met' if s4 >= 2 else 'MISSED'}")
        out.append(f"INT8 no slower than bf16 at M=1, {shape}: {s8:.2f}× — {'met' if s8 >= 1 else 'MISSED'}")
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    U.add_common_args(parser)
    parser.add_argument("--render", type=Path, default=None, help="only re-render the tables of a results JSON")
    args = parser.parse_args(argv)
    if args.render:
        res = json.loads(args.render.read_text(encoding="utf-8"))
        res["markdown"] = f"Machine: {U.machine_line(res['machine'])}\n\n" + render(res)
        print(res["markdown"])
        if not args.no_write:
            args.render.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        return res
    U.apply_args(args)
    info = U.machine_info()
    quick = args.quick
    shapes = SHAPES[1:2] if quick else SHAPES
    rounds = 5 if quick else 25
    sweep_rounds = 3 if quick else 11
    int8_ms = [1, 2, 4, 8, 16] if quick else [1, 2, 4, 8, 16, 32, 64, 128, 256]
    int4_ms = [1, 2, 4, 8, 16] if quick else [1, 2, 4, 8, 12, 16, 24, 32]
    print(f"machine: {U.machine_line(info)}", file=sys.stderr)

    res = {"name": "linear_kernels", "quick": quick, "machine": info,
           "thresholds": {"int8.KERNEL_MAX_ROWS": q8.KERNEL_MAX_ROWS,
                          "int8.FP32_KERNEL_MAX_ROWS": getattr(q8, "FP32_KERNEL_MAX_ROWS", None),
                          "int4.FP32_KERNEL_MAX_ROWS": q4.FP32_KERNEL_MAX_ROWS},
           "protocol": f"interleaved, {rounds} rounds (sweeps {sweep_rounds}), medians; ratios = median of per-round ratios"}
    res["part1"] = part1(shapes, [1, 16], rounds)
    res["int8_sweep"] = int8_sweep(shapes, int8_ms, 16, sweep_rounds)
    res["int4_fp32_sweep"] = int4_fp32_sweep(shapes, int4_ms, sweep_rounds)
    res["crossover"] = {
        "int8_bf16": crossover(res["int8_sweep"], lambda r: r["dequant_over_loop"]["bf16"]),
        "int8_fp32": crossover(res["int8_sweep"], lambda r: r["dequant_over_loop"].get("fp32")),
        "int4_fp32": crossover(res["int4_fp32_sweep"], lambda r: r["dequant_over_kernel"]),
    }
    res["targets"] = targets(res["part1"])
    md = f"Machine: {U.machine_line(info)}\n\n" + render(res)
    res["markdown"] = md
    print(md)
    if not args.no_write:
        print(f"\nwrote {U.write_results('linear_kernels', res, args.out)}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
