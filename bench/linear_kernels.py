"""Linear kernels on Qwen3-VL-2B's shapes with cold weights: every bf16 path, our INT8/INT4, and peers.

    python bench/linear_kernels.py [--quick] [--threads N] [--ms 1,2,4,...] [--no-head]

For each shape (the decoder's q/o 2048→2048, k/v 2048→1024, gate/up 2048→6144, down 6144→2048 and
lm_head 2048→151936) and each number of rows M, all variants are timed interleaved in one loop:

  bf16      torch F.linear (oneDNN, the default) · F.linear with oneDNN switched off (a process-wide
            flag: fine in a benchmark, not in a server) · grace's bf16 GEMV (FastBF16Linear)
  ours      Int8Linear / Int4Linear, each path forced: grace's kernel (the GEMV for a few rows, then INT8's
            tile GEMM and the pair GEMM: kernels.py's row limits) and the dequantize + bf16 GEMM
  peers     torch's per-row int8 `_weight_int8pack_mm` and int4 `_weight_int4pack_mm_for_cpu`,
            torchao (Int8WeightOnlyConfig, PrototypeInt4WeightOnlyConfig), optimum-quanto
            (qint8, qint4): each only if installed (optional bench dependencies)

Weights are cold as in real decode: each variant rotates over copies of its weights totalling at
least 256 MB (> the 32-105 MB L3 of the machines we ran), so every call reads them from DRAM. The read
bandwidth is measured before and after (bench/read_bandwidth.py: the fastest of a 1 GiB fp32 sum and a C
loop reading 1, 4 or 8 streams per thread) and each time is also given as a share
of it (bytes the variant must read / time / bandwidth). At M = 1 a second reference is timed in the
same rounds: a plain streaming read (a byte max) of the very bf16 / INT8 / INT4 weight copies our
kernels read, so "% of read" is against what those bytes, that cold, in that round, can give. The
bf16 reference of every speedup is the FASTEST bf16 path at that M. Quantized weights come from the
library (grace.quantize_ on a bf16 linear; peers quantize the same bf16 weight). Writes
bench/results/linear_kernels.json.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _util as U  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import grace  # noqa: E402
from grace.quant import bf16 as qb  # noqa: E402
from grace.quant import int4 as q4  # noqa: E402
from grace.quant import int8 as q8  # noqa: E402
from grace.quant import kernels  # noqa: E402
from grace.quant.bf16 import fast_bf16_linears_  # noqa: E402
from read_bandwidth import read_bandwidth_detail  # noqa: E402

SHAPES = [(2048, 2048), (2048, 1024), (2048, 6144), (6144, 2048)]
HEAD = (2048, 151_936)
COLD_BYTES = 256 << 20
BIG = 1 << 30
GEMV_MAX_M = 256         # grace's kernel variants are not timed above this (its largest default: KERNEL_MAX_ROWS)
READ_MS = (1,)           # the row counts that also time the plain read of the weights (the bandwidth target is at M = 1)
NO_ONEDNN_MAX_M = 8      # nor F.linear with oneDNN off (2-4x behind oneDNN from M = 4 on; minutes at M = 256)
BF16 = ("bf16_onednn", "bf16_no_onednn", "bf16_grace")
LABEL = {"bf16_onednn": "bf16 F.linear (oneDNN)", "bf16_no_onednn": "bf16 F.linear, oneDNN off",
         "bf16_grace": "bf16 grace GEMV", "int8_gemv": "grace INT8 kernel (GEMV / tile, pair or AMX GEMM)", "int8_dequant": "grace INT8 dequant+GEMM",
         "int4_gemv": "grace INT4 kernel (GEMV / pair or AMX GEMM)", "int4_dequant": "grace INT4 dequant+GEMM",
         "torch_int8_row": "torch per-row int8", "torch_int4": "torch int4 (tinygemm CPU)",
         "ao_int8": "torchao int8", "ao_int4": "torchao int4", "quanto_qint8": "quanto qint8", "quanto_qint4": "quanto qint4",
         "read_bf16": "plain read of the bf16 weights", "read_int8": "plain read of the INT8 codes",
         "read_int4": "plain read of the INT4 codes"}


def copies_for(nbytes: int) -> int:
    return max(1, -(-COLD_BYTES // nbytes))


def quantized(linear: nn.Linear, config) -> nn.Module:
    holder = nn.Sequential(copy.deepcopy(linear))
    grace.quantize_(holder, config)
    return holder[0]


def peers(linear: nn.Linear) -> dict:
    """name -> (factory of a quantized copy, bytes read per call) for the optional peers installed."""
    out = {}
    k, n = linear.in_features, linear.out_features
    g = k // 128
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        def ao(cfg):
            holder = nn.Sequential(copy.deepcopy(linear))
            quantize_(holder, cfg)
            return holder
        for name, cfg, nbytes in (("ao_int8", Int8WeightOnlyConfig(), n * k + 2 * n),
                                  ("ao_int4", PrototypeInt4WeightOnlyConfig(group_size=128), n * k // 2 + 4 * g * n)):
            ao(cfg)(torch.zeros(1, k, dtype=torch.bfloat16))     # fails here if the peer cannot run on this machine
            out[name] = (lambda cfg=cfg: ao(cfg), nbytes)
    except Exception as err:  # noqa: BLE001 - an optional peer that does not install or run is reported, not fatal
        print(f"  torchao unavailable: {err!r:.200}", file=sys.stderr)
    try:
        from optimum.quanto import freeze, qint4, qint8, quantize
        def qt(w):
            holder = nn.Sequential(copy.deepcopy(linear))
            quantize(holder, weights=w)
            freeze(holder)
            return holder
        for name, w, nbytes in (("quanto_qint8", qint8, n * k + 2 * n), ("quanto_qint4", qint4, n * k // 2 + 4 * g * n)):
            qt(w)(torch.zeros(1, k, dtype=torch.bfloat16))
            out[name] = (lambda w=w: qt(w), nbytes)
    except Exception as err:  # noqa: BLE001
        print(f"  optimum-quanto unavailable: {err!r:.200}", file=sys.stderr)
    return out


def rotating(items: list):
    it = itertools.cycle(items)
    return lambda: next(it)


def no_onednn(x, w):
    with torch.backends.mkldnn.flags(enabled=False):
        return F.linear(x, w)


@torch.inference_mode()
def measure_shape(k: int, n: int, ms: list[int], rounds: int) -> list[dict]:
    torch.manual_seed(k * 7 + n)
    linear = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
    nn.init.normal_(linear.weight, std=0.02)
    g = k // 128
    m8 = quantized(linear, U.bench_config(8))
    m4 = quantized(linear, U.bench_config(4))
    q_row = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    s_row = torch.rand(n, dtype=torch.bfloat16) * 0.001
    torch_int4 = (torch._convert_weight_to_int4pack_for_cpu(m4.codes().to(torch.int32), 2), m4.scales_zeros().contiguous())
    bytes_of = {"bf16": 2 * n * k, "int8": n * k + 2 * g * n, "int4": n * k // 2 + 4 * g * n,
                "torch_int8_row": n * k + 2 * n, "torch_int4": n * k // 2 + 4 * g * n}
    pool = {"bf16": [linear.weight] + [linear.weight.clone() for _ in range(copies_for(bytes_of["bf16"]) - 1)]}
    pool["int8"] = [m8] + [copy.deepcopy(m8) for _ in range(copies_for(bytes_of["int8"]) - 1)]
    pool["int4"] = [m4] + [copy.deepcopy(m4) for _ in range(copies_for(bytes_of["int4"]) - 1)]
    pool["torch_int8_row"] = [q_row] + [q_row.clone() for _ in range(copies_for(bytes_of["torch_int8_row"]) - 1)]
    pool["torch_int4"] = [torch_int4] + [(torch_int4[0].clone(), torch_int4[1]) for _ in range(copies_for(bytes_of["torch_int4"]) - 1)]
    fast = []
    for w in pool["bf16"]:
        lin = nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        fast_bf16_linears_(nn.Sequential(lin))
        fast.append(lin)
    bytes_of |= {f"read_{kind}": _main_tensor(pool[kind][0]).nbytes for kind in READ_KINDS}
    for name, (make, nbytes) in peers(linear).items():
        bytes_of[name] = nbytes
        pool[name] = [make() for _ in range(copies_for(nbytes))]
    rows = []
    for m in ms:
        x = (torch.randn(m, k) * 0.5).to(torch.bfloat16)
        nxt = {key: rotating(v) for key, v in pool.items()}
        nxt_fast = rotating(fast)
        fns = {"bf16_onednn": lambda: F.linear(x, nxt["bf16"]()),
               "int8_dequant": lambda: _forced(q8, -1, nxt["int8"](), x),
               "int4_dequant": lambda: _forced(q4, -1, nxt["int4"](), x),
               "torch_int8_row": lambda: torch._weight_int8pack_mm(x, nxt["torch_int8_row"](), s_row),
               "torch_int4": lambda: torch._weight_int4pack_mm_for_cpu(x, *_first_sz(nxt["torch_int4"]())),
               **{name: (lambda f=nxt[name]: f()(x)) for name in pool if name.startswith(("ao_", "quanto_"))}}
        if m in READ_MS:
            # what a kernel that only streams the bytes gets: the weight copies' largest tensor (codes or bf16
            # weights; scales are < 4 % of the bytes), rotated like the kernels, one vectorised byte max each
            fns |= {f"read_{kind}": (lambda f=nxt[kind], kind=kind: _main_tensor(f()).view(torch.uint8).amax())
                    for kind in READ_KINDS}
        if m <= NO_ONEDNN_MAX_M:
            fns["bf16_no_onednn"] = lambda: no_onednn(x, nxt["bf16"]())
        if m <= GEMV_MAX_M and kernels.available():
            fns |= {"bf16_grace": lambda: _forced(qb, BIG, nxt_fast(), x),
                    "int8_gemv": lambda: _forced(q8, BIG, nxt["int8"](), x),
                    "int4_gemv": lambda: _forced(q4, BIG, nxt["int4"](), x)}
        samples, load = U.time_interleaved(fns, rounds)
        reference = x.double() @ linear.weight.double().t()
        errors = {}
        for name, fn in fns.items():
            if name == "torch_int8_row" or name.startswith("read_"):
                continue                                  # random codes: a speed peer, not a quantization of W; a read
            errors[name] = ((fn().double() - reference).norm() / reference.norm()).item()
        row = {"in": k, "out": n, "m": m, "load": load, "time": {key: U.summary(v) for key, v in samples.items()},
               "bytes": {name: bytes_of[_bytes_key(name)] for name in fns}, "rel_error_vs_bf16_layer": errors,
               "default_path": {"int8": kernels.gemm_path("int8", m).replace("_", " ") if m <= q8.KERNEL_MAX_ROWS
                                else "dequant",
                                "int4": kernels.gemm_path("int4", m).replace("_", " ") if m <= q4.KERNEL_MAX_ROWS
                                else "dequant",
                                "bf16_grace": "gemv" if m <= qb.kernel_max_rows() else "F.linear (oneDNN)"}}
        if m in READ_MS:
            row["read_gbs"] = {kind: bytes_of[f"read_{kind}"] / row["time"][f"read_{kind}"]["median_s"] / 1e9
                               for kind in READ_KINDS}
            row["share_of_read"] = {name: row["bytes"][name] / row["time"][name]["median_s"] / 1e9
                                    / row["read_gbs"][_read_kind(name)] for name in fns if not name.startswith("read_")}
        best_bf16 = min((name for name in BF16 if name in samples), key=lambda name: row["time"][name]["median_s"])
        row["best_bf16"] = best_bf16
        row["speedup_vs_best_bf16"] = {name: U.paired_ratio(samples[best_bf16], samples[name]) for name in samples}
        rows.append(row)
        print(f"  {k}→{n} M={m}: " + ", ".join(f"{name} {U.fmt_us(v['median_s'])}" for name, v in row["time"].items())
              + U.load_note(load), file=sys.stderr, flush=True)
    return rows


READ_KINDS = ("bf16", "int8", "int4")


def _main_tensor(weight):
    """The tensor holding (nearly) all of a pooled weight's bytes: bf16 weights, or a module's codes."""
    if isinstance(weight, torch.Tensor):
        return weight
    return weight.qweight if isinstance(weight, q8.Int8Linear) else weight.weight_packed


def _read_kind(name: str) -> str:
    """Whose read a variant is measured against: its bytes' kind (peers: our weights of the same kind and size)."""
    return "bf16" if name.startswith("bf16") else "int8" if "int8" in name else "int4"


