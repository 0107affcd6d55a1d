"""End-to-end greedy decode of a shape-faithful Qwen3-VL-2B cut to 4 decoder layers: BF16 vs INT8 vs INT4.

    python bench/decode.py [--quick] [--layers 4] [--prompt-len 32] [--new-tokens 32]

The model is `qwen3vl_2b_config(num_hidden_layers=4)` with random weights in bf16; the INT8/INT4
variants replace its 28 (4 layers × 7) decoder linears by Int8Linear/Int4Linear holding the
round-to-nearest quantization of the same random weights (grace.quantize_, bench/_util.bench_config). Everything
else (the full 151 936-token embedding = tied lm_head, final norm, the unused vision tower) is the
same tensors, shared between the three models.

A text-only prompt of random token ids goes through `model.generate(..., min_new_tokens=N,
max_new_tokens=N, do_sample=False)`; a logits processor stamps the time of each step, so one call
gives the prefill time (start → first logits) and the decode time per token (first → last logits,
over N-1 steps). The three variants are interleaved within every round, medians over rounds.

A second, hooked pass times each decoder layer and lm_head during decode steps, to split the
per-token time into decoder layers / lm_head / the rest (step minus those), and to project a 28-layer decode step
(rest + lm_head + 28 × layer; a projection, not a measurement). Writes bench/results/decode.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _util as U  # noqa: E402
import torch  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList, Qwen3VLForConditionalGeneration  # noqa: E402

import grace  # noqa: E402
from grace.load import tensor_bytes  # noqa: E402
from grace.tiny import qwen3vl_2b_config  # noqa: E402

VARIANTS = ("bf16", "int8", "int4")
PAD, EOS = 151_643, 151_645           # <|endoftext|>, <|im_end|>; prompt ids stay below the special tokens


class Stamp(LogitsProcessor):
    """Records the time at which each generation step's logits are ready."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def build(layers: int, seed: int) -> dict:
    config = qwen3vl_2b_config(num_hidden_layers=layers)
    torch.manual_seed(seed)
    base = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    assert base.lm_head.weight is base.get_input_embeddings().weight
    quantized = set(U.decoder_linear_names(base))
    # share every tensor except the decoder linears' weights between the variants
    keep_shared = {id(t): t for n, t in list(base.named_parameters()) + list(base.named_buffers())
                   if n.rsplit(".", 1)[0] not in quantized}
    models = {"bf16": base}
    for bits, name in ((8, "int8"), (4, "int4")):
        model = copy.deepcopy(base, memo=dict(keep_shared))
        grace.quantize_(model, U.bench_config(bits))
        models[name] = model
    for model in models.values():
        gc = model.generation_config
        gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = PAD, EOS, None
        gc.do_sample, gc.temperature, gc.top_p, gc.top_k = False, None, None, None
    return models


def generate(model, ids, n: int) -> dict:
    stamp = Stamp()
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, logits_processor=LogitsProcessorList([stamp]))
    end = time.perf_counter()
    assert out.shape[1] == ids.shape[1] + n and len(stamp.times) == n, (out.shape, len(stamp.times))
    return {"prefill_s": stamp.times[0] - start, "decode_s_per_token": (stamp.times[-1] - stamp.times[0]) / (n - 1),
            "total_s": end - start, "tokens": out[0, ids.shape[1]:].tolist()}


