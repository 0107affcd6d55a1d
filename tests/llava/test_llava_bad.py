"""LLaVA checkpoints that cannot be used fail with one plain GraceLoadError."""

import json

import pytest
import torch

import grace
from grace import GraceLoadError
from llava_helpers import LLAVA_FIXTURES, clip_tiny, copy_fixture, no_tower_env, offline_hub  # noqa: F401 (fixtures)



def edit_config(folder, **entries):
    config = json.loads((folder / "config.json").read_text())
    config.update(entries)
    (folder / "config.json").write_text(json.dumps(config))


def plain_message(err):
    text = str(err.value)
    assert "Error" not in text and "Traceback" not in text
    return text


@pytest.mark.parametrize("name", ["llava-tiny-grace-w4g128-qat", "llava-tiny-grace-w4g128-awq"])
def test_vision_tower_not_found_offline(fixtures_dir, offline_hub, name):
    with pytest.raises(GraceLoadError, match="vision tower") as err:
        grace.load(fixtures_dir / name, device="cpu")
    text = plain_message(err)
    assert "openai/clip-vit-large-patch14-336" in text and "vision_tower=" in text and "GRACE_VISION_TOWER" in text


def test_vision_tower_folder_that_does_not_exist(fixtures_dir, tmp_path):
    with pytest.raises(GraceLoadError, match="does not exist"):
        grace.load(fixtures_dir / "llava-tiny-grace-w4g128-awq", device="cpu", vision_tower=tmp_path / "nope")


def test_vision_tower_that_is_not_clip(fixtures_dir, tmp_path):
    with pytest.raises(GraceLoadError, match="CLIP"):
        grace.load(fixtures_dir / "llava-tiny-grace-w4g128-awq", device="cpu",
                   vision_tower=fixtures_dir / "qwen3vl-tiny-bf16")


def test_vision_tower_of_the_wrong_width(fixtures_dir, tmp_path, clip_tiny):
    tower = copy_fixture(fixtures_dir, "clip-tiny", tmp_path)
    config = json.loads((tower / "config.json").read_text())
    config["vision_config"]["hidden_size"] = 96
    (tower / "config.json").write_text(json.dumps(config))
    with pytest.raises(GraceLoadError, match="mm_hidden_size"):
        grace.load(fixtures_dir / "llava-tiny-grace-w4g128-awq", device="cpu", vision_tower=tower)


def test_a_path_written_in_the_config_is_never_opened(fixtures_dir, tmp_path, clip_tiny):
    folder = copy_fixture(fixtures_dir, "llava-tiny-grace-w4g128-awq", tmp_path)
    edit_config(folder, mm_vision_tower=str(clip_tiny))
    with pytest.raises(GraceLoadError, match="not a Hub repo id"):
        grace.load(folder, device="cpu")


@pytest.mark.parametrize("name", ["llava-tiny-grace-w4g128-qat", "llava-tiny-grace-w4g128-awq"])
def test_missing_tokenizer_model(fixtures_dir, tmp_path, clip_tiny, name):
    folder = copy_fixture(fixtures_dir, name, tmp_path)
    (folder / "tokenizer.model").unlink()
    with pytest.raises(GraceLoadError, match="tokenizer.model") as err:
        grace.load(folder, device="cpu", vision_tower=clip_tiny)
    plain_message(err)


def test_corrupt_tokenizer_model(fixtures_dir, tmp_path, clip_tiny):
    folder = copy_fixture(fixtures_dir, "llava-tiny-grace-w4g128-awq", tmp_path)
    (folder / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(GraceLoadError, match="tokenizer.model"):
        grace.load(folder, device="cpu", vision_tower=clip_tiny)


@pytest.mark.parametrize("entries,match", [({"mm_projector_type": "linear"}, "projector"),
                                           ({"image_aspect_ratio": "anyres"}, "anyres"),
                                           ({"mm_use_im_start_end": True}, "start/end"),
                                           ({"vocab_size": 500}, "vocab")])
def test_unsupported_llava_variants(fixtures_dir, tmp_path, clip_tiny, entries, match):
    folder = copy_fixture(fixtures_dir, "llava-tiny-grace-w4g128-awq", tmp_path)
    edit_config(folder, **entries)
    with pytest.raises(GraceLoadError, match=match):
        grace.load(folder, device="cpu", vision_tower=clip_tiny)


def test_awq_modules_json_lists_a_missing_module(fixtures_dir, tmp_path, clip_tiny):
    folder = copy_fixture(fixtures_dir, "llava-tiny-grace-w4g128-awq", tmp_path)
    spec = json.loads((folder / "awq_quantized_modules.json").read_text())
    spec["modules"].append("model.layers.9.mlp.up_proj")
    (folder / "awq_quantized_modules.json").write_text(json.dumps(spec))
    with pytest.raises(GraceLoadError, match="layers.9"):
        grace.load(folder, device="cpu", vision_tower=clip_tiny)


def test_foreign_tensor_names(fixtures_dir, tmp_path, clip_tiny):
    from safetensors.torch import load_file, save_file

    folder = copy_fixture(fixtures_dir, "llava-tiny-grace-w4g128-awq", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.h.0.weight"] = torch.zeros(2)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(GraceLoadError, match="transformer.h.0.weight"):
        grace.load(folder, device="cpu", vision_tower=clip_tiny)
