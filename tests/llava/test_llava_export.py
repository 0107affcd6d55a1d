"""grace.export_awq on the LLaVA QAT release writes the LLaVA AWQ release as the authors' deploy script does."""

import json

import pytest
import torch
from safetensors.torch import load_file

import grace
from llava_helpers import LLAVA_FIXTURES, clip_tiny, copy_fixture, no_tower_env, offline_hub  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def exported(fixtures_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("llava") / "LLaVA-1.5-7B-GRACE-W4G128-AWQ"
    return grace.export_awq(fixtures_dir / "llava-tiny-grace-w4g128-qat", out, vision_tower=fixtures_dir / "clip-tiny")


def test_tensors_bit_for_bit_with_the_awq_release(fixtures_dir, exported):
    release = fixtures_dir / "llava-tiny-grace-w4g128-awq"
    ours, theirs = load_file(exported / "model.safetensors"), load_file(release / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


def test_sidecar_files_and_config_match_the_release(fixtures_dir, exported):
    release = fixtures_dir / "llava-tiny-grace-w4g128-awq"
    assert (exported / "awq_quantized_modules.json").read_text() == (release / "awq_quantized_modules.json").read_text()
    ours, theirs = (json.loads((f / "config.json").read_text()) for f in (exported, release))
    ours.pop("_name_or_path"), theirs.pop("_name_or_path")
    assert ours == theirs
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (exported / name).read_bytes() == (release / name).read_bytes()


def test_export_loads_back_and_matches_the_awq_reference(fixtures_dir, exported):
    from PIL import Image

    from grace.chat import build_inputs

    release = fixtures_dir / "llava-tiny-grace-w4g128-awq"
    loaded = grace.load(exported, device="cpu", dtype=torch.float32, vision_tower=fixtures_dir / "clip-tiny")
    assert (loaded.kind, loaded.format) == ("int4", "grace-awq")
    inputs = build_inputs(loaded.processor, Image.open(release / "image.png"), "Describe this image.")
    with torch.no_grad():
        diff = (loaded.model(**inputs).logits[0] - load_file(release / "expected.safetensors")["logits"]).abs().max()
    assert diff < 1e-3


def test_cli_writes_the_hf_layout(fixtures_dir, tmp_path):
    from grace.export import main
    from transformers import AwqConfig

    assert main(["awq", str(fixtures_dir / "llava-tiny-grace-w4g128-qat"), str(tmp_path / "hf"), "--layout", "hf",
                 "--vision-tower", str(fixtures_dir / "clip-tiny")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert AwqConfig.from_dict(config["quantization_config"]).modules_to_not_convert == ["vision_tower",
                                                                                         "multi_modal_projector"]
