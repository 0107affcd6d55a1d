"""Full-depth decode of the Qwen3-VL-2B text model on CPU: every BF16 path vs INT8 / INT4, with and
without a quantized lm_head, prefill and decode, each beside its weight-bytes roofline.

    python bench/decode.py [--quick] [--prompt-len 256] [--new-tokens 32] [--rounds 5] [--threads N]

One model: `qwen3vl_2b_config()` (all 28 decoder layers, the 151 936-token tied embedding / lm_head,
the vision tower unused) with random bf16 weights. The variants are the same model with modules
swapped in place between runs, so only one model's tensors are held (the quantized linears come from
grace.quantize_(model, _util.bench_config(bits)) and grace.quant.head.quantize_head_ on those weights):

  bf16 torch        every linear a plain nn.Linear (F.linear: oneDNN), transformers' sdpa attention and
                    DynamicCache: the model as transformers runs it
  bf16 oneDNN off   the same, with torch's process-wide oneDNN flag off for the single-token steps
                    (what the issue measured; not usable in a threaded server)
  bf16 grace linears  FastBF16Linear everywhere; attention, RMSNorm and cache still transformers' own
  bf16 grace        FastBF16Linear, grace's decode attention, RMSNorm and GrowingCache (grace/cpu_decode.py):
                    what grace.load and grace.chat do on CPU
  int8 / int4       the 196 decoder linears Int8Linear / Int4Linear, the rest as bf16 grace
  … + int8/int4 head  lm_head quantized too (grace.load(head=...); the bf16 embedding stays)

`model.generate` with a prompt of --prompt-len random token ids (text only) and greedy decoding of
--new-tokens; a logits processor stamps each step, so one call gives prefill (start → first logits)
and decode per token (first → last logits). Variants interleave within every round; medians.
Roofline: bytes of weights a decode step must read (decoder linears + lm_head as held, the rest of
the language model is < 1 MB per token) / the measured read bandwidth (bench/read_bandwidth.py). Writes bench/results/decode.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _util as U  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList, Qwen3VLForConditionalGeneration  # noqa: E402

import grace  # noqa: E402
from grace import cpu_decode  # noqa: E402
from grace.load import tensor_bytes  # noqa: E402
from grace.quant.bf16 import FastBF16Linear  # noqa: E402
from grace.quant.head import quantize_head_  # noqa: E402
from grace.quant.quantize import replace_module  # noqa: E402
from grace.tiny import qwen3vl_2b_config  # noqa: E402
from read_bandwidth import read_bandwidth  # noqa: E402

PAD = 151_643
VARIANTS = ("bf16_torch", "bf16_no_onednn", "bf16_grace_linears", "bf16_grace", "int8", "int8_head8", "int4", "int4_head8", "int4_head4")
LABEL = {"bf16_torch": "BF16, torch F.linear (oneDNN)", "bf16_no_onednn": "BF16, oneDNN off for 1-row steps (process flag)",
         "bf16_grace_linears": "BF16, grace linears, the rest transformers'",
         "bf16_grace": "BF16, grace (linears, attention, RMSNorm, cache)", "int8": "INT8", "int8_head8": "INT8 + int8 lm_head",
         "int4": "INT4", "int4_head8": "INT4 + int8 lm_head", "int4_head4": "INT4 + int4 lm_head"}
BF16 = VARIANTS[:4]
TORCH_ATTENTION = VARIANTS[:3]       # transformers' sdpa attention, RMSNorm and DynamicCache


class Stamp(LogitsProcessor):
    """Records when each step's logits are ready; optionally switches oneDNN off after the prefill."""

    def __init__(self, onednn_off_after_prefill: bool = False):
        self.times: list[float] = []
        self.flip = onednn_off_after_prefill

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        if self.flip and len(self.times) == 1:
            torch.backends.mkldnn.enabled = False
        return scores


