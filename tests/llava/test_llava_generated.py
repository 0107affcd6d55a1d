"""LLaVA-1.5 checkpoints of other shapes and seeds, written here in the GRACE QAT layout (original LLaVA names,
bf16 grid, sidecar, shards), loaded, exported to the AWQ layout and loaded again, each against a reference
decoded by this test itself."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import grace
from grace.chat import build_inputs
from grace.llava.tiny import TinyLlavaConfig, original_tensors, save_original, save_tower, tiny_llava
from grace.quant import awq_pack
from llava_helpers import LLAVA_FIXTURES, clip_tiny, copy_fixture, no_tower_env, offline_hub  # noqa: F401 (fixtures)

CONFIGS = {
    "gqa-wide-seed3": (3, TinyLlavaConfig(hidden=256, layers=3, intermediate=384, heads=8, kv_heads=2, vision_hidden=48,
                                          vision_heads=2, vision_intermediate=96, image_size=28)),
    "narrow-seed5": (5, TinyLlavaConfig(hidden=128, layers=1, intermediate=512, heads=2, kv_heads=2, vision_hidden=32,
                                        vision_layers=2, vision_heads=2, vision_intermediate=64, image_size=42)),
}
LM = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lm_linears(model):
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("model.language_model.") and n.endswith(LM)]


def logits(model, processor, seed, size=(70, 40)):
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    inputs = build_inputs(processor, Image.fromarray(pixels.numpy()), "What is in the picture?")
    with torch.no_grad():
        return model(**inputs).logits[0, :, : model.config.image_token_index].float(), inputs   # real vocabulary


def round_plain(model, dtype):
    """The reference holds what the checkpoint stores: plain tensors rounded, the tower (read from its folder) not."""
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.is_floating_point() and not key.startswith("model.vision_tower."):
                value.copy_(value.to(dtype).float())


@pytest.fixture(params=CONFIGS, scope="module")
def qat_release(request, tmp_path_factory):
    seed, cfg = CONFIGS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model, processor = tiny_llava(seed, cfg, workdir=root / "tok")
    tower = save_tower(model, root / "clip")
    g = torch.Generator().manual_seed(seed)
    codes, scales, sidecar = {}, {}, {}
    for name in lm_linears(model):
        w = model.get_submodule(name).weight.detach()
        out_f, in_f = w.shape
        log_scale = (w.reshape(out_f, -1, 128).abs().amax(-1) / 7).log() + torch.randn(out_f, in_f // 128, generator=g) * 0.05
        s = log_scale.exp()
        q = torch.round(w / s.repeat_interleave(128, 1)).clamp(-8, 7)
        codes[name], scales[name] = q, s
        original = name.replace("model.language_model.", "model.", 1)
        grid = (q * s.repeat_interleave(128, 1)).to(torch.bfloat16)
        model.get_submodule(name).weight.data = grid.float()
        sidecar[original + ".weight"], sidecar[original + ".log_scale"] = grid, log_scale.reshape(-1).float()
    folder = root / "qat"
    tensors = original_tensors(model)                       # bf16, with the tower copy, as the QAT release
    keys = sorted(tensors)
    shards = {f"model-0000{i + 1}-of-00002.safetensors": keys[i::2] for i in range(2)}
    save_original(model, processor, folder, tensors={}, extra_config={
        "qat": {"bits": 4, "group_size": 128, "learn_scales": True, "num_replaced": len(codes),
                "skip_keywords": ["mm_projector", "vision_tower", "vision_resampler", "lm_head", "embed_tokens"]}})
    (folder / "model.safetensors").unlink()
    for shard, names in shards.items():
        save_file({k: tensors[k] for k in names}, str(folder / shard), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: s for s, names in shards.items() for k in names}}, indent=2))
    torch.save(sidecar, folder / "qat_quantized_weights.bin")
    return seed, model, processor, folder, tower, codes, scales


def reference_with(model, codes, scales, scale_dtype, plain_dtype):
    """What the checkpoint means: QAT plain tensors as stored (bf16), an export's then in `plain_dtype` too."""
    import copy

    ref = copy.deepcopy(model)
    round_plain(ref, torch.bfloat16)
    round_plain(ref, plain_dtype)
    with torch.no_grad():
        for name, q in codes.items():
            s = scales[name].to(scale_dtype).float().repeat_interleave(128, 1)
            ref.get_submodule(name).weight.copy_(q * s)
    return ref


