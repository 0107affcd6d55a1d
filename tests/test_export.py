import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import grace
from grace import GraceLoadError
from grace.export import export_awq, export_int8, save_packed
from grace.quant import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

from test_load_fixtures import reference_inputs


def fixture_logits(loaded, folder):
    with torch.no_grad():
        return loaded.model(**reference_inputs(folder, loaded.processor)).logits[0]


def test_export_awq_is_bit_exact_with_autoawq_and_loads(fixtures_dir, tmp_path):
    qat = fixtures_dir / "qwen3vl-tiny-grace-w4g128-qat"
    out = export_awq(qat, tmp_path / "awq")
    written = load_file(out / "model.safetensors")
    expected = load_file(qat / "expected_awq.safetensors")
    for key, value in expected.items():
        assert written[key].dtype == value.dtype and torch.equal(written[key], value), key
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "qat" not in config and config["awq_packing"]["bits"] == 4
    loaded = grace.load(out, device="cpu", dtype=torch.float32)
    assert loaded.kind == "int4" and loaded.format == "grace-awq"
    reference = load_file(qat / "expected.safetensors")["logits"]
    assert (fixture_logits(loaded, qat) - reference).abs().max() < 0.05


def test_export_awq_from_loaded_model(fixtures_dir, tmp_path):
    qat = fixtures_dir / "qwen3vl-tiny-grace-w4g128-qat"
    loaded = grace.load(qat, device="cpu", dtype=torch.float32)
    out = export_awq(loaded, tmp_path / "awq")
    expected = load_file(qat / "expected_awq.safetensors")
    written = load_file(out / "model.safetensors")
    assert all(torch.equal(written[k], v) for k, v in expected.items())


def test_export_int8_roundtrip(fixtures_dir, tmp_path):
    qat = fixtures_dir / "qwen3vl-tiny-grace-w8g128-qat"
    out = export_int8(qat, tmp_path / "int8")
    spec = json.loads((out / "int8_quantized_modules.json").read_text())
    assert spec["bits"] == 8 and len(spec["modules"]) == 14
    tensors = load_file(out / "model.safetensors")
    name = spec["modules"][0]
    assert tensors[name + ".qweight"].dtype == torch.int8 and tensors[name + ".scales"].dtype == torch.float32
    loaded = grace.load(out, device="cpu", dtype=torch.float32)
    assert loaded.kind == "int8" and loaded.format == "grace-int8"
    original = grace.load(qat, device="cpu", dtype=torch.float32)
    assert torch.equal(fixture_logits(loaded, qat), fixture_logits(original, qat))
    reference = load_file(qat / "expected.safetensors")["logits"]
    assert (fixture_logits(loaded, qat) - reference).abs().max() < 0.05


def test_export_rejects_wrong_kind(fixtures_dir, tmp_path):
    with pytest.raises(GraceLoadError, match="int8.*needs int4"):
        export_awq(fixtures_dir / "qwen3vl-tiny-grace-w8g128-qat", tmp_path / "x")
    with pytest.raises(GraceLoadError, match="bf16"):
        export_int8(fixtures_dir / "qwen3vl-tiny-bf16", tmp_path / "y")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("config,kind", [(Int4WeightOnlyConfig(), "int4"), (Int8WeightOnlyConfig(), "int8")])
def test_rtn_quantized_model_saves_and_reloads_identically(fixtures_dir, tmp_path, config, kind):
    folder = fixtures_dir / "qwen3vl-tiny-bf16"
    loaded = grace.load(folder, device="cpu", dtype=torch.float32)
    quantize_(loaded.model, config)
    before = fixture_logits(loaded, folder)
    out = save_packed(loaded.model, loaded.processor, tmp_path / kind)
    again = grace.load(out, device="cpu", dtype=torch.float32)
    assert again.kind == kind
    assert torch.allclose(fixture_logits(again, folder), before, atol=1e-5)


def test_cli_export(fixtures_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "grace", "export", "awq",
                             str(fixtures_dir / "qwen3vl-tiny-grace-w4g128-qat"), str(tmp_path / "cli")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cli" / "awq_quantized_modules.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "grace", "export", "awq", str(tmp_path / "missing"), str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "not found" in bad.stderr and "Traceback" not in bad.stderr