def _first_sz(pair):
    return pair[0], 128, pair[1]


def _bytes_key(name: str) -> str:
    if name.startswith("bf16"):
        return "bf16"
    if name.startswith(("int8_", "int4_")):
        return name[:4]
    return name


def _forced(module, limit, mod, x):
    # where the module's own limit already takes these rows, call it as a user would: the patching below costs
    # ~2-3 us a call, which the peers (called directly) do not pay
    rows = x.numel() // x.shape[-1]
    if rows <= limit and rows <= (qb.kernel_max_rows() if module is qb else module.KERNEL_MAX_ROWS):
        return mod(x)
    if module is qb:                                  # FastBF16Linear's limit on this machine (AMX, AVX2: their own)
        with (U.patched(qb, "KERNEL_MAX_ROWS", limit), U.patched(qb, "AMX_KERNEL_MAX_ROWS", limit),
              U.patched(qb, "AVX2_KERNEL_MAX_ROWS", limit)):
            return mod(x)
    with U.patched(module, "KERNEL_MAX_ROWS", limit):
        return mod(x)


# -- report ---------------------------------------------------------------------------------------------

def pct(row, name, bandwidth) -> str:
    """The share of the run's read bandwidth, and where timed (M = 1) of the same round's read of the weights."""
    share = f"{row['bytes'][name] / row['time'][name]['median_s'] / 1e9 / bandwidth * 100:.0f}%"
    if name in row.get("share_of_read", {}):
        share += f" · {row['share_of_read'][name] * 100:.0f}% of read"
    return share


