"""Every published layout in ../shared/fixtures loads and reproduces its fp32 reference logits."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import grace
from grace.chat import build_inputs
from grace.quant import Int4Linear, Int8Linear

from conftest import CHECKPOINTS


def reference_inputs(folder, processor):
    meta = json.loads((folder / "expected.json").read_text())
    return build_inputs(processor, Image.open(folder / meta["image"]), meta["prompt"])


@pytest.mark.parametrize("name,kind", CHECKPOINTS.items())
def test_fixture_logits_and_greedy(fixtures_dir, name, kind):
    folder = fixtures_dir / name
    loaded = grace.load(folder, device="cpu", dtype=torch.float32)
    assert loaded.kind == kind
    expected = load_file(folder / "expected.safetensors")
    inputs = reference_inputs(folder, loaded.processor)
    assert torch.equal(inputs["input_ids"], expected["input_ids"])
    with torch.no_grad():
        logits = loaded.model(**inputs).logits[0]
    assert (logits - expected["logits"]).abs().max().item() < 0.05
    out = loaded.model.generate(**inputs, max_new_tokens=len(expected["greedy_ids"]), do_sample=False)
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == expected["greedy_ids"].tolist()


@pytest.mark.parametrize("name,cls", [("qwen3vl-tiny-grace-w4g128-awq", Int4Linear), ("qwen3vl-tiny-hf-awq", Int4Linear),
                                      ("qwen3vl-tiny-grace-w4g128-qat", Int4Linear),
                                      ("qwen3vl-tiny-grace-w8g128-qat", Int8Linear)])
def test_quantized_linears_are_packed_modules(fixtures_dir, name, cls):
    loaded = grace.load(fixtures_dir / name, device="cpu", dtype=torch.float32)
    names = loaded.quantized_modules
    assert names and all(isinstance(loaded.model.get_submodule(n), cls) for n in names)
    assert not any("visual" in n or "lm_head" in n for n in names)
    assert loaded.packed


def _linear_bytes(model, names):
    return sum(t.numel() * t.element_size() for n in names
               for t in list(model.get_submodule(n).parameters()) + list(model.get_submodule(n).buffers()))


@pytest.mark.parametrize("name,limit", [("qwen3vl-tiny-grace-w4g128-qat", 0.5), ("qwen3vl-tiny-grace-w8g128-qat", 0.65),
                                        ("qwen3vl-tiny-grace-w4g128-awq", 0.5), ("qwen3vl-tiny-hf-awq", 0.5)])
def test_packed_bytes(fixtures_dir, name, limit):
    """The quantized linears hold at most `limit` x the bytes of the same linears in plain bf16."""
    packed = grace.load(fixtures_dir / name, device="cpu", dtype=torch.bfloat16)
    plain = grace.load(fixtures_dir / "qwen3vl-tiny-bf16", device="cpu", dtype=torch.bfloat16)
    names = packed.quantized_modules
    ratio = _linear_bytes(packed.model, names) / _linear_bytes(plain.model, names)
    assert ratio <= limit, ratio
    assert packed.weight_bytes < plain.weight_bytes   # the whole model shrinks too (vision tower stays bf16)


def test_qat_unpacked_is_the_release_as_stored(fixtures_dir):
    folder = fixtures_dir / "qwen3vl-tiny-grace-w4g128-qat"
    loaded = grace.load(folder, device="cpu", dtype=torch.float32, packed=False)
    assert loaded.kind == "int4" and not loaded.packed and not loaded.quantized_modules
    stored = load_file(folder / "model.safetensors")
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    assert torch.equal(loaded.model.state_dict()[name], stored[name].float())


def test_processor_handles_images_not_a_bare_tokenizer(fixtures_dir):
    loaded = grace.load(fixtures_dir / "qwen3vl-tiny-bf16", device="cpu")
    assert hasattr(loaded.processor, "image_processor") and hasattr(loaded.processor, "tokenizer")
    inputs = build_inputs(loaded.processor, Image.new("RGB", (90, 50), "white"), "Hi")
    assert "pixel_values" in inputs and "image_grid_thw" in inputs


def test_processor_with_torchvision_has_video_processor(fixtures_dir):
    pytest.importorskip("torchvision")
    from transformers import Qwen3VLProcessor

    loaded = grace.load(fixtures_dir / "qwen3vl-tiny-bf16", device="cpu")
    assert type(loaded.processor) is Qwen3VLProcessor and loaded.processor.video_processor is not None


def test_weight_bytes_counts_tied_embeddings_once(tmp_path):
    from grace.tiny import TinyConfig, save_tiny

    tied = grace.load(save_tiny(tmp_path / "tied", cfg=TinyConfig(tie_word_embeddings=True)), device="cpu")
    untied = grace.load(save_tiny(tmp_path / "untied", cfg=TinyConfig()), device="cpu")
    emb = tied.model.get_input_embeddings().weight
    assert tied.model.lm_head.weight.data_ptr() == emb.data_ptr()
    assert untied.weight_bytes - tied.weight_bytes == emb.numel() * emb.element_size()


@pytest.mark.parametrize("config,kind", [(grace.Int4WeightOnlyConfig(), "int4"), (grace.Int8WeightOnlyConfig(), "int8")])
def test_kind_and_packed_follow_the_modules_held(fixtures_dir, config, kind):
    loaded = grace.load(fixtures_dir / "qwen3vl-tiny-bf16", device="cpu", dtype=torch.float32)
    assert (loaded.kind, loaded.packed, loaded.format) == ("bf16", False, "plain")
    names = grace.quantize_(loaded.model, config)
    assert (loaded.kind, loaded.packed, loaded.format) == (kind, True, "plain")    # format: what was on disk
    assert loaded.quantized_modules == names


def test_mixed_precision_is_reported_as_such(fixtures_dir):
    loaded = grace.load(fixtures_dir / "qwen3vl-tiny-bf16", device="cpu", dtype=torch.float32)
    grace.quantize_(loaded.model, grace.Int4WeightOnlyConfig(), filter_fn=lambda m, n: n.endswith("q_proj"))
    grace.quantize_(loaded.model, grace.Int8WeightOnlyConfig(), filter_fn=lambda m, n: n.endswith("k_proj"))
    assert loaded.kind == "mixed" and loaded.packed
