"""export_awq(..., layout="hf"): the standard transformers AWQ layout (vLLM / SGLang), read back two ways."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AwqConfig

import grace
from grace.chat import build_inputs
from grace.export_hf_awq import save_hf_awq
from grace.quant import Int4WeightOnlyConfig, awq_pack, quantize_


def check_awq_config(folder, not_converted):
    config = json.loads((folder / "config.json").read_text())
    assert "awq_packing" not in config and "qat" not in config and not (folder / "awq_quantized_modules.json").exists()
    parsed = AwqConfig.from_dict(config["quantization_config"])     # transformers' own reading of it
    assert (parsed.bits, parsed.group_size, parsed.zero_point, str(parsed.format)) == (4, 128, True, "gemm")
    assert parsed.modules_to_not_convert == not_converted
    assert config["architectures"]
    return config


def test_qwen_qat_release_to_hf_awq(fixtures_dir, tmp_path):
    source = fixtures_dir / "qwen3vl-tiny-grace-w4g128-qat"
    out = grace.export_awq(source, tmp_path / "hf", layout="hf")
    check_awq_config(out, ["visual"])
    tensors = load_file(out / "model.safetensors")
    expected = load_file(source / "expected_awq.safetensors")   # what the GRACE release's AWQ packer makes of it
    for key, value in expected.items():
        assert torch.equal(tensors[key], value), key
    assert all(v.dtype == torch.float16 for k, v in tensors.items() if v.is_floating_point())
    loaded = grace.load(out, device="cpu", dtype=torch.float32)
    assert (loaded.kind, loaded.format) == ("int4", "hf-awq")
    meta = json.loads((source / "expected.json").read_text())
    inputs = build_inputs(loaded.processor, Image.open(source / meta["image"]), meta["prompt"])
    with torch.no_grad():
        diff = (loaded.model(**inputs).logits[0] - load_file(source / "expected.safetensors")["logits"]).abs().max()
    assert diff < 0.05      # fp16 scales and fp16 plain tensors


def test_asymmetric_int4_model_keeps_its_zero_points(fixtures_dir, tmp_path):
    loaded = grace.load(fixtures_dir / "qwen3vl-tiny-hf-awq", device="cpu", dtype=torch.float32)
    out = grace.export_awq(loaded, tmp_path / "again", layout="hf")
    check_awq_config(out, ["visual"])
    before, after = load_file(fixtures_dir / "qwen3vl-tiny-hf-awq" / "model.safetensors"), load_file(out / "model.safetensors")
    zeros = [k for k in before if k.endswith(".qzeros")]
    assert zeros and any(awq_pack.unpack(before[k]).ne(8).any() for k in zeros)
    for key in [k for k in before if k.endswith((".qweight", ".qzeros", ".scales"))]:
        assert torch.equal(before[key], after[key]), key


def test_rtn_quantized_model_exports(tiny_checkpoint, tmp_path):
    loaded = grace.load(tiny_checkpoint, device="cpu", dtype=torch.float32)
    quantize_(loaded.model, Int4WeightOnlyConfig())
    out = save_hf_awq(loaded.model, loaded.processor, tmp_path / "rtn")   # export_awq itself wants an INT4 checkpoint
    check_awq_config(out, ["visual"])
    again = grace.load(out, device="cpu", dtype=torch.float32)
    names = loaded.quantized_modules
    assert sorted(again.quantized_modules) == sorted(names)
    for name in names:
        assert torch.equal(again.model.get_submodule(name).codes(), loaded.model.get_submodule(name).codes())


def test_unknown_layout_is_refused(fixtures_dir, tmp_path):
    with pytest.raises(ValueError, match="layout"):
        grace.export_awq(fixtures_dir / "qwen3vl-tiny-grace-w4g128-qat", tmp_path / "x", layout="marlin")