def table_for_m(res, m) -> str:
    bw = res["bandwidth_gbs"]
    rows = [r for r in res["rows"] if r["m"] == m]
    if not rows:
        return ""
    names = [n for n in LABEL if any(n in r["time"] for r in rows)]
    out = [f"M = {m}: median µs per call (share of the {bw:.0f} GB/s read bandwidth"
           + (", and of the same round's plain read of the same kind of weights" if any("share_of_read" in r for r in rows) else "")
           + ") and speedup against the fastest bf16 path (marked *)", ""]
    header = ["variant"] + [f"{r['in']}→{r['out']}" for r in rows]
    body = []
    for name in names:
        cells = [LABEL[name]]
        for r in rows:
            if name not in r["time"]:
                cells.append("–")
                continue
            star = "*" if r["best_bf16"] == name else ""
            if name.startswith("read_"):
                kind = name[5:]
                cells.append(f"{U.fmt_us(r['time'][name]['median_s'])} ({pct(r, name, bw)}) = {r['read_gbs'][kind]:.1f} GB/s")
                continue
            cells.append(f"{U.fmt_us(r['time'][name]['median_s'])}{star} ({pct(r, name, bw)}) "
                         f"{r['speedup_vs_best_bf16'][name]:.2f}×")
        body.append(cells)
    body.append(["quiet rounds"] + [f"{r['load']['quiet_rounds']}/{r['load']['rounds']}" for r in rows])
    out.append(U.md_table(header, body))
    return "\n".join(out)