class Variants:
    """One model; `use(name)` swaps the decoder linears / lm_head / linear classes in place."""

    def __init__(self, seed: int, layers: int):
        torch.manual_seed(seed)
        self.model = Qwen3VLForConditionalGeneration._from_config(qwen3vl_2b_config(num_hidden_layers=layers),
                                                                  dtype=torch.bfloat16).eval()
        model = self.model
        self.bf16_head = model.lm_head
        assert self.bf16_head.weight is model.get_input_embeddings().weight
        plain = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
        self.linears = {}
        for bits in (8, 4):
            names = grace.quantize_(model, U.bench_config(bits))
            self.linears[bits] = {n: model.get_submodule(n) for n in names}
            for n in names:
                replace_module(model, n, plain[n])
        self.decoder_names = list(self.linears[8])
        self.bf16_linears = {n: plain[n] for n in self.decoder_names}
        self.heads = {}
        for kind in ("int8", "int4"):
            quantize_head_(model, kind)
            self.heads[kind] = model.lm_head
            replace_module(model, "lm_head", self.bf16_head)
        model.config.tie_word_embeddings = model.config.text_config.tie_word_embeddings = True
        gc = model.generation_config
        # no end token, so every run decodes exactly n tokens (min_new_tokens would too, but its two logits
        # processors scan the whole vocabulary at every step: ~1.5 ms of a ~40 ms INT4 step, which no user pays)
        gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = PAD, None, None
        gc.do_sample, gc.temperature, gc.top_p, gc.top_k = False, None, None, None

    def use(self, name: str) -> None:
        bits = 8 if name.startswith("int8") else 4 if name.startswith("int4") else None
        for n in self.decoder_names:
            replace_module(self.model, n, self.linears[bits][n] if bits else self.bf16_linears[n])
        head = {"head8": "int8", "head4": "int4"}.get(name.rsplit("_", 1)[-1])
        replace_module(self.model, "lm_head", self.heads[head] if head else self.bf16_head)
        cls = nn.Linear if name in ("bf16_torch", "bf16_no_onednn") else FastBF16Linear
        for m in self.model.modules():
            if type(m) in (nn.Linear, FastBF16Linear):
                m.__class__ = cls
        torch_rest = name in TORCH_ATTENTION
        plain_of = {fast: plain for plain, fast in cpu_decode.FAST_CLASSES.items()}
        for m in self.model.modules():
            plain = plain_of.get(type(m), type(m))
            if plain in cpu_decode.FAST_CLASSES:
                m.__class__ = plain if torch_rest else cpu_decode.FAST_CLASSES[plain]
        self.model.config.text_config._attn_implementation = "sdpa" if torch_rest else cpu_decode.ATTENTION
        self.grace_cache = not torch_rest

    def step_bytes(self) -> int:
        """Weight bytes one decode step reads: decoder linears and lm_head as currently held."""
        return sum(tensor_bytes(self.model.get_submodule(n)) for n in self.decoder_names) + tensor_bytes(self.model.lm_head)


def generate(v: Variants, name: str, ids, n: int) -> dict:
    v.use(name)
    stamp = Stamp(onednn_off_after_prefill=name == "bf16_no_onednn")
    cache = cpu_decode.cache_kwargs(v.model) if v.grace_cache else {}
    start = time.perf_counter()
    try:
        out = v.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                               do_sample=False, logits_processor=LogitsProcessorList([stamp]), **cache)
    finally:
        torch.backends.mkldnn.enabled = True
    assert out.shape[1] == ids.shape[1] + n and len(stamp.times) == n
    return {"prefill_s": stamp.times[0] - start, "decode_s_per_token": (stamp.times[-1] - stamp.times[0]) / (n - 1),
            "tokens": out[0, ids.shape[1]:].tolist()}


