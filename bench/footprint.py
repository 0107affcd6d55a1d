"""Weight bytes of the whole Qwen3-VL-2B in BF16, INT8 and INT4 layouts, built on the meta device.

    python bench/footprint.py [--quick]

Nothing is downloaded or allocated: the model is built from `grace.tiny.qwen3vl_2b_config()` under
`init_empty_weights`, and for INT8/INT4 the language model's decoder linears (q/k/v/o/gate/up/down;
not the vision tower, its mergers, lm_head or embed_tokens) are quantized by `grace.quantize_`
(as every benchmark does, `bench/_util.bench_config`) on the meta device, so the bytes are what
those `Int8Linear` / `Int4Linear` modules hold
(`grace.load.tensor_bytes`: parameters and buffers, shared tensors once, tied embeddings once).
The module bytes are cross-checked against the formulas (int4: out*in/2 + 4*out*in/128; int8:
out*in + 2*out*in/128) and against real CPU modules of the same shapes (whose int4 layout is the
CPU kernel's). Writes bench/results/footprint.json.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _util as U  # noqa: E402
import torch  # noqa: E402
from accelerate import init_empty_weights  # noqa: E402
from transformers import Qwen3VLForConditionalGeneration  # noqa: E402

import grace  # noqa: E402
from grace.load import tensor_bytes  # noqa: E402
from grace.quant import Int4Linear, Int8Linear  # noqa: E402
from grace.tiny import qwen3vl_2b_config  # noqa: E402

GROUP = 128


def build(kind: str, layers: int):
    """The 2B model on the meta device, its decoder linears replaced for kind int8/int4."""
    config = qwen3vl_2b_config(num_hidden_layers=layers)
    with init_empty_weights(include_buffers=True):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    # transformers 5.24: _from_config under accelerate's init_empty_weights leaves lm_head untied (a plain
    # build or `with torch.device("meta")` ties it); the 2B release ties it, so tie it here
    model.tie_weights()
    assert model.lm_head.weight is model.get_input_embeddings().weight, "lm_head not tied to embed_tokens"
    if kind == "bf16":
        return model, U.decoder_linear_names(model)
    return model, grace.quantize_(model, U.bench_config(int(kind[3:])))   # on the meta device: shapes only


def formula(kind: str, out_f: int, in_f: int) -> int:
    groups = in_f // GROUP
    if kind == "int4":
        return out_f * in_f // 2 + groups * out_f * 2 * 2          # codes + scales_and_zeros [g, out, 2] bf16
    if kind == "int8":
        return out_f * in_f + groups * out_f * 2                    # codes + scales [g, out] bf16
    return out_f * in_f * 2


def check_modules(shapes) -> list[dict]:
    """Meta module bytes == formula == a real CPU module's bytes, for each decoder shape."""
    rows = []
    for out_f, in_f in sorted(shapes):
        row = {"out": out_f, "in": in_f}
        for kind, cls in (("int4", Int4Linear), ("int8", Int8Linear)):
            meta = tensor_bytes(cls(in_f, out_f, False, GROUP, torch.bfloat16, "meta"))
            cpu = tensor_bytes(cls(in_f, out_f, False, GROUP, torch.bfloat16, "cpu"))
            row[kind] = {"meta": meta, "cpu": cpu, "formula": formula(kind, out_f, in_f)}
            if not meta == cpu == row[kind]["formula"]:
                raise AssertionError(f"{kind} {out_f}x{in_f}: meta {meta}, cpu {cpu}, formula {row[kind]['formula']}")
        rows.append(row)
    return rows


