"""The Compare tab's own numbers on a 2B-shaped model: the BF16 column's tokens/s with grace's CPU kernels
(what the app runs) and without them (GRACE_CPU_KERNELS=0: torch's F.linear, i.e. oneDNN), side by side.

    python bench/compare_speed.py [--quick] [--new-tokens 32] [--rounds 3] [--threads N]

The model is Qwen3-VL-2B's full shape (28 decoder layers, the 151 936-token tied head, the 24-layer vision
tower) with random bf16 weights, saved once to a temporary folder with the tiny fixture's processor (its
tokenizer knows 342 tokens; ids it does not know decode to nothing, so answers are empty text, but every
generated token is counted as the app counts it). Each round starts one app-side comparison per setting, in
a fresh process (the kernel switch is read once per process), alternating the order: `demo.compare_run
.CompareRun` with one BF16 column, exactly as the Compare tab runs it, and reports that column's tokens/s,
time to first token and load time. Writes bench/results/compare_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import _util as U  # noqa: E402

FIXTURE = ROOT.parent / "shared" / "fixtures" / "qwen3vl-tiny-bf16"
PROCESSOR_FILES = ("chat_template.jinja", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                   "generation_config.json")
SETTINGS = {"grace kernels (the app)": "1", "torch F.linear (GRACE_CPU_KERNELS=0)": "0"}


def build_model(folder: Path, layers: int) -> None:
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from grace.tiny import qwen3vl_2b_config

    config = qwen3vl_2b_config(num_hidden_layers=layers)
    fixture = json.loads((FIXTURE / "config.json").read_text())
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        setattr(config, key, fixture[key])           # the fixture tokenizer's ids
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    model.save_pretrained(folder)
    for name in PROCESSOR_FILES:
        if (FIXTURE / name).is_file():
            shutil.copy(FIXTURE / name, folder / name)


def one_comparison(folder: str, new_tokens: int, threads: int | None) -> dict:
    """Run in a child process: one CompareRun with a BF16 column, as the app does; the column's numbers."""
    import torch
    from PIL import Image

    from demo.compare_run import CompareRun
    from demo.families import Family, Variant
    from demo.model_cache import ModelCache
    from grace.chat import GenerationSettings

    if threads:
        torch.set_num_threads(threads)
    family = Family("bench", [Variant("BF16", folder, "bf16")])
    image = Image.open(FIXTURE / "image.png").convert("RGB")
    run = CompareRun(ModelCache(64 << 30), family, ["BF16"], image, "Describe the image.",
                     GenerationSettings(max_new_tokens=new_tokens)).start()
    for _ in run.updates():
        pass
    column = run.result()["columns"][0]
    return {k: column[k] for k in ("status", "error", "tokens_per_s", "ttft_s", "total_s", "load_s",
                                   "generated_tokens", "tokens")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    U.add_common_args(parser)
    parser.add_argument("--new-tokens", type=int, default=None, help="default 32 (--quick: 8)")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (--quick: 1)")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    new_tokens = args.new_tokens or (8 if args.quick else 32)
    if args.child:
        print(json.dumps(one_comparison(args.child, new_tokens, args.threads)))
        return 0
    rounds = args.rounds or (1 if args.quick else 3)
    layers = 2 if args.quick else args.layers
    samples: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="grace-compare-speed-") as tmp:
        folder = Path(tmp) / "qwen3vl-2b-random"
        build_model(folder, layers)
        for r in range(rounds):
            order = list(SETTINGS) if r % 2 == 0 else list(reversed(SETTINGS))
            for name in order:
                U.MONITOR.wait_quiet(args.max_wait)
                env = {**os.environ, "GRACE_CPU_KERNELS": SETTINGS[name], "PYTHONPATH": str(ROOT)}
                command = [sys.executable, __file__, "--child", str(folder), "--new-tokens", str(new_tokens)]
                if args.threads:
                    command += ["--threads", str(args.threads)]
                out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
                samples[name].append(json.loads(out.strip().splitlines()[-1]))
    rows, summary = [], {}
    for name, runs in samples.items():
        ok = [s for s in runs if s["status"] == "done" and s["tokens_per_s"]]
        tps = statistics.median(s["tokens_per_s"] for s in ok) if ok else None
        summary[name] = {"tokens_per_s": tps, "ttft_s": statistics.median(s["ttft_s"] for s in ok) if ok else None,
                         "runs": runs}
        rows.append([name, f"{tps:.2f}" if tps else "–", f"{summary[name]['ttft_s']:.2f} s" if ok else "–",
                     f"{len(ok)}/{len(runs)}"])
    fast, slow = (summary[n]["tokens_per_s"] for n in SETTINGS)
    info = U.machine_info()
    print(U.machine_line(info))
    print(f"\nCompare tab, one BF16 column, Qwen3-VL-2B shapes ({layers} layers, random weights), "
          f"{new_tokens} new tokens, median of {rounds} rounds:\n")
    print(U.md_table(["BF16 column", "tokens/s", "first token", "rounds ok"], rows))
    if fast and slow:
        print(f"\ngrace kernels vs torch: {fast / slow:.2f}x tokens/s")
    if not args.no_write:
        path = U.write_results("compare_speed", {"layers": layers, "new_tokens": new_tokens, "rounds": rounds,
                                                 "settings": summary, "speedup": fast / slow if fast and slow else None,
                                                 "machine": info}, args.out)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
