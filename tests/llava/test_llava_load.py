"""The GRACE LLaVA-1.5 release layouts load into transformers' LlavaForConditionalGeneration."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

import grace
from grace.chat import build_inputs
from grace.quant import Int4Linear
from checkpoint_helpers import quantized_linear_bytes
from llava_helpers import LLAVA_FIXTURES, clip_tiny, copy_fixture, no_tower_env, offline_hub  # noqa: F401 (fixtures)



def reference(folder, processor):
    meta = json.loads((folder / "expected.json").read_text())
    return build_inputs(processor, Image.open(folder / meta["image"]), meta["prompt"]), load_file(folder / "expected.safetensors")


@pytest.mark.parametrize("name,fmt", LLAVA_FIXTURES.items())
def test_fixture_logits_ids_and_greedy(fixtures_dir, clip_tiny, name, fmt):
    folder = fixtures_dir / name
    loaded = grace.load(folder, device="cpu", dtype=torch.float32, vision_tower=clip_tiny)
    assert isinstance(loaded.model, LlavaForConditionalGeneration)
    assert (loaded.kind, loaded.format, loaded.packed) == ("int4", fmt, True)
    names = loaded.quantized_modules
    assert len(names) == 14 and all(n.startswith("model.language_model.layers.") for n in names)
    assert all(isinstance(loaded.model.get_submodule(n), Int4Linear) for n in names)
    inputs, expected = reference(folder, loaded.processor)
    assert torch.equal(inputs["input_ids"], expected["input_ids_hf"])       # <image> expanded to 16 placeholders
    assert torch.equal(inputs["pixel_values"], expected["pixel_values"])
    with torch.no_grad():
        out = loaded.model(**inputs)
    assert (out.logits[0] - expected["logits"]).abs().max().item() < 1e-3
    assert (out.image_outputs.pooler_output[0] - expected["image_features"]).abs().max().item() < 1e-4
    gen = loaded.model.generate(**inputs, max_new_tokens=len(expected["greedy_ids"]), do_sample=False)
    assert gen[0, inputs["input_ids"].shape[1]:].tolist() == expected["greedy_ids"].tolist()


def test_qat_unpacked_is_the_bf16_grid_as_stored(fixtures_dir, clip_tiny):
    folder = fixtures_dir / "llava-tiny-grace-w4g128-qat"
    loaded = grace.load(folder, device="cpu", dtype=torch.float32, vision_tower=clip_tiny, packed=False)
    assert loaded.kind == "int4" and not loaded.packed and not loaded.quantized_modules
    stored = {}
    for shard in sorted(folder.glob("model-*.safetensors")):
        stored.update(load_file(shard))
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(loaded.model.state_dict()["model.language_model.layers.1.mlp.down_proj.weight"], stored[name].float())
    inputs, expected = reference(folder, loaded.processor)
    with torch.no_grad():
        diff = (loaded.model(**inputs).logits[0] - expected["logits"]).abs().max().item()
    assert 0.05 < diff < 0.5   # the README's 0.17: the rounded grid, not the trained weights


@pytest.mark.parametrize("name", LLAVA_FIXTURES)
def test_int4_bytes_at_most_half_of_bf16(fixtures_dir, clip_tiny, name):
    loaded = grace.load(fixtures_dir / name, device="cpu", dtype=torch.bfloat16, vision_tower=clip_tiny)
    held, plain = quantized_linear_bytes(loaded)
    assert held <= 0.5 * plain, held / plain
    unpacked = grace.load(fixtures_dir / "llava-tiny-grace-w4g128-qat", device="cpu", dtype=torch.bfloat16,
                          vision_tower=clip_tiny, packed=False)
    assert loaded.weight_bytes < unpacked.weight_bytes


def test_vision_tower_from_environment_variable(fixtures_dir, clip_tiny, monkeypatch):
    monkeypatch.setenv("GRACE_VISION_TOWER", str(clip_tiny))
    loaded = grace.load(fixtures_dir / "llava-tiny-grace-w4g128-awq", device="cpu", dtype=torch.float32)
    assert loaded.kind == "int4"


def test_vision_tower_from_an_offline_hub_cache(fixtures_dir, clip_tiny, offline_hub):
    """The config's mm_vision_tower resolved through huggingface_hub's own cache, as on an offline machine."""
    repo = offline_hub / "models--openai--clip-vit-large-patch14-336"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in clip_tiny.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    folder = fixtures_dir / "llava-tiny-grace-w4g128-awq"
    loaded = grace.load(folder, device="cpu", dtype=torch.float32)
    inputs, expected = reference(folder, loaded.processor)
    with torch.no_grad():
        assert (loaded.model(**inputs).logits[0] - expected["logits"]).abs().max().item() < 1e-3


def test_chat_answers_with_the_vicuna_prompt(fixtures_dir, clip_tiny):
    from grace.chat import GenerationSettings, answer

    folder = fixtures_dir / "llava-tiny-grace-w4g128-awq"
    loaded = grace.load(folder, device="cpu", dtype=torch.float32, vision_tower=clip_tiny)
    expected = load_file(folder / "expected.safetensors")
    result = answer(loaded, Image.open(folder / "image.png"), "Describe this image.", GenerationSettings(max_new_tokens=8))
    assert result.done and result.token_ids == expected["greedy_ids"].tolist()
    assert result.prompt_tokens == expected["input_ids_hf"].shape[1]
    text_only = answer(loaded, None, "Hello", GenerationSettings(max_new_tokens=3))
    assert text_only.done and len(text_only.token_ids) <= 3


def test_qat_release_without_its_sidecar_infers_the_grid(fixtures_dir, clip_tiny, tmp_path):
    """Without qat_quantized_weights.bin the steps come from the bf16 grid itself; only the LM linears are INT4."""
    folder = copy_fixture(fixtures_dir, "llava-tiny-grace-w4g128-qat", tmp_path)
    (folder / "qat_quantized_weights.bin").unlink()
    loaded = grace.load(folder, device="cpu", dtype=torch.float32, vision_tower=clip_tiny)
    names = loaded.quantized_modules
    assert len(names) == 14 and all(n.startswith("model.language_model.layers.") for n in names)
    inputs, expected = reference(folder, loaded.processor)
    with torch.no_grad():
        diff = (loaded.model(**inputs).logits[0] - expected["logits"]).abs().max().item()
    assert diff < 0.5      # the bf16 grid as stored is 0.17 away; the codes are recovered from it exactly


def test_awq_release_sharded_and_named_llava(fixtures_dir, clip_tiny, tmp_path):
    """The AWQ release as the model card lists it (shards + index), with model_type "llava" as liuhaotian's is."""
    from safetensors.torch import save_file

    folder = copy_fixture(fixtures_dir, "llava-tiny-grace-w4g128-awq", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for shard, names in shards.items():
        save_file({k: tensors[k] for k in names}, str(folder / shard), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: s for s, names in shards.items() for k in names}}))
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llava"
    (folder / "config.json").write_text(json.dumps(config))
    loaded = grace.load(folder, device="cpu", dtype=torch.float32, vision_tower=clip_tiny)
    inputs, expected = reference(folder, loaded.processor)
    with torch.no_grad():
        assert (loaded.model(**inputs).logits[0] - expected["logits"]).abs().max().item() < 1e-3


