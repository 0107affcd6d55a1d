"""How often a quantized lm_head (grace.load(..., head="int8" | "int4")) picks the bf16 head's token.

    python bench/head_agreement.py [--fixtures DIR] [--zoo DIR] [--new-tokens 16]

For every loadable checkpoint among the shared fixtures (random tiny models in each release layout)
and the zoo (small models trained by this project, assets/zoo), the model is loaded three times
(bf16 head, int8 head, int4 head; everything else identical) and fed the same chat prompt with an
image ("Describe this image." and two more questions). Reported per checkpoint and head:
  * top-1 agreement: share of prompt positions (teacher-forced) whose argmax token equals the bf16 head's;
  * greedy agreement: tokens of a greedy continuation of --new-tokens equal to the bf16 head's, and
    how many leading tokens match;
  * bytes: weight bytes held with that head (a tied embedding stays in bf16: see grace/quant/head.py).
Writes bench/results/head_agreement.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _util as U  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import grace  # noqa: E402
from grace.chat import build_inputs  # noqa: E402

QUESTIONS = ("Describe this image.", "What shape is in the picture?", "What colour is the largest shape?")
HEADS = ("int8", "int4")


def checkpoints(fixtures: Path, zoo: Path) -> list[tuple[str, Path]]:
    out = [(f"fixture/{p.name}", p) for p in sorted(fixtures.glob("qwen3vl-tiny-*")) if (p / "config.json").is_file()]
    out += [(f"zoo/{p.name}", p) for p in sorted(zoo.iterdir()) if (p / "config.json").is_file()]
    return out


@torch.inference_mode()
def measure(path: Path, image: Image.Image, n: int) -> dict:
    loaded = {h: grace.load(path, device="cpu", head=None if h == "bf16" else h) for h in ("bf16",) + HEADS}
    res = {h: {"positions": 0, "top1_equal": 0, "greedy_equal": 0, "greedy_prefix": 0, "greedy_total": 0,
               "weight_bytes": loaded[h].weight_bytes} for h in HEADS}
    res["bf16_weight_bytes"] = loaded["bf16"].weight_bytes
    for question in QUESTIONS:
        inputs = build_inputs(loaded["bf16"].processor, image, question)
        ref_logits = loaded["bf16"].model(**inputs).logits[0]
        ref_tokens = loaded["bf16"].model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, -n:]
        for h in HEADS:
            logits = loaded[h].model(**inputs).logits[0]
            r = res[h]
            r["positions"] += logits.shape[0]
            r["top1_equal"] += int((logits.argmax(-1) == ref_logits.argmax(-1)).sum())
            tokens = loaded[h].model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, -n:]
            same = (tokens == ref_tokens).tolist()
            r["greedy_equal"] += sum(same)
            r["greedy_prefix"] += next((i for i, s in enumerate(same) if not s), n)
            r["greedy_total"] += n
    return res


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    U.add_common_args(parser)
    parser.add_argument("--fixtures", type=Path, default=U.ROOT.parent / "shared" / "fixtures")
    parser.add_argument("--zoo", type=Path, default=U.ROOT / "assets" / "zoo")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    U.apply_args(args)
    image = Image.open(args.fixtures / "qwen3vl-tiny-bf16" / "image.png").convert("RGB")
    results, rows = {}, []
    for name, path in checkpoints(args.fixtures, args.zoo):
        try:
            results[name] = r = measure(path, image, args.new_tokens)
        except Exception as err:  # noqa: BLE001 - a layout grace.load does not read is listed, not fatal
            print(f"  {name}: skipped ({err})", file=sys.stderr)
            results[name] = {"skipped": str(err)}
            continue
        for h in HEADS:
            x = r[h]
            rows.append([name, h, f"{x['top1_equal'] / x['positions'] * 100:.1f}% ({x['top1_equal']}/{x['positions']})",
                         f"{x['greedy_equal']}/{x['greedy_total']}", f"{x['greedy_prefix']}/{x['greedy_total']}",
                         f"{(x['weight_bytes'] - r['bf16_weight_bytes']) / 1e3:+,.0f} kB"])
        print(f"  {name}: done", file=sys.stderr, flush=True)
    md = ("Quantized lm_head vs the bf16 head, same model otherwise; prompts: the chat template with the fixture "
          f"image and {len(QUESTIONS)} questions; greedy continuation of {args.new_tokens} tokens per question.\n\n"
          + U.md_table(["checkpoint", "head", "top-1 agreement (prompt positions)", "greedy tokens equal",
                        "greedy leading tokens equal", "bytes vs bf16 head"], rows))
    print(md)
    res = {"name": "head_agreement", "machine": U.machine_info(), "results": results, "markdown": md}
    if not args.no_write:
        print(f"\nwrote {U.write_results('head_agreement', res, args.out)}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
