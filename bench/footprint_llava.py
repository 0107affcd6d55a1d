"""Weight bytes of LLaVA-1.5-7B (BF16 vs GRACE packed INT4) and of the AutoRound W4A16 Qwen3-VL-2B
layout, built on the meta device.

    python bench/footprint_llava.py [--quick]

Nothing is downloaded or allocated. LLaVA-1.5-7B is `liuhaotian/llava-v1.5-7b`'s config (Vicuna-7B:
32 layers, hidden 4096, FFN 11008, vocab 32000) with `openai/clip-vit-large-patch14-336`'s vision
config, built through the same `grace.llava` code `grace.load` uses; for INT4 the language model's
q/k/v/o/gate/up/down are `Int4Linear`s on the meta device, as the GRACE W4G128 releases quantize
them (vision tower, projector, embed_tokens and lm_head stay 16-bit). Bytes are what the modules
hold (`grace.load.tensor_bytes`).

For the AutoRound W4A16 layout (`Vishva007/Qwen3-VL-2B-Instruct-W4A16-AutoRound-GPTQ`) the bytes are
those of its checkpoint tensors (qweight int32 [K/8, N], qzeros int32 [K/128, N/8], scales fp16
[K/128, N], g_idx int32 [K] per decoder linear, the rest fp16), next to the GRACE AWQ layout of the
same model and the bytes `grace.load` holds for either (both become the same `Int4Linear`s).
Writes bench/results/footprint_llava.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _util as U  # noqa: E402
import torch  # noqa: E402
from accelerate import init_empty_weights  # noqa: E402
from torch import nn  # noqa: E402
from transformers import CLIPVisionConfig, Qwen3VLForConditionalGeneration  # noqa: E402

from grace.llava.config import llava_config  # noqa: E402
from grace.llava.load import build_empty  # noqa: E402
from grace.load import tensor_bytes  # noqa: E402
from grace.quant.int4 import Int4Linear  # noqa: E402
from grace.quant.quantize import replace_module  # noqa: E402
from grace.tiny import qwen3vl_2b_config  # noqa: E402

GROUP = 128
DECODER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# liuhaotian/llava-v1.5-7b config.json (the GRACE LLaVA release keeps these keys) and the CLIP tower's vision config.
LLAVA_7B = {"model_type": "llava_llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "vocab_size": 32000,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "image_aspect_ratio": "pad",
            "mm_hidden_size": 1024, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch", "mm_vision_tower": "openai/clip-vit-large-patch14-336"}
CLIP_L_336 = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                              projection_dim=768)


def decoder_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".language_model.layers." in f".{n}" and n.endswith(DECODER)]


def to_int4(model: nn.Module, names: list[str]) -> None:
    for name in names:
        lin = model.get_submodule(name)
        replace_module(model, name, Int4Linear(lin.in_features, lin.out_features, lin.bias is not None, GROUP,
                                               torch.bfloat16, "meta"))


def llava_7b(kind: str, layers: int):
    model = build_empty(llava_config(dict(LLAVA_7B, num_hidden_layers=layers), CLIP_L_336), torch.bfloat16)
    names = decoder_names(model)
    if kind == "int4":
        to_int4(model, names)
    inner = model.model
    decoder = sum(tensor_bytes(model.get_submodule(n)) for n in names)
    lm = tensor_bytes(inner.language_model)
    return {"whole model": tensor_bytes(model),
            "  decoder linears (q/k/v/o/gate/up/down)": decoder,
            "  embed_tokens + lm_head": tensor_bytes(inner.language_model.embed_tokens) + tensor_bytes(model.lm_head),
            "  norms, rotary tables": lm - decoder - tensor_bytes(inner.language_model.embed_tokens),
            "  vision tower (CLIP ViT-L/14-336)": tensor_bytes(inner.vision_tower),
            "  projector (mlp2x_gelu)": tensor_bytes(inner.multi_modal_projector)}, len(names)


def checkpoint_bytes(model: nn.Module, names: list[str], layout: str) -> int:
    """Bytes of the checkpoint tensors: decoder linears in `layout` (gptq | awq), all else fp16 (lm_head tied)."""
    quantized = tuple(n + "." for n in names)
    total = sum(t.numel() * 2 for k, t in model.state_dict().items() if not k.startswith(quantized)
                and k != "lm_head.weight")
    for name in names:
        lin = model.get_submodule(name)
        k, n = lin.in_features, lin.out_features
        total += k * n // 2 + (k // GROUP) * (n // 8) * 4 + (k // GROUP) * n * 2   # codes, zeros, fp16 scales
        total += 4 * k if layout == "gptq" else 0                                   # g_idx
    return total


def qwen_autoround(layers: int) -> dict:
    config = qwen3vl_2b_config(num_hidden_layers=layers)
    with init_empty_weights(include_buffers=True):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.tie_weights()
    names = decoder_names(model)
    bf16_held = tensor_bytes(model)
    disk = {"bf16": checkpoint_bytes(model, [], "none"), "gptq": checkpoint_bytes(model, names, "gptq"),
            "awq": checkpoint_bytes(model, names, "awq")}
    to_int4(model, names)
    return {"checkpoint bytes: BF16 (plain)": disk["bf16"], "checkpoint bytes: AutoRound W4A16 (GPTQ format)": disk["gptq"],
            "checkpoint bytes: GRACE W4G128-AWQ": disk["awq"], "held by grace.load: BF16": bf16_held,
            "held by grace.load: AutoRound W4A16 / GRACE W4 (Int4Linear)": tensor_bytes(model), "quantized": len(names)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    U.add_common_args(parser)
    args = parser.parse_args(argv)
    U.apply_args(args)
    layers_llava, layers_qwen = (2, 2) if args.quick else (32, 28)
    llava = {}
    for kind in ("bf16", "int4"):
        llava[kind], n_quantized = llava_7b(kind, layers_llava)
    ratio = llava["int4"]["whole model"] / llava["bf16"]["whole model"]
    qwen = qwen_autoround(layers_qwen)

    def gb(v: int) -> str:
        return f"{v / 1e9:.3f}" if v >= 1e7 else f"{v / 1e6:.3f} MB"

    rows = [[p.replace("  ", "↳ "), gb(llava["bf16"][p]), gb(llava["int4"][p]), f"{llava['int4'][p] / llava['bf16'][p]:.3f}×"]
            for p in llava["bf16"]]
    qrows = [[k, gb(v)] for k, v in qwen.items() if k != "quantized"]
    quick = " (--quick: a 2-layer cut, not the real sizes)" if args.quick else ""
    md = "\n".join([
        f"LLaVA-1.5-7B ({layers_llava} decoder layers{quick}), weight bytes in GB (10^9), built on the meta device:",
        "", U.md_table(["part", "BF16 GB", "GRACE W4G128 (packed INT4) GB", "INT4 / BF16"], rows), "",
        f"{n_quantized} decoder linears INT4, group {GROUP}; the model card says BF16 ≈ 14.2 GB, packed INT4 ≈ 4.6 GB.",
        "", f"Qwen3-VL-2B ({layers_qwen} decoder layers{quick}), the AutoRound W4A16 layout beside GRACE's:", "",
        U.md_table(["", "GB"], qrows)])
    res = {"name": "footprint_llava", "quick": args.quick, "machine": U.machine_info(),
           "llava_1_5_7b": {"decoder_layers": layers_llava, "bytes": llava, "int4_over_bf16": ratio},
           "qwen3vl_2b_autoround": {"decoder_layers": layers_qwen, "bytes": qwen}, "markdown": md}
    print(md)
    if not args.no_write:
        print(f"\nwrote {U.write_results('footprint_llava', res, args.out)}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