def test_qat_release_loads_as_int4(qat_release):
    seed, model, processor, folder, tower, codes, scales = qat_release
    loaded = grace.load(folder, device="cpu", dtype=torch.float32, vision_tower=tower)
    assert (loaded.kind, loaded.format) == ("int4", "grace-qat")
    assert sorted(loaded.quantized_modules) == sorted(codes)
    ref = reference_with(model, codes, scales, torch.float32, torch.bfloat16)
    got, inputs = logits(loaded.model, loaded.processor, seed)
    want, ref_inputs = logits(ref, processor, seed)
    assert torch.equal(inputs["input_ids"], ref_inputs["input_ids"])
    patches = (model.config.vision_config.image_size // 14) ** 2
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == patches
    assert (got - want).abs().max().item() < 1e-3


def test_awq_export_packs_like_autoawq_and_loads(qat_release, tmp_path):
    seed, model, processor, folder, tower, codes, scales = qat_release
    out = grace.export_awq(folder, tmp_path / "awq", vision_tower=tower)

    tensors = load_file(out / "model.safetensors")
    spec = json.loads((out / "awq_quantized_modules.json").read_text())
    originals = sorted(n.replace("model.language_model.", "model.", 1) for n in codes)
    assert spec == {"bits": 4, "group_size": 128, "modules": originals}
    for name, q in codes.items():   # AutoAWQ from_linear with zeros 8, scales exp(log_scale) in fp16
        original = name.replace("model.language_model.", "model.", 1)
        assert torch.equal(tensors[original + ".qweight"], awq_pack.pack((q + 8).t().int().contiguous()))
        assert torch.equal(tensors[original + ".scales"], scales[name].t().half().contiguous())
        assert (tensors[original + ".qzeros"] == -2004318072).all()          # 0x88888888
    assert all(v.dtype == torch.float16 for k, v in tensors.items() if v.is_floating_point())
    assert "model.vision_tower.vision_tower.vision_model.post_layernorm.weight" in tensors
    config = json.loads((out / "config.json").read_text())
    assert config["awq_packing"]["zero_point"] == 8 and "quantization_config" not in config and "qat" in config
    loaded = grace.load(out, device="cpu", dtype=torch.float32, vision_tower=tower)
    assert (loaded.kind, loaded.format) == ("int4", "grace-awq")
    ref = reference_with(model, codes, scales, torch.float16, torch.float16)
    assert (logits(loaded.model, loaded.processor, seed)[0] - logits(ref, processor, seed)[0]).abs().max().item() < 1e-3


def test_hf_awq_export_loads_back(qat_release, tmp_path):
    seed, model, processor, folder, tower, codes, scales = qat_release
    out = grace.export_awq(folder, tmp_path / "hf", layout="hf", vision_tower=tower)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava" and config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["quantization_config"]["modules_to_not_convert"] == ["vision_tower", "multi_modal_projector"]
    names = load_file(out / "model.safetensors").keys()                 # the llava-hf hub naming engines read
    assert all(k.startswith(("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.",
                             "multi_modal_projector.")) for k in names)
    assert "language_model.model.layers.0.self_attn.q_proj.qweight" in names
    loaded = grace.load(out, device="cpu", dtype=torch.float32)          # no vision_tower needed: it is inside
    assert (loaded.kind, loaded.format) == ("int4", "hf-awq")
    ref = reference_with(model, codes, scales, torch.float16, torch.float16)
    with torch.no_grad():
        for key, value in ref.state_dict().items():
            if key.startswith("model.vision_tower.") and value.is_floating_point():
                value.copy_(value.half().float())
    assert (logits(loaded.model, loaded.processor, seed)[0] - logits(ref, processor, seed)[0]).abs().max().item() < 1e-3
