"""Checkpoints of every format written here from tiny models of other shapes and seeds.

Each is compared against an independent fp32 reference: a plain transformers model whose
quantized linears hold the weights the format means, decoded by the test itself.
"""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from PIL import Image

import grace
from grace.chat import build_inputs
from grace.quant import awq_pack
from grace.tiny import TinyConfig, save_checkpoint, tiny_qwen3vl

CONFIGS = [
    (1, TinyConfig(hidden=256, layers=3, intermediate=384, heads=4, kv_heads=2, head_dim=64, vision_hidden=64,
                   vision_intermediate=128, tie_word_embeddings=True)),
    (7, TinyConfig(hidden=128, layers=2, intermediate=256, heads=2, kv_heads=1, head_dim=64, vision_hidden=96,
                   vision_intermediate=192, vision_heads=2)),
]


def language_linears(model):
    """The decoder linears, by their leaf names (independent of grace's targeting rule)."""
    leaves = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and n.startswith("model.language_model.layers.") and n.rsplit(".", 1)[-1] in leaves]


def logits_of(model, processor, seed):
    pixels = torch.randint(0, 256, (64, 80, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    inputs = build_inputs(processor, image, "Describe the image.")
    with torch.no_grad():
        return model(**inputs).logits[0].float()


def write_tensors(folder, model, replace: dict[str, dict[str, torch.Tensor]], dtype=torch.bfloat16):
    tensors = {}
    for key, value in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if module in replace:
            continue
        tensors[key] = value.to(dtype) if value.is_floating_point() else value
    for module, parts in replace.items():
        tensors.update({f"{module}.{k}": v.contiguous() for k, v in parts.items()})
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def patch_config(folder, **entries):
    config = json.loads((folder / "config.json").read_text())
    config.update(entries)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(params=CONFIGS, ids=["wide-tied-seed1", "narrow-seed7"])
def base(request, tmp_path):
    seed, cfg = request.param
    model, processor = tiny_qwen3vl(seed, cfg)
    folder = save_checkpoint(model.to(torch.bfloat16), processor, tmp_path / "plain")
    reference = grace.load(folder, device="cpu", dtype=torch.float32)   # bf16-stored weights, fp32 compute
    return seed, reference, folder


def set_weight(model, name, weight):
    model.get_submodule(name).weight.data = weight.float()


@pytest.mark.parametrize("seed,cfg", CONFIGS, ids=["wide-tied-seed1", "narrow-seed7"])
def test_plain_roundtrip(seed, cfg, tmp_path):
    """A plain checkpoint loads as the model that wrote it (its weights as bf16 stores them)."""
    model, processor = tiny_qwen3vl(seed, cfg)
    folder = save_checkpoint(copy.deepcopy(model).to(torch.bfloat16), processor, tmp_path / "plain")
    loaded = grace.load(folder, device="cpu", dtype=torch.float32)
    assert (loaded.format, loaded.kind, loaded.packed) == ("plain", "bf16", False)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.bfloat16().float())
    expected = logits_of(model, processor, seed)
    assert (logits_of(loaded.model, processor, seed) - expected).abs().max() < 1e-4


def test_grace_awq_format(base, tmp_path):
    seed, reference, _ = base
    model, processor = reference.model, reference.processor
    folder = tmp_path / "awq"
    save_checkpoint(model, processor, folder)   # (casting the model itself would also round its rotary tables)
    g = torch.Generator().manual_seed(seed)
    names, packed = language_linears(model), {}
    for name in names:
        out_f, in_f = model.get_submodule(name).weight.shape
        codes = torch.randint(0, 16, (in_f, out_f), generator=g)
        scales = (torch.rand(in_f // 128, out_f, generator=g) * 0.02 + 0.005).half()
        packed[name] = {"qweight": awq_pack.pack(codes), "qzeros": awq_pack.pack(torch.full((in_f // 128, out_f), 8)),
                        "scales": scales}
    write_tensors(folder, model, packed)
    (folder / "awq_quantized_modules.json").write_text(json.dumps({"bits": 4, "group_size": 128, "modules": names}))
    patch_config(folder, awq_packing={"bits": 4, "group_size": 128, "zero_point": 8, "version": "gemm"})
    loaded = grace.load(folder, device="cpu", dtype=torch.float32)
    assert loaded.kind == "int4" and sorted(loaded.quantized_modules) == sorted(names)
    for name, p in packed.items():   # independent decode: (q - 8) * s
        codes = torch.stack([(p["qweight"] >> (4 * k)) & 0xF for k in range(8)], -1)
        natural = torch.empty_like(codes)
        natural[..., [0, 2, 4, 6, 1, 3, 5, 7]] = codes
        q = natural.reshape(codes.shape[0], -1).float()
        set_weight(model, name, ((q - 8) * p["scales"].float().repeat_interleave(128, 0)).t())
    diff = (logits_of(loaded.model, processor, seed) - logits_of(model, processor, seed)).abs().max()
    assert diff < 1e-3


def test_hf_awq_format_asymmetric(base, tmp_path):
    seed, reference, _ = base
    model, processor = reference.model.float(), reference.processor
    folder = tmp_path / "hf-awq"
    save_checkpoint(model, processor, folder)
    g = torch.Generator().manual_seed(seed + 100)
    names, packed, decoded = language_linears(model), {}, {}
    for name in names:
        w = model.get_submodule(name).weight.detach().float()            # [out, in]
        groups = w.t().reshape(-1, 128, w.shape[0])                        # [in/128, 128, out]
        lo, hi = groups.amin(1), groups.amax(1)
        scales = ((hi - lo) / 15).clamp_min(1e-5).half()
        zeros = torch.round(-lo / scales.float()).clamp(0, 15)
        q = torch.round(groups / scales.float().unsqueeze(1) + zeros.unsqueeze(1)).clamp(0, 15)
        packed[name] = {"qweight": awq_pack.pack(q.reshape(-1, w.shape[0]).int()),
                        "qzeros": awq_pack.pack(zeros.int()), "scales": scales}
        decoded[name] = ((q - zeros.unsqueeze(1)) * scales.float().unsqueeze(1)).reshape(-1, w.shape[0]).t()
    assert any(p["qzeros"].ne(awq_pack.pack(torch.full_like(awq_pack.unpack(p["qzeros"]).int(), 8))).any()
               for p in packed.values())
    write_tensors(folder, model, packed, dtype=torch.float16)
    patch_config(folder, quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm",
                                              "zero_point": True, "modules_to_not_convert": ["visual"]})
    loaded = grace.load(folder, device="cpu", dtype=torch.float32)
    assert loaded.kind == "int4" and loaded.format == "hf-awq"
    plain = grace.load(folder.parent / "plain", device="cpu", dtype=torch.float32).model
    for key, value in plain.state_dict().items():        # the reference keeps the fp16-rounded plain tensors too
        if value.is_floating_point():
            value.copy_(value.half().float())
    for name, weight in decoded.items():
        set_weight(plain, name, weight)
    diff = (logits_of(loaded.model, processor, seed) - logits_of(plain, processor, seed)).abs().max()
    assert diff < 1e-3


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("with_sidecar", [True, False])
def test_grace_qat_format(base, tmp_path, bits, with_sidecar):
    seed, reference, _ = base
    model, processor = reference.model.float(), reference.processor
    folder = tmp_path / f"qat{bits}"
    g = torch.Generator().manual_seed(seed + bits)
    qmax = 2 ** (bits - 1) - 1
    names, sidecar, exact = language_linears(model), {}, {}
    for name in names:
        w = model.get_submodule(name).weight.detach()
        out_f, in_f = w.shape
        log_scale = (w.reshape(out_f, -1, 128).abs().amax(-1) / qmax).log() + torch.randn(out_f, in_f // 128, generator=g) * 0.05
        s = log_scale.exp().repeat_interleave(128, 1)
        codes = torch.round(w / s).clamp(-qmax - 1, qmax)
        exact[name] = codes * s
        grid = exact[name].to(torch.bfloat16)
        model.get_submodule(name).weight.data = grid.float()
        sidecar[name + ".weight"], sidecar[name + ".log_scale"] = grid, log_scale.reshape(-1).float()
    save_checkpoint(copy.deepcopy(model).to(torch.bfloat16), processor, folder)
    patch_config(folder, qat={"bits": bits, "group_size": 128, "num_replaced": len(names),
                              "skip_keywords": ["visual", "merger", "lm_head", "embed_tokens"]})
    if with_sidecar:
        torch.save(sidecar, folder / "qat_quantized_weights.bin")
    loaded = grace.load(folder, device="cpu", dtype=torch.float32)
    assert loaded.kind == f"int{bits}" and sorted(loaded.quantized_modules) == sorted(names)
    for name, weight in exact.items():
        set_weight(model, name, weight)
    diff = (logits_of(loaded.model, processor, seed) - logits_of(model, processor, seed)).abs().max()
    # Without the sidecar the steps are inferred from the bf16 grid: within bf16 rounding of the exact weights.
    assert diff < (1e-3 if with_sidecar else 0.05)
    unpacked = grace.load(folder, device="cpu", dtype=torch.float32, packed=False)
    assert not unpacked.quantized_modules and not unpacked.packed and unpacked.kind == f"int{bits}"