def crossovers(res) -> str:
    lines = []
    by_shape = {}
    for r in res["rows"]:
        by_shape.setdefault((r["in"], r["out"]), []).append(r)
    for (k, n), rows in by_shape.items():
        parts = []
        for gemv, other in (("bf16_grace", "bf16_onednn"), ("int8_gemv", "int8_dequant"), ("int4_gemv", "int4_dequant")):
            wins = [r["m"] for r in rows if gemv in r["time"] and r["time"][gemv]["median_s"] < r["time"][other]["median_s"]]
            loses = [r["m"] for r in rows if gemv in r["time"] and r["m"] not in wins]
            parts.append(f"{gemv} beats {other} at M ∈ {wins or '∅'} (loses at {loses or '∅'})")
        lines.append(f"- {k}→{n}: " + "; ".join(parts))
    return "\n".join(lines)


def render(res) -> str:
    md = [f"Machine: {U.machine_line(res['machine'])}; read bandwidth {res['bandwidth_gbs']:.1f} GB/s "
          f"(before {res['bandwidth_before']:.1f}, after {res['bandwidth_after']:.1f}); thresholds "
          + ", ".join(f"{k} = {v}" for k, v in res["thresholds"].items()), ""]
    for m in sorted({r["m"] for r in res["rows"]}):
        md += [table_for_m(res, m), ""]
    md += ["Where each GEMV wins (the thresholds):", crossovers(res), ""]
    return "\n".join(md)


PEERS = {"int8": ("torch_int8_row", "ao_int8", "quanto_qint8"), "int4": ("torch_int4", "ao_int4", "quanto_qint4")}
SHORT = {"bf16_onednn": "oneDNN", "bf16_no_onednn": "oneDNN off", "bf16_grace": "grace GEMV", "torch_int8_row": "torch per-row",
         "torch_int4": "tinygemm", "ao_int8": "torchao", "ao_int4": "torchao", "quanto_qint8": "quanto", "quanto_qint4": "quanto"}


SHAPE_ORDER = {f"{k}→{n}": i for i, (k, n) in enumerate(SHAPES + [HEAD])}