@pytest.mark.parametrize("name,fmt", LLAVA_FIXTURES.items())
def test_inspect_agrees_with_load(fixtures_dir, name, fmt):
    info = grace.inspect(fixtures_dir / name)     # JSON only: no vision tower needed
    assert (info.format, info.kind, info.bits, info.group_size) == (fmt, "int4", 4, 128)
    assert info.architecture == "LlavaForConditionalGeneration" and info.quantized_modules == 14


def test_vision_tower_saved_by_transformers_as_a_clip_vision_model(fixtures_dir, clip_tiny, tmp_path):
    """A mirror made with CLIPVisionModel.save_pretrained (transformers 5 writes no `vision_model.` level)."""
    from transformers import CLIPVisionModel

    folder = fixtures_dir / "llava-tiny-grace-w4g128-awq"
    tower = CLIPVisionModel.from_pretrained(clip_tiny)
    tower.save_pretrained(tmp_path / "clip-vision")
    (tmp_path / "clip-vision" / "preprocessor_config.json").write_bytes((clip_tiny / "preprocessor_config.json").read_bytes())
    loaded = grace.load(folder, device="cpu", dtype=torch.float32, vision_tower=tmp_path / "clip-vision")
    inputs, expected = reference(folder, loaded.processor)
    with torch.no_grad():
        assert (loaded.model(**inputs).logits[0] - expected["logits"]).abs().max().item() < 1e-3
