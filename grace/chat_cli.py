"""`python -m grace chat`: ask one or more models about an image, answers streamed to the terminal."""

from __future__ import annotations

import argparse
import sys

from PIL import Image

from .chat import GenerationSettings, InvalidRequest, stream, token_agreement
from .errors import GraceLoadError
from .load import load


def read_image(path: str) -> Image.Image:
    """The image at `path`, decoded, or InvalidRequest with a plain reason (no exception names)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise InvalidRequest(f"there is no file {path}") from None
    except IsADirectoryError:
        raise InvalidRequest(f"{path} is a folder, not an image file") from None
    except Image.DecompressionBombError:
        raise InvalidRequest(f"{path} has too many pixels to be decoded safely") from None
    except (OSError, SyntaxError, ValueError):   # PIL's ways of saying "not an image" or "damaged"
        raise InvalidRequest(f"{path} is not an image PIL can read, or it is damaged") from None


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
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler (with --sample)")
    parser.add_argument("question")
    args = parser.parse_args(argv)

    try:
        if not args.question.strip():
            raise InvalidRequest("the question is empty")
        image = read_image(args.image) if args.image else None
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                      temperature=args.temperature, top_p=args.top_p, seed=args.seed).checked()
    except InvalidRequest as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    reference = None
    for source in args.model:
        print(f"loading {source} ...", file=sys.stderr, flush=True)
        try:
            loaded = load(source, device=args.device, vision_tower=args.vision_tower)
        except GraceLoadError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"[{loaded.kind}, {loaded.format}, {loaded.weight_bytes / 1e6:.1f} MB] ", end="", flush=True)
        shown = ""
        try:
            for generation in stream(loaded, image, args.question, settings):
                print(generation.text[len(shown):], end="", flush=True)
                shown = generation.text
        except InvalidRequest as err:
            print(f"\nerror: {err}", file=sys.stderr)
            return 2
        speed = "too few tokens to measure" if generation.tokens_per_s is None else f"{generation.tokens_per_s:.1f} tok/s"
        print(f"\n  {generation.answer_tokens} tokens, first token {generation.ttft_s or 0:.2f}s, {speed}, "
              f"total {generation.total_s:.2f}s")
        if reference is None:
            reference = generation.token_ids
        else:
            first, share = token_agreement(reference, generation.token_ids)
            where = "identical" if first is None else f"first differs at token {first + 1}"
            print(f"  agreement with {args.model[0]}: {share:.0%} of tokens, {where}")
    return 0