class LayerClock:
    """Forward hooks timing each decoder layer and lm_head call (pre-hook → hook)."""

    def __init__(self, model):
        self.calls: dict[str, list[float]] = {}
        self.handles = []
        lm = model.model.language_model
        targets = [(f"layer{i}", layer) for i, layer in enumerate(lm.layers)] + [("lm_head", model.lm_head)]
        for key, module in targets:
            self.calls[key] = []
            self.handles.append(module.register_forward_pre_hook(self._pre(key)))
            self.handles.append(module.register_forward_hook(self._post(key)))
        self._t0: dict[str, float] = {}

    def _pre(self, key):
        def hook(module, args):
            self._t0[key] = time.perf_counter()
        return hook

    def _post(self, key):
        def hook(module, args, output):
            self.calls[key].append(time.perf_counter() - self._t0[key])
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.inference_mode()
def run(models, ids, n: int, rounds: int, breakdown_rounds: int) -> dict:
    for model in models.values():                      # warm up (allocator, kernels, int4 permutation caches)
        generate(model, ids, 4)
    samples = {v: {"prefill_s": [], "decode_s_per_token": [], "total_s": []} for v in VARIANTS}
    tokens, others = {}, []
    for r in range(rounds):
        U.MONITOR.wait_quiet(U.MAX_WAIT_S)
        mark = U.MONITOR.start()
        shift = r % len(VARIANTS)
        for v in VARIANTS[shift:] + VARIANTS[:shift]:
            res = generate(models[v], ids, n)
            for k in samples[v]:
                samples[v][k].append(res[k])
            tokens[v] = res["tokens"]
        others.append(U.MONITOR.others(mark))
        print(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{v} prefill {samples[v]['prefill_s'][-1] * 1e3:.0f} ms, decode {1 / samples[v]['decode_s_per_token'][-1]:.1f} tok/s"
            for v in VARIANTS) + f"  [others used {others[-1]:.2f} cores]", file=sys.stderr, flush=True)
    quiet = [i for i, o in enumerate(others) if o < U.QUIET_CORES]
    keep = quiet if len(quiet) >= max(3, rounds // 3) else list(range(rounds))
    samples = {v: {k: [s[i] for i in keep] for k, s in d.items()} for v, d in samples.items()}

    # breakdown: hooked runs, interleaved too; quiet rounds only when there is one
    rounds_calls, rounds_others = [], []
    for r in range(breakdown_rounds):
        U.MONITOR.wait_quiet(U.MAX_WAIT_S)
        mark = U.MONITOR.start()
        calls = {v: {} for v in VARIANTS}
        shift = r % len(VARIANTS)
        for v in VARIANTS[shift:] + VARIANTS[:shift]:
            clock = LayerClock(models[v])
            try:
                generate(models[v], ids, n)
            finally:
                clock.remove()
            for key, times in clock.calls.items():
                calls[v][key] = times[1:]                              # drop the prefill call
        rounds_calls.append(calls)
        rounds_others.append(U.MONITOR.others(mark))
    quiet_b = [i for i, o in enumerate(rounds_others) if o < U.QUIET_CORES]
    keep_b = quiet_b or list(range(breakdown_rounds))
    per_call = {v: {} for v in VARIANTS}
    for i in keep_b:
        for v in VARIANTS:
            for key, times in rounds_calls[i][v].items():
                per_call[v].setdefault(key, []).extend(times)
    return {"samples": samples, "tokens": tokens, "per_call": per_call,
            "load": {"rounds": rounds, "rounds_kept": len(keep), "quiet_rounds": len(quiet),
                     "others_cores_median_kept": statistics.median(others[i] for i in keep),
                     "breakdown_rounds": breakdown_rounds, "breakdown_rounds_kept": len(keep_b),
                     "breakdown_quiet_rounds": len(quiet_b)}}


@torch.inference_mode()
def logits_agreement(models, ids) -> dict:
    """Last-token logits of the prompt vs the BF16 model's: cosine and relative L2 error."""
    ref = models["bf16"](input_ids=ids).logits[0, -1].double()
    out = {}
    for v in ("int8", "int4"):
        y = models[v](input_ids=ids).logits[0, -1].double()
        out[v] = {"cosine": torch.nn.functional.cosine_similarity(y, ref, dim=0).item(),
                  "rel_l2": ((y - ref).norm() / ref.norm()).item(), "argmax_equal": bool(y.argmax() == ref.argmax())}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    U.add_common_args(parser)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=None, help="default 32 (--quick: 8)")
    parser.add_argument("--rounds", type=int, default=None, help="default 9 (--quick: 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    U.apply_args(args)
    info = U.machine_info()
    n = args.new_tokens or (8 if args.quick else 32)
    rounds = args.rounds or (2 if args.quick else 9)
    breakdown_rounds = 1 if args.quick else 3
    print(f"machine: {U.machine_line(info)}", file=sys.stderr)

    t = time.perf_counter()
    models = build(args.layers, args.seed)
    print(f"built the three models in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    ids = torch.randint(0, PAD, (1, args.prompt_len), generator=torch.Generator().manual_seed(args.seed))
    agreement = logits_agreement(models, ids)
    out = run(models, ids, n, rounds, breakdown_rounds)
    s = out["samples"]

    layer_keys = [f"layer{i}" for i in range(args.layers)]
    summary = {}
    for v in VARIANTS:
        step = statistics.median(s[v]["decode_s_per_token"])
        layer = statistics.median(x for k in layer_keys for x in out["per_call"][v][k])
        head = statistics.median(out["per_call"][v]["lm_head"])
        rest = step - args.layers * layer - head
        projected = rest + head + 28 * layer
        summary[v] = {
            "prefill_s": statistics.median(s[v]["prefill_s"]),
            "decode_s_per_token": step, "decode_tokens_per_s": 1 / step,
            "end_to_end_tokens_per_s": n / statistics.median(s[v]["total_s"]),
            "decoder_layer_s": layer, "lm_head_s": head, "rest_s": rest,
            "projected_28_layer_s_per_token": projected, "projected_28_layer_tokens_per_s": 1 / projected,
            "weight_bytes": tensor_bytes(models[v]),
            "decoder_linear_bytes": sum(tensor_bytes(models[v].get_submodule(name))
                                        for name in U.decoder_linear_names(models["bf16"])),
        }
    for v in ("int8", "int4"):
        summary[v]["decode_speedup_vs_bf16"] = U.paired_ratio(s["bf16"]["decode_s_per_token"], s[v]["decode_s_per_token"])
        summary[v]["prefill_speedup_vs_bf16"] = U.paired_ratio(s["bf16"]["prefill_s"], s[v]["prefill_s"])
        summary[v]["layer_speedup_vs_bf16"] = summary["bf16"]["decoder_layer_s"] / summary[v]["decoder_layer_s"]
        summary[v]["projected_28_layer_speedup_vs_bf16"] = (summary["bf16"]["projected_28_layer_s_per_token"]
                                                            / summary[v]["projected_28_layer_s_per_token"])

    def sp(v, key):
        return "1.00×" if v == "bf16" else f"{summary[v][key]:.2f}×"

    main_rows = [[v.upper(), U.fmt_ms(summary[v]["prefill_s"]), sp(v, "prefill_speedup_vs_bf16"),
                  f"{summary[v]['decode_tokens_per_s']:.1f}", U.fmt_ms(summary[v]["decode_s_per_token"]),
                  sp(v, "decode_speedup_vs_bf16"), f"{summary[v]['end_to_end_tokens_per_s']:.1f}",
                  f"{summary[v]['weight_bytes'] / 1e9:.3f}"] for v in VARIANTS]
    split_rows = [[v.upper(), U.fmt_ms(summary[v]["decode_s_per_token"]), U.fmt_ms(summary[v]["decoder_layer_s"]),
                   sp(v, "layer_speedup_vs_bf16"), f"{args.layers} × {U.fmt_ms(summary[v]['decoder_layer_s'])} = "
                   f"{U.fmt_ms(args.layers * summary[v]['decoder_layer_s'])}", U.fmt_ms(summary[v]["lm_head_s"]),
                   U.fmt_ms(summary[v]["rest_s"]), U.fmt_ms(summary[v]["projected_28_layer_s_per_token"]),
                   f"{summary[v]['projected_28_layer_tokens_per_s']:.1f}", sp(v, "projected_28_layer_speedup_vs_bf16")]
                  for v in VARIANTS]
    s4 = summary["int4"]["decode_speedup_vs_bf16"]
    target_lines = [f"INT4 decode faster than BF16 ({args.layers}-layer cut): {s4:.2f}× — {'met' if s4 > 1 else 'MISSED'}"]
    load = out["load"]
    md = "\n".join([
        f"Qwen3-VL-2B shapes cut to {args.layers} decoder layers, random weights, bf16 activations; prompt "
        f"{args.prompt_len} tokens (text only), greedy decode of {n} tokens; medians of {load['rounds_kept']} "
        f"interleaved rounds (other processes used {load['others_cores_median_kept']:.2f} cores, median).",
        "",
        U.md_table(["model", "prefill ms", "prefill speedup", "decode tok/s", "ms / token", "decode speedup",
                    f"end-to-end tok/s ({n} tok)", "weights GB"], main_rows),
        "",
        "Where a decode step goes (ms per token): step = the decode time per token above; per decoder layer "
        "and lm_head = medians of forward-hook timings in separate runs "
        f"({load['breakdown_rounds_kept']} of {load['breakdown_rounds']} rounds kept); rest = step − layers − "
        "lm_head (embedding, final norm, rotary, KV-cache updates, generate()'s bookkeeping). The 28-layer "
        "columns are a projection (rest + lm_head + 28 × layer), not a measurement:",
        "",
        U.md_table(["model", "step", "per decoder layer", "layer speedup", "all layers", "lm_head (151 936×2048)",
                    "rest", "projected 28-layer step", "projected tok/s", "projected speedup"], split_rows),
        "",
        "Last-token logits of the prompt vs BF16: " + "; ".join(
            f"{v.upper()} cosine {agreement[v]['cosine']:.4f}, rel. L2 {agreement[v]['rel_l2']:.3f}, "
            f"same argmax: {agreement[v]['argmax_equal']}" for v in ("int8", "int4")) + ".",
        "",
        "#### Targets",
        "\n".join(f"- {t}" for t in target_lines),
    ])
    res = {"name": "decode", "quick": args.quick, "machine": info,
           "setup": {"layers": args.layers, "prompt_len": args.prompt_len, "new_tokens": n, "rounds": rounds,
                     "breakdown_rounds": breakdown_rounds, "seed": args.seed},
           "load": load, "summary": summary, "logits_vs_bf16": agreement, "samples": s,
           "per_call_median_s": {v: {k: statistics.median(c) for k, c in out["per_call"][v].items()}
                                 for v in VARIANTS}, "generated_tokens": out["tokens"], "targets": target_lines,
           "markdown": md}
    print(md)
    if not args.no_write:
        print(f"\nwrote {U.write_results('decode', res, args.out)}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
