"""One GPU run (≤ 10 minutes, started by bench/gpu.sh): linear kernels, full-depth decode and three
Compare columns at once, on a CUDA machine.

    python bench/gpu_check.py [--out bench/results/gpu.json] [--budget-s 420]

1. Linears on the 2B shapes at batch 1 and 16 (CUDA events, weights rotated over ≥ 256 MB):
   bf16 F.linear vs Int8Linear vs Int4Linear (tinygemm `_weight_int4pack_mm`) vs torchao's GPU int4
   (Int4WeightOnlyConfig, when torchao is installed and runs here).
2. Full 28-layer 2B decode (random weights, prompt 256, 32 new tokens): bf16 vs INT8 vs INT4.
3. Three Compare columns answering concurrently: the zoo's bf16 / w8 / w4 models loaded on CUDA,
   `grace.chat.answer` in three threads; the answers must equal the same calls made one at a time.
Every section is guarded: a failure is recorded and the next one runs. Nothing here has run yet on
a GPU at the time of writing (no GPU was lent); the first run's numbers go to bench/README.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import grace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(2048, 2048), (2048, 1024), (2048, 6144), (6144, 2048), (2048, 151_936)]


def cuda_time(fn, reps: int = 50) -> float:
    """Median seconds per call over 5 blocks of `reps` calls, timed with CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return sorted(times)[2]


def cycling(items):
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]
    return nxt


@torch.inference_mode()
def linears() -> list[dict]:
    rows = []
    for k, n in SHAPES:
        lin = nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device="cuda")
        variants = {"bf16": lin}
        for name, cfg in (("int8", grace.Int8WeightOnlyConfig()), ("int4", grace.Int4WeightOnlyConfig())):
            holder = nn.Sequential(copy.deepcopy(lin))
            grace.quantize_(holder, cfg)
            variants[name] = holder
        try:
            from torchao.quantization import Int4WeightOnlyConfig, quantize_
            holder = nn.Sequential(copy.deepcopy(lin))
            quantize_(holder, Int4WeightOnlyConfig(group_size=128))
            variants["torchao_int4"] = holder
        except Exception as err:  # noqa: BLE001 - optional peer
            rows.append({"in": k, "out": n, "torchao_int4_error": repr(err)[:300]})
        copies = {}
        for name, mod in variants.items():
            nbytes = sum(t.numel() * t.element_size() for t in list(mod.parameters()) + list(mod.buffers())) or 1
            copies[name] = [mod] + [copy.deepcopy(mod) for _ in range(max(0, (256 << 20) // nbytes))]
        for m in (1, 16):
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            row = {"in": k, "out": n, "m": m, "us": {}}
            ref = F.linear(x.double(), lin.weight.double())
            for name, pool in copies.items():
                nxt = cycling(pool)
                row["us"][name] = cuda_time(lambda: nxt()(x)) * 1e6
                row.setdefault("rel_err_vs_bf16_layer", {})[name] = ((pool[0](x).double() - ref).norm() / ref.norm()).item()
            rows.append(row)
            print(f"  {k}→{n} M={m}: " + ", ".join(f"{a} {b:.1f} µs" for a, b in row["us"].items()), flush=True)
        del copies, variants
        torch.cuda.empty_cache()
    return rows


@torch.inference_mode()
def decode(prompt_len: int = 256, new_tokens: int = 32) -> dict:
    from transformers import Qwen3VLForConditionalGeneration

    from grace.tiny import qwen3vl_2b_config

    out = {}
    ids = torch.randint(0, 151_643, (1, prompt_len), device="cuda")
    for kind in ("bf16", "int8", "int4"):
        torch.manual_seed(0)
        model = Qwen3VLForConditionalGeneration._from_config(qwen3vl_2b_config(), dtype=torch.bfloat16).cuda().eval()
        if kind != "bf16":
            grace.quantize_(model, grace.Int8WeightOnlyConfig() if kind == "int8" else grace.Int4WeightOnlyConfig())
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=151_643, eos_token_id=None)
        model.generate(ids[:, :16], max_new_tokens=4, min_new_tokens=4, **kw)
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        torch.cuda.synchronize()
        total = time.perf_counter() - t
        out[kind] = {"prefill_s": prefill, "decode_tokens_per_s": (new_tokens - 1) / max(total - prefill, 1e-9),
                     "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
        print(f"  decode {kind}: {out[kind]}", flush=True)
        del model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def compare_columns() -> dict:
    from PIL import Image

    from grace.chat import answer

    zoo = ROOT / "assets" / "zoo"
    names = ["grace-bf16", "grace-w8g128", "grace-w4g128-awq"]
    loaded = [grace.load(zoo / n, device="cuda") for n in names]
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    alone = [answer(m, image, "What shape is in the picture?").text for m in loaded]
    together = [None] * 3

    def column(i):
        together[i] = answer(loaded[i], image, "What shape is in the picture?").text

    threads = [threading.Thread(target=column, args=(i,)) for i in range(3)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return {"models": names, "alone": alone, "together": together, "equal": alone == together,
            "concurrent_s": time.perf_counter() - t}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip the sections that would start after this")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to do")
        return 1
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "sections": {}}
    start = time.perf_counter()
    for name, fn in (("linears", linears), ("decode", decode), ("compare_columns", compare_columns)):
        if time.perf_counter() - start > args.budget_s:
            res["sections"][name] = {"skipped": "time budget"}
            continue
        try:
            res["sections"][name] = fn()
        except Exception:  # noqa: BLE001 - record and go on to the next section
            res["sections"][name] = {"error": traceback.format_exc()[-2000:]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(json.dumps(res, indent=2, default=str)[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