def parts(model, names) -> dict[str, int]:
    lm = model.model.language_model
    decoder = sum(tensor_bytes(model.get_submodule(n)) for n in names)
    return {
        "whole model": tensor_bytes(model),
        "language model": tensor_bytes(lm),
        "  decoder linears (q/k/v/o/gate/up/down)": decoder,
        "  embed_tokens (= tied lm_head)": tensor_bytes(lm.embed_tokens),
        "  norms, rotary tables": tensor_bytes(lm) - decoder - tensor_bytes(lm.embed_tokens),
        "vision tower (incl. merger, deepstack mergers)": tensor_bytes(model.model.visual),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    U.add_common_args(parser)
    args = parser.parse_args(argv)
    U.apply_args(args)
    info = U.machine_info()
    layers = 2 if args.quick else 28        # --quick: a 2-layer cut, to smoke-test the script

    results, names_by_kind = {}, {}
    for kind in ("bf16", "int8", "int4"):
        model, names = build(kind, layers)
        results[kind] = parts(model, names)
        names_by_kind[kind] = names
        if kind == "bf16":
            shapes = Counter(tuple(model.get_submodule(n).weight.shape) for n in names)
            params = sum(p.numel() for p in model.parameters())   # shared (tied) parameters once
            assert all(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
            assert whole_is_sum(results[kind])
        else:
            n_q = sum(isinstance(m, (Int4Linear, Int8Linear)) for m in model.modules())
            assert n_q == len(names) == 7 * layers, (n_q, len(names))
        del model
    checks = check_modules(shapes)

    ratios = {k: {p: results[k][p] / results["bf16"][p] for p in results["bf16"]} for k in ("int8", "int4")}
    def gb(v: int) -> str:
        return f"{v / 1e9:.3f}" if v >= 1e7 else f"{v / 1e6:.3f} MB"

    rows = []
    for part in results["bf16"]:
        rows.append([part.replace("  ", "↳ "), gb(results['bf16'][part]), gb(results['int8'][part]),
                     f"{ratios['int8'][part]:.3f}×", gb(results['int4'][part]), f"{ratios['int4'][part]:.3f}×"])
    whole8, whole4 = ratios["int8"]["whole model"], ratios["int4"]["whole model"]
    def verdict(ok: bool) -> str:
        return "n/a (--quick: 2-layer cut)" if args.quick else ("met" if ok else "MISSED")

    target_lines = [f"INT4 ≤ 0.52× BF16 (whole model): {whole4:.3f}× — {verdict(whole4 <= 0.52)}",
                    f"INT8 ≤ 0.70× BF16 (whole model): {whole8:.3f}× — {verdict(whole8 <= 0.70)}"]
    md = "\n".join([
        f"Qwen3-VL-2B shapes ({layers} decoder layers{'' if layers == 28 else ', --quick'}), "
        f"{params / 1e9:.3f} B parameters (tied embeddings once), weight bytes in GB (10^9 bytes), built on the meta device.",
        "",
        U.md_table(["part", "BF16 GB", "INT8 GB", "INT8 / BF16", "INT4 GB", "INT4 / BF16"], rows),
        "",
        f"Quantized: {len(names_by_kind['int4'])} decoder linears, group size {GROUP}; shapes (out×in: count) "
        + ", ".join(f"{o}×{i}: {c}" for (o, i), c in sorted(shapes.items())) + ". "
        "Per-module bytes checked equal across meta module, CPU module and formula "
        "(int4: out·in/2 + 4·out·in/128; int8: out·in + 2·out·in/128).",
        "",
        "#### Targets",
        "\n".join(f"- {t}" for t in target_lines),
    ])
    res = {"name": "footprint", "quick": args.quick, "machine": info, "decoder_layers": layers,
           "parameters": params, "bytes": results, "ratios_vs_bf16": ratios, "module_checks": checks,
           "quantized_modules": len(names_by_kind["int4"]), "targets": target_lines, "markdown": md}
    print(md)
    if not args.no_write:
        print(f"\nwrote {U.write_results('footprint', res, args.out)}", file=sys.stderr)
    return res


def whole_is_sum(r: dict) -> bool:
    """Whole model = language model + vision tower (lm_head tied, so it adds nothing)."""
    return r["whole model"] == r["language model"] + r["vision tower (incl. merger, deepstack mergers)"]


if __name__ == "__main__":
    main()
