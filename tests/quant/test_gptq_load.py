"""grace.load reads AutoRound's GPTQ-format layouts (quant_method gptq, and auto-round's auto_gptq packing)."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import grace
from grace import GraceLoadError
from grace.chat import build_inputs
from grace.quant import Int4Linear
from grace.tiny import TinyConfig, save_checkpoint, tiny_qwen3vl

from checkpoint_helpers import copy_fixture, quantized_linear_bytes
from test_gptq_pack import pack_reference

FIXTURES = {"qwen3vl-tiny-autoround-gptq": "gptq", "qwen3vl-tiny-autoround": "auto-round"}
LM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("name,fmt", FIXTURES.items())
def test_fixture_logits_ids_and_greedy(fixtures_dir, name, fmt):
    folder = fixtures_dir / name
    loaded = grace.load(folder, device="cpu", dtype=torch.float32)
    assert (loaded.kind, loaded.format, loaded.packed) == ("int4", fmt, True)
    names = loaded.quantized_modules
    assert len(names) == 14 and all(n.startswith("model.language_model.layers.") for n in names)
    assert all(isinstance(loaded.model.get_submodule(n), Int4Linear) for n in names)
    expected = load_file(folder / "expected.safetensors")
    meta = json.loads((folder / "expected.json").read_text())
    inputs = build_inputs(loaded.processor, Image.open(folder / meta["image"]), meta["prompt"])
    assert torch.equal(inputs["input_ids"], expected["input_ids"])
    with torch.no_grad():
        logits = loaded.model(**inputs).logits[0]
    assert (logits - expected["logits"]).abs().max().item() < 1e-3
    out = loaded.model.generate(**inputs, max_new_tokens=len(expected["greedy_ids"]), do_sample=False)
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == expected["greedy_ids"].tolist()


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_int4_bytes_at_most_half_of_bf16(fixtures_dir, name):
    loaded = grace.load(fixtures_dir / name, device="cpu", dtype=torch.bfloat16)
    held, plain = quantized_linear_bytes(loaded)
    assert held <= 0.5 * plain, held / plain


# -- checkpoints of other shapes and seeds, written here in the GPTQ layout -----------------------------

def quantize_group(w, group, sym):
    """AutoRound-style RTN of w [out, in] -> (q [in, out] in 0..15, real zeros [G, out], scales fp16 [G, out])."""
    out_f, in_f = w.shape
    wg = w.t().reshape(in_f // group, group, out_f)
    if sym:   # signed scale: the group's largest-magnitude weight gets code -8
        peak = wg.gather(1, wg.abs().argmax(1, keepdim=True)).squeeze(1)
        scales = (-peak / 8).half()
        scales = torch.where(scales == 0, torch.full_like(scales, 1e-4), scales)
        zeros = torch.full_like(scales.float(), 8)
    else:
        lo, hi = wg.amin(1), wg.amax(1)
        scales = ((hi - lo) / 15).clamp_min(1e-5).half()
        zeros = torch.round(-lo / scales.float()).clamp(1, 15)     # >= 1: GPTQ v1 cannot store zero 0
    q = torch.round(wg / scales.float().unsqueeze(1) + zeros.unsqueeze(1)).clamp(0, 15)
    return q.reshape(in_f, out_f), zeros, scales


VARIANTS = {   # name: (TinyConfig, seed, group, sym, quantization_config extras, g_idx stored)
    "gptq-sym-g128-wide": (TinyConfig(hidden=256, layers=3, intermediate=384, heads=4, kv_heads=2, head_dim=64,
                                      vision_hidden=64, vision_intermediate=128, tie_word_embeddings=True),
                           3, 128, True, {"quant_method": "gptq", "provider": "auto-round", "desc_act": False}, True),
    "gptq-asym-g64": (TinyConfig(), 11, 64, False, {"quant_method": "gptq", "desc_act": False}, True),
    "gptq-v2-asym-g32": (TinyConfig(hidden=64, heads=2, kv_heads=1), 4, 32, False,
                         {"quant_method": "gptq", "checkpoint_format": "gptq_v2"}, True),
    "autoround-native-asym": (TinyConfig(), 8, 128, False,
                              {"quant_method": "auto-round", "packing_format": "auto_round:auto_gptq",
                               "block_name_to_quantize": "model.language_model.layers"}, False),
}


def write_gptq(folder, model, processor, group, sym, quant, with_g_idx, seed):
    save_checkpoint(model, processor, folder)
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.startswith("model.language_model.") and n.endswith(LM_LINEARS)]
    v2 = quant.get("checkpoint_format") == "gptq_v2"
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    decoded = {}
    for name in names:
        w = tensors.pop(name + ".weight").float()
        q, zeros, scales = quantize_group(w, group, sym)
        tensors[name + ".qweight"] = pack_reference(q, 0)
        tensors[name + ".qzeros"] = pack_reference(zeros.long() - (0 if v2 else 1), 1)
        tensors[name + ".scales"] = scales
        if with_g_idx:
            tensors[name + ".g_idx"] = (torch.arange(w.shape[1]) // group).int()
        rows = torch.arange(w.shape[1]) // group
        decoded[name] = ((q - zeros[rows]) * scales.float()[rows]).t()
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"bits": 4, "group_size": group, "sym": sym, "data_type": "int", **quant}
    (folder / "config.json").write_text(json.dumps(config))
    return decoded


@pytest.mark.parametrize("variant", VARIANTS)
def test_generated_gptq_checkpoint_matches_independent_decode(tmp_path, variant):
    cfg, seed, group, sym, quant, with_g_idx = VARIANTS[variant]
    model, processor = tiny_qwen3vl(seed, cfg)
    decoded = write_gptq(tmp_path / "ckpt", model, processor, group, sym, quant, with_g_idx, seed)
    loaded = grace.load(tmp_path / "ckpt", device="cpu", dtype=torch.float32)
    assert loaded.kind == "int4" and sorted(loaded.quantized_modules) == sorted(decoded)
    with torch.no_grad():   # the reference: fp16-rounded plain tensors, quantized linears decoded here
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                value.copy_(value.half().float())
        for name, weight in decoded.items():
            model.get_submodule(name).weight.copy_(weight)
    pixels = torch.randint(0, 256, (64, 80, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    inputs = build_inputs(processor, Image.fromarray(pixels.numpy()), "Describe the image.")
    with torch.no_grad():
        diff = (loaded.model(**inputs).logits - model(**inputs).logits).abs().max().item()
    assert diff < 1e-3


# -- checkpoints that must be refused clearly ------------------------------------------------------------



def edit_config(folder, **quant):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(quant)
    (folder / "config.json").write_text(json.dumps(config))


def test_desc_act_with_shuffled_g_idx_is_refused(fixtures_dir, tmp_path):
    folder = copy_fixture(fixtures_dir, "qwen3vl-tiny-autoround-gptq", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for key in [k for k in tensors if k.endswith(".g_idx")]:
        tensors[key] = tensors[key][torch.randperm(tensors[key].numel(), generator=g)].contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    edit_config(folder, desc_act=True)
    with pytest.raises(GraceLoadError, match="desc_act") as err:
        grace.load(folder, device="cpu")
    assert "Error" not in str(err.value)


def test_desc_act_without_g_idx_is_refused(fixtures_dir, tmp_path):
    folder = copy_fixture(fixtures_dir, "qwen3vl-tiny-autoround", tmp_path)
    edit_config(folder, desc_act=True)
    with pytest.raises(GraceLoadError, match="g_idx"):
        grace.load(folder, device="cpu")


@pytest.mark.parametrize("name,edit,match", [
    ("qwen3vl-tiny-autoround-gptq", {"bits": 8}, "8-bit"),
    ("qwen3vl-tiny-autoround-gptq", {"bits": 3}, "3-bit"),
    ("qwen3vl-tiny-autoround", {"packing_format": "auto_round"}, "packing 'auto_round'"),
    ("qwen3vl-tiny-autoround", {"packing_format": "auto_round:auto_awq"}, "auto_awq"),
    ("qwen3vl-tiny-autoround", {"block_name_to_quantize": "model.visual.blocks"}, "block_name_to_quantize"),
    ("qwen3vl-tiny-autoround-gptq", {"checkpoint_format": "marlin"}, "marlin"),
    ("qwen3vl-tiny-autoround-gptq", {"group_size": 64}, "do not fit"),
])
def test_unsupported_variants_are_refused(fixtures_dir, tmp_path, name, edit, match):
    folder = copy_fixture(fixtures_dir, name, tmp_path)
    edit_config(folder, **edit)
    with pytest.raises(GraceLoadError, match=match):
        grace.load(folder, device="cpu")


def test_qweight_on_a_module_that_is_not_a_linear_is_refused(fixtures_dir, tmp_path):
    folder = copy_fixture(fixtures_dir, "qwen3vl-tiny-autoround-gptq", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    for s in ("qweight", "qzeros", "scales", "g_idx"):
        tensors[f"model.language_model.layers.0.mlp.nonexistent.{s}"] = tensors[f"model.language_model.layers.0.mlp.up_proj.{s}"].clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(GraceLoadError, match="nonexistent"):
        grace.load(folder, device="cpu")


def test_awq_tensors_under_a_gptq_config_are_refused(fixtures_dir, tmp_path):
    folder = copy_fixture(fixtures_dir, "qwen3vl-tiny-hf-awq", tmp_path)
    edit_config(folder, quant_method="gptq")
    with pytest.raises(GraceLoadError, match="not in the gptq .GPTQ. packing"):
        grace.load(folder, device="cpu")


@pytest.mark.parametrize("name,fmt", FIXTURES.items())
def test_inspect_counts_the_packed_linears(fixtures_dir, name, fmt):
    info = grace.inspect(fixtures_dir / name)
    assert (info.format, info.kind, info.bits, info.group_size, info.quantized_modules) == (fmt, "int4", 4, 128, 14)


def test_desc_act_with_contiguous_g_idx_is_read(fixtures_dir, tmp_path):
    """desc_act alone is no reason to refuse: a g_idx of contiguous groups is still the plain layout."""
    folder = copy_fixture(fixtures_dir, "qwen3vl-tiny-autoround-gptq", tmp_path)
    edit_config(folder, desc_act=True)
    loaded = grace.load(folder, device="cpu", dtype=torch.float32)
    expected = load_file(folder / "expected.safetensors")
    meta = json.loads((folder / "expected.json").read_text())
    inputs = build_inputs(loaded.processor, Image.open(folder / meta["image"]), meta["prompt"])
    with torch.no_grad():
        assert (loaded.model(**inputs).logits[0] - expected["logits"]).abs().max().item() < 1e-3
