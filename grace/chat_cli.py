"""`python -m grace chat`: ask one or more models about an image, answers streamed to the terminal."""

from __future__ import annotations

import argparse
import sys

from PIL import Image

from .chat import GenerationSettings, stream, token_agreement
from .load import load


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m grace chat", description=__doc__)
    parser.add_argument("--model", action="append", required=True,
                        help="checkpoint folder or Hub repo id (repeat to compare; the first is the reference)")
    parser.add_argument("--image", help="image file (omit for a text-only question)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--vision-tower", default=None,
                        help="LLaVA only: folder of the CLIP tower its config names (offline machines, mirrors)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("question")
    args = parser.parse_args(argv)

    image = None
    if args.image:
        try:
            image = Image.open(args.image)
            image.load()
        except (OSError, Image.DecompressionBombError) as err:
            print(f"error: cannot read image {args.image}: {err}", file=sys.stderr)
            return 1
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                  temperature=args.temperature, top_p=args.top_p)
    reference = None
    for source in args.model:
        print(f"loading {source} ...", file=sys.stderr, flush=True)
        loaded = load(source, device=args.device, vision_tower=args.vision_tower)
        print(f"[{loaded.kind}, {loaded.format}, {loaded.weight_bytes / 2**20:.1f} MiB] ", end="", flush=True)
        shown = ""
        for generation in stream(loaded, image, args.question, settings):
            print(generation.text[len(shown):], end="", flush=True)
            shown = generation.text
        speed = generation.tokens_per_s
        print(f"\n  first token {generation.ttft_s or 0:.2f}s, {speed or 0:.1f} tok/s, total {generation.total_s:.2f}s")
        if reference is None:
            reference = generation.token_ids
        else:
            first, share = token_agreement(reference, generation.token_ids)
            where = "identical" if first is None else f"first differs at token {first}"
            print(f"  agreement with {args.model[0]}: {share:.0%} of tokens, {where}")
    return 0