@torch.inference_mode()
def run(v: Variants, ids, n: int, rounds: int, variants) -> dict:
    for name in variants:
        generate(v, name, ids[:, :8], 3)                    # warm up (allocator, kernels, first-call costs)
    samples = {name: {"prefill_s": [], "decode_s_per_token": []} for name in variants}
    tokens, others = {}, []
    for r in range(rounds):
        U.MONITOR.wait_quiet(U.MAX_WAIT_S)
        mark = U.MONITOR.start()
        shift = r % len(variants)
        for name in variants[shift:] + variants[:shift]:
            res = generate(v, name, ids, n)
            for key in samples[name]:
                samples[name][key].append(res[key])
            tokens[name] = res["tokens"]
        others.append(U.MONITOR.others(mark))
        print(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{name} {samples[name]['prefill_s'][-1]:.2f} s / {1 / samples[name]['decode_s_per_token'][-1]:.1f} tok/s"
            for name in variants) + f"  [others used {others[-1]:.2f} cores]", file=sys.stderr, flush=True)
    quiet = [i for i, o in enumerate(others) if o < U.QUIET_CORES]
    keep = quiet if len(quiet) >= max(3, rounds // 3) else list(range(rounds))
    samples = {name: {k: [s[i] for i in keep] for k, s in d.items()} for name, d in samples.items()}
    load = {"rounds": rounds, "rounds_kept": len(keep), "quiet_rounds": len(quiet),
            "others_cores_median_kept": statistics.median(others[i] for i in keep), "others_cores_all": others}
    return {"samples": samples, "tokens": tokens, "load": load}


@torch.inference_mode()
def agreement(v: Variants, ids, variants) -> dict:
    v.use("bf16_grace")
    ref = v.model(input_ids=ids).logits[0, -1].double()
    out = {}
    for name in variants:
        v.use(name)
        y = v.model(input_ids=ids).logits[0, -1].double()
        out[name] = {"cosine": torch.nn.functional.cosine_similarity(y, ref, dim=0).item(),
                     "argmax_equal": bool(y.argmax() == ref.argmax())}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    U.add_common_args(parser)
    parser.add_argument("--layers", type=int, default=28, help="decoder layers (28: the real 2B; fewer only to smoke-test)")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=None, help="default 32 (--quick: 6)")
    parser.add_argument("--rounds", type=int, default=None, help="default 5 (--quick: 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    U.apply_args(args)
    info = U.machine_info()
    n = args.new_tokens or (6 if args.quick else 32)
    rounds = args.rounds or (1 if args.quick else 5)
    layers = 2 if args.quick and args.layers == 28 else args.layers
    print(f"machine: {U.machine_line(info)}", file=sys.stderr)
    bw_before = read_bandwidth()
    t = time.perf_counter()
    v = Variants(args.seed, layers)
    print(f"built the model and its quantized modules in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    ids = torch.randint(0, PAD, (1, args.prompt_len), generator=torch.Generator().manual_seed(args.seed))
    variants = list(VARIANTS)
    agree = agreement(v, ids, variants)
    out = run(v, ids, n, rounds, variants)
    bw = max(bw_before, read_bandwidth())
    s = out["samples"]
    summary = {}
    for name in variants:
        v.use(name)
        step = statistics.median(s[name]["decode_s_per_token"])
        nbytes = v.step_bytes()
        summary[name] = {"prefill_s": statistics.median(s[name]["prefill_s"]), "decode_s_per_token": step,
                         "decode_tokens_per_s": 1 / step, "step_weight_bytes": nbytes,
                         "roofline_tokens_per_s": bw * 1e9 / nbytes, "model_weight_bytes": tensor_bytes(v.model)}
    best = min(BF16, key=lambda name: summary[name]["decode_s_per_token"])
    best_prefill = min(BF16, key=lambda name: summary[name]["prefill_s"])
    for name in variants:
        summary[name]["decode_speedup_vs_best_bf16"] = U.paired_ratio(s[best]["decode_s_per_token"], s[name]["decode_s_per_token"])
        summary[name]["prefill_speedup_vs_best_bf16"] = U.paired_ratio(s[best_prefill]["prefill_s"], s[name]["prefill_s"])
        summary[name]["roofline_speedup_vs_bf16"] = summary["bf16_grace"]["step_weight_bytes"] / summary[name]["step_weight_bytes"]
    rows = []
    for name in variants:
        r = summary[name]
        rows.append([LABEL[name] + ("*" if name == best else ""), f"{r['prefill_s']:.2f}",
                     f"{r['prefill_speedup_vs_best_bf16']:.2f}×", f"{r['decode_tokens_per_s']:.2f}",
                     f"{r['decode_speedup_vs_best_bf16']:.2f}×", f"{r['step_weight_bytes'] / 1e9:.3f}",
                     f"{r['roofline_tokens_per_s']:.1f}", f"{r['decode_tokens_per_s'] / r['roofline_tokens_per_s'] * 100:.0f}%",
                     f"{r['roofline_speedup_vs_bf16']:.2f}×", f"{agree[name]['cosine']:.4f}"])
    load = out["load"]
    targets = []
    for name, goal in (("int4", 2.0), ("int4_head4", 2.5), ("int8", 1.3)):
        got = summary[name]["decode_speedup_vs_best_bf16"]
        targets.append(f"{LABEL[name]} decode ≥ {goal}× the best BF16: {got:.3f}× — {'met' if got >= goal else 'MISSED'}")
    for name in ("int8", "int4"):
        got = summary[name]["prefill_speedup_vs_best_bf16"]
        targets.append(f"{LABEL[name]} prefill of {args.prompt_len} rows ≥ 0.9× the best BF16: {got:.3f}× — "
                       f"{'met' if got >= 0.9 else 'MISSED'}")
    md = "\n".join([
        f"Qwen3-VL-2B text model, {layers} decoder layers, random weights; prompt {args.prompt_len} tokens, greedy "
        f"decode of {n}; medians of {load['rounds_kept']}/{load['rounds']} interleaved rounds (other processes used "
        f"{load['others_cores_median_kept']:.2f} cores, median); read bandwidth {bw:.1f} GB/s. * = the fastest BF16 "
        "decode, the reference of every speedup (prefill: the fastest BF16 prefill).",
        "",
        U.md_table(["model", "prefill s", "prefill vs best BF16", "decode tok/s", "decode vs best BF16",
                    "weights read / token GB", "roofline tok/s", "% of roofline", "roofline vs BF16",
                    "last-token logits cosine vs BF16"], rows),
        "",
        "\n".join(f"- {t}" for t in targets),
    ])
    res = {"name": "decode", "quick": args.quick, "machine": info, "bandwidth_gbs": bw,
           "setup": {"layers": layers, "prompt_len": args.prompt_len, "new_tokens": n, "rounds": rounds, "seed": args.seed},
           "load": load, "summary": summary, "best_bf16": best, "agreement_vs_bf16": agree, "samples": s,
           "generated_tokens": out["tokens"], "targets": targets, "markdown": md}
    print(md)
    if not args.no_write:
        print(f"\nwrote {U.write_results('decode', res, args.out)}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
