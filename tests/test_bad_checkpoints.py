"""Broken or foreign checkpoints fail with one clear GraceLoadError, never a deep traceback.

One table: a fixture, how to break a copy of it, what the message must say, and whether
`grace.inspect` (which reads no weights) must refuse it too or still describe it.
"""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import grace
from grace import GraceLoadError

MARKER = Path("/tmp/grace_pwned")
Q0 = "model.language_model.layers.0.self_attn.q_proj"


class Exploit:
    def __reduce__(self):
        return (os.system, (f"echo pwned > {MARKER}",))


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_tensors(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def truncate(keep):
    def cut(folder):
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: max(1, int(len(data) * keep))])
    return cut


def config(change):
    return lambda folder: edit_json(folder / "config.json", change)


def awq_spec(change):
    return lambda folder: edit_json(folder / "awq_quantized_modules.json", change)


def sidecar(payload):
    def write(folder):
        path = folder / "qat_quantized_weights.bin"
        if isinstance(payload, bytes):
            path.write_bytes(payload)
        else:
            torch.save(payload, path)
    return write


def add_log_scale_for_absent_module(folder):
    path = folder / "qat_quantized_weights.bin"
    data = torch.load(path, weights_only=True)
    data["model.language_model.layers.9.mlp.up_proj.log_scale"] = torch.zeros(4)
    torch.save(data, path)


AWQ, HF_AWQ, BF16 = "qwen3vl-tiny-grace-w4g128-awq", "qwen3vl-tiny-hf-awq", "qwen3vl-tiny-bf16"
W4_QAT, W8_QAT = "qwen3vl-tiny-grace-w4g128-qat", "qwen3vl-tiny-grace-w8g128-qat"

# id: (fixture, break it, the message must match, inspect refuses it too)
BREAKS = {
    "not-qwen3vl": (BF16, config(lambda c: c.update(model_type="llama")), "llama.*Qwen3-VL", True),
    "no-config": (BF16, lambda f: (f / "config.json").unlink(), "config.json", True),
    "config-not-json": (BF16, lambda f: (f / "config.json").write_text("{'model_type': qwen3_vl"), "not valid JSON", True),
    "truncated-half": (AWQ, truncate(0.5), "truncated or corrupt", False),
    "truncated-last-byte": (AWQ, truncate(0.999), "truncated or corrupt", False),
    "truncated-in-header": (AWQ, truncate(0.0001), "truncated or corrupt", False),
    "no-weights": (BF16, lambda f: (f / "model.safetensors").unlink(), "no model weights", False),
    "awq-lists-absent-module": (AWQ, awq_spec(lambda s: s["modules"].append("model.language_model.layers.7.mlp.up_proj")),
                                "layers.7.mlp.up_proj", False),
    "awq-lists-plain-linear": (AWQ, awq_spec(lambda s: s["modules"].append("model.visual.blocks.0.attn.proj")),
                               "visual.blocks.0.attn.proj", False),
    "awq-unlisted-packed-module": (AWQ, awq_spec(lambda s: s["modules"].remove(Q0)), "not listed in", False),
    "awq-modules-not-a-list": (AWQ, awq_spec(lambda s: s.update(modules="all")), "must be a list", True),
    "awq-8-bits": (AWQ, awq_spec(lambda s: s.update(bits=8)), "only 4", True),
    "awq-qweight-wrong-shape": (AWQ, lambda f: edit_tensors(f, lambda t: t.update({Q0 + ".qweight": t[Q0 + ".qweight"][:, :4].contiguous()})),
                                "has shape", False),
    "awq-scales-missing": (AWQ, lambda f: edit_tensors(f, lambda t: t.pop(Q0 + ".scales")), "q_proj.scales", False),
    "hf-awq-unknown-method": (HF_AWQ, config(lambda c: c["quantization_config"].update(quant_method="bitsandbytes")),
                              "bitsandbytes", True),
    "hf-awq-gemv": (HF_AWQ, config(lambda c: c["quantization_config"].update(version="gemv")), "only 4-bit GEMM", True),
    "hf-awq-packed-in-not-convert": (HF_AWQ, config(lambda c: c["quantization_config"].update(
        modules_to_not_convert=["language_model"])), "modules_to_not_convert", False),
    "qat-3-bits": (W4_QAT, config(lambda c: c["qat"].update(bits=3)), "4 or 8", True),
    "sidecar-with-code": (W4_QAT, sidecar({"x": Exploit()}), "not a plain dict of tensors", False),
    "sidecar-a-list": (W4_QAT, sidecar([torch.zeros(3)]), "dict of named tensors", False),
    "sidecar-garbage-bytes": (W8_QAT, sidecar(pickle.dumps("hello")[:5] + b"\x00garbage"), "not a plain dict of tensors",
                              False),
    "sidecar-names-absent-module": (W4_QAT, add_log_scale_for_absent_module, "layers.9.mlp.up_proj", False),
    "weights-from-another-model": (BF16, config(lambda c: c["text_config"].update(num_hidden_layers=3)),
                                   "lack.*layers.2", False),
    "weights-with-a-stray-tensor": (BF16, lambda f: edit_tensors(f, lambda t: t.update(extra=torch.zeros(2))),
                                    "does not have.*'extra'", False),
}


def copy_fixture(fixtures_dir, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(fixtures_dir / name, dst)
    for f in dst.iterdir():
        os.chmod(f, 0o644)
    return dst


@pytest.mark.parametrize("case", BREAKS)
def test_broken_checkpoint(fixtures_dir, tmp_path, case):
    fixture, breaks, message, inspect_refuses = BREAKS[case]
    folder = copy_fixture(fixtures_dir, fixture, tmp_path)
    MARKER.unlink(missing_ok=True)
    breaks(folder)
    with pytest.raises(GraceLoadError, match=message) as info:
        grace.load(folder, device="cpu")
    assert "Traceback" not in str(info.value) and str(folder) in str(info.value)
    assert not MARKER.exists()                        # nothing pickled ever ran
    if inspect_refuses:
        with pytest.raises(GraceLoadError, match=message):
            grace.inspect(folder)
    else:                                             # the break is in the weights, which inspect never reads
        assert grace.inspect(folder).format == grace.inspect(fixtures_dir / fixture).format
    assert not MARKER.exists()


def test_missing_folder(tmp_path):
    for call in (grace.load, grace.inspect):
        with pytest.raises(GraceLoadError, match="not found"):
            call(tmp_path / "nope")


def test_file_instead_of_folder(fixtures_dir):
    with pytest.raises(GraceLoadError, match="folder"):
        grace.load(fixtures_dir / "qwen3vl-tiny-bf16" / "config.json", device="cpu")


def test_offline_hub_id_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    for call in (lambda s: grace.load(s, device="cpu"), grace.inspect):
        with pytest.raises(GraceLoadError) as info:
            call("ForeverBlue/Qwen3-VL-2B-GRACE-W4G128")
        message = str(info.value)
        assert "ForeverBlue/Qwen3-VL-2B-GRACE-W4G128" in message and "hf download" in message