def summary(results: list[dict], ms: list[int] | None = None) -> str:
    """One line per (shape, M): the fastest bf16 path, our INT8 / INT4 default path (% of its run's bandwidth,
    speedup against that bf16) and the fastest peer of each; rows from the first result that has that M (the
    README's table)."""
    seen, body = set(), []
    for res in results:
        bw = res["bandwidth_gbs"]
        for r in res["rows"]:
            key = (r["in"], r["out"], r["m"])
            if key in seen or (ms and r["m"] not in ms):
                continue
            seen.add(key)
            t = r["time"]
            cells = [f"{r['in']}→{r['out']}", str(r["m"]),
                     f"{U.fmt_us(t[r['best_bf16']]['median_s'])} ({SHORT[r['best_bf16']]})"]
            for bits in ("int8", "int4"):
                ours = f"{bits}_{'gemv' if r['default_path'][bits] != 'dequant' else 'dequant'}"
                cells += [f"{U.fmt_us(t[ours]['median_s'])} ({pct(r, ours, bw)})", f"{r['speedup_vs_best_bf16'][ours]:.2f}×"]
            for bits in ("int8", "int4"):
                peers = [n for n in PEERS[bits] if n in t]
                best = min(peers, key=lambda n: t[n]["median_s"]) if peers else None
                cells.append(f"{SHORT[best]} {U.fmt_us(t[best]['median_s'])}" if best else "–")
            body.append(cells)
    body.sort(key=lambda c: (int(c[1]), SHAPE_ORDER.get(c[0], 99)))
    header = ["shape", "M", "fastest bf16 µs", "grace INT8 µs (% bw)", "INT8 speedup", "grace INT4 µs (% bw)",
              "INT4 speedup", "fastest int8 peer µs", "fastest int4 peer µs"]
    return U.md_table(header, body)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    U.add_common_args(parser)
    parser.add_argument("--ms", default=None, help="comma-separated row counts (default 1,2,4,8,16,32,64,96,256)")
    parser.add_argument("--no-head", action="store_true", help="skip the 2048→151936 lm_head shape")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--render", type=Path, default=None, help="only re-render the tables of a results JSON")
    parser.add_argument("--summary", type=Path, nargs="+", default=None,
                        help="only print the README's summary table from results JSONs (the first with an M wins)")
    args = parser.parse_args(argv)
    asked_ms = [int(v) for v in args.ms.split(",")] if args.ms else None
    if args.summary:
        print(summary([json.loads(p.read_text(encoding="utf-8")) for p in args.summary], asked_ms))
        return {}
    if args.render:
        res = json.loads(args.render.read_text(encoding="utf-8"))
        print(render(res))
        return res
    U.apply_args(args)
    info = U.machine_info()
    ms = asked_ms or ([1, 16] if args.quick else [1, 2, 4, 8, 16, 32, 64, 96, 256])
    shapes = SHAPES[2:3] if args.quick else SHAPES + ([] if args.no_head else [HEAD])
    rounds = args.rounds or (3 if args.quick else 7)
    print(f"machine: {U.machine_line(info)}; kernels available: {kernels.available()}", file=sys.stderr)
    before = read_bandwidth_detail()
    res = {"name": "linear_kernels", "quick": args.quick, "machine": info, "kernels_available": kernels.available(),
           "thresholds": {"amx": kernels.amx(), "int8.KERNEL_MAX_ROWS": q8.KERNEL_MAX_ROWS,
                          "int4.KERNEL_MAX_ROWS": q4.KERNEL_MAX_ROWS, "bf16 GEMV rows": qb.kernel_max_rows(),
                          "int8 GEMV rows": kernels.gemv_max_rows("int8"),
                          "int4 GEMV rows": kernels.gemv_max_rows("int4")},
           "protocol": f"cold weights (≥ {COLD_BYTES >> 20} MB of copies per variant), interleaved, {rounds} rounds, medians",
           "rows": []}
    for k, n in shapes:
        res["rows"] += measure_shape(k, n, [m for m in ms if (k, n) != HEAD or m <= 16], rounds)
    after = read_bandwidth_detail()
    res |= {"bandwidth_before": before["gbs"], "bandwidth_after": after["gbs"],
            "bandwidth_gbs": max(before["gbs"], after["gbs"]), "bandwidth_readers": {"before": before, "after": after}}
    res["markdown"] = render(res)
    print(res["markdown"])
    if not args.no_write:
        print(f"\nwrote {U.write_results('linear_kernels', res, args.out)}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
