"""Broken or foreign checkpoints fail with one clear GraceLoadError, never a deep traceback."""

import json
import os
import pickle
import shutil

import pytest
import torch

import grace
from grace import GraceLoadError


def copy_fixture(fixtures_dir, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(fixtures_dir / name, dst)
    for f in dst.iterdir():
        os.chmod(f, 0o644)
    return dst


def test_missing_folder(tmp_path):
    with pytest.raises(GraceLoadError, match="not found"):
        grace.load(tmp_path / "nope", device="cpu")


def test_file_instead_of_folder(fixtures_dir):
    with pytest.raises(GraceLoadError, match="folder"):
        grace.load(fixtures_dir / "qwen3vl-tiny-bf16" / "config.json", device="cpu")


def test_not_qwen3vl(fixtures_dir, tmp_path):
    folder = copy_fixture(fixtures_dir, "qwen3vl-tiny-bf16", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(GraceLoadError, match="llama.*Qwen3-VL"):
        grace.load(folder, device="cpu")


def test_no_config(fixtures_dir, tmp_path):
    folder = copy_fixture(fixtures_dir, "qwen3vl-tiny-bf16", tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(GraceLoadError, match="config.json"):
        grace.load(folder, device="cpu")


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0001])
def test_truncated_safetensors(fixtures_dir, tmp_path, keep):
    folder = copy_fixture(fixtures_dir, "qwen3vl-tiny-grace-w4g128-awq", tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(GraceLoadError, match="truncated or corrupt"):
        grace.load(folder, device="cpu")


def test_awq_modules_json_names_absent_module(fixtures_dir, tmp_path):
    folder = copy_fixture(fixtures_dir, "qwen3vl-tiny-grace-w4g128-awq", tmp_path)
    spec = json.loads((folder / "awq_quantized_modules.json").read_text())
    spec["modules"].append("model.language_model.layers.7.mlp.up_proj")
    (folder / "awq_quantized_modules.json").write_text(json.dumps(spec))
    with pytest.raises(GraceLoadError, match="layers.7.mlp.up_proj"):
        grace.load(folder, device="cpu")


def test_awq_listed_module_without_tensors(fixtures_dir, tmp_path):
    folder = copy_fixture(fixtures_dir, "qwen3vl-tiny-grace-w4g128-awq", tmp_path)
    spec = json.loads((folder / "awq_quantized_modules.json").read_text())
    spec["modules"].append("model.visual.blocks.0.attn.proj")        # a real linear, but stored plain
    (folder / "awq_quantized_modules.json").write_text(json.dumps(spec))
    with pytest.raises(GraceLoadError, match="visual.blocks.0.attn.proj"):
        grace.load(folder, device="cpu")


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/grace_pwned",))


def test_sidecar_with_code_is_refused(fixtures_dir, tmp_path):
    folder = copy_fixture(fixtures_dir, "qwen3vl-tiny-grace-w4g128-qat", tmp_path)
    marker = "/tmp/grace_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    torch.save({"x": Exploit()}, folder / "qat_quantized_weights.bin")
    with pytest.raises(GraceLoadError, match="not a plain dict of tensors"):
        grace.load(folder, device="cpu")
    assert not os.path.exists(marker)


def test_sidecar_not_a_tensor_dict(fixtures_dir, tmp_path):
    folder = copy_fixture(fixtures_dir, "qwen3vl-tiny-grace-w4g128-qat", tmp_path)
    torch.save([torch.zeros(3)], folder / "qat_quantized_weights.bin")
    with pytest.raises(GraceLoadError, match="dict of named tensors"):
        grace.load(folder, device="cpu")


def test_sidecar_garbage_bytes(fixtures_dir, tmp_path):
    folder = copy_fixture(fixtures_dir, "qwen3vl-tiny-grace-w8g128-qat", tmp_path)
    (folder / "qat_quantized_weights.bin").write_bytes(pickle.dumps("hello")[:5] + b"\x00garbage")
    with pytest.raises(GraceLoadError):
        grace.load(folder, device="cpu")


def test_unsupported_quant_method(fixtures_dir, tmp_path):
    folder = copy_fixture(fixtures_dir, "qwen3vl-tiny-hf-awq", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "gptq"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(GraceLoadError, match="gptq"):
        grace.load(folder, device="cpu")


def test_weights_from_another_model(fixtures_dir, tmp_path):
    folder = copy_fixture(fixtures_dir, "qwen3vl-tiny-bf16", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(GraceLoadError, match="lack.*layers.2"):
        grace.load(folder, device="cpu")


def test_offline_hub_id_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(GraceLoadError) as info:
        grace.load("ForeverBlue/Qwen3-VL-2B-GRACE-W4G128", device="cpu")
    message = str(info.value)
    assert "ForeverBlue/Qwen3-VL-2B-GRACE-W4G128" in message and "hf download" in message
