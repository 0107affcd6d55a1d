"""grace.inspect: format, kind, bits, group size, quantized-module count and architecture, no weights read."""

import json
import shutil
from fnmatch import fnmatch

import pytest
import torch

import grace
from grace import CheckpointInfo

# fixture: (format, kind, bits, group size)
EXPECTED = {
    "qwen3vl-tiny-bf16": ("plain", "bf16", 16, None),
    "qwen3vl-tiny-grace-w4g128-awq": ("grace-awq", "int4", 4, 128),
    "qwen3vl-tiny-hf-awq": ("hf-awq", "int4", 4, 128),
    "qwen3vl-tiny-grace-w4g128-qat": ("grace-qat", "int4", 4, 128),
    "qwen3vl-tiny-grace-w8g128-qat": ("grace-qat", "int8", 8, 128),
}


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Every way grace reads tensors or pickles fails loudly while the test runs."""
    import safetensors
    import grace.checkpoint_files as files

    def refuse(*args, **kwargs):
        raise AssertionError("a weight file was read")

    monkeypatch.setattr(files, "read_tensors", refuse)
    monkeypatch.setattr(files, "read_sidecar", refuse)
    monkeypatch.setattr(files, "safe_open", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize("name", EXPECTED)
def test_inspect_fixture_agrees_with_load(fixtures_dir, name, no_weight_reads, monkeypatch):
    info = grace.inspect(fixtures_dir / name)
    assert isinstance(info, CheckpointInfo)
    assert (info.format, info.kind, info.bits, info.group_size) == EXPECTED[name]
    assert info.architecture == "Qwen3VLForConditionalGeneration" and info.model_type == "qwen3_vl"
    assert info.path == fixtures_dir / name
    with pytest.raises(AssertionError, match="weight file was read"):
        grace.load(fixtures_dir / name, device="cpu")  # (the guard does catch a reader)
    monkeypatch.undo()                                  # now load it for real and compare
    loaded = grace.load(fixtures_dir / name, device="cpu", dtype=torch.float32)
    assert (info.format, info.kind) == (loaded.format, loaded.kind)
    assert info.quantized_modules == len(loaded.quantized_modules)
    assert info.quantized_modules == (0 if name.endswith("bf16") else 14)


def test_inspect_counts_from_headers_when_the_json_does_not_say(fixtures_dir, tmp_path, no_weight_reads):
    folder = tmp_path / "qat"
    shutil.copytree(fixtures_dir / "qwen3vl-tiny-grace-w4g128-qat", folder)
    config = json.loads((folder / "config.json").read_text())
    del config["qat"]["num_replaced"]
    config["qat"]["skip_keywords"] = ["visual", "lm_head", "embed_tokens", "mlp"]   # attention only
    (folder / "config.json").chmod(0o644)
    (folder / "config.json").write_text(json.dumps(config))
    assert grace.inspect(folder).quantized_modules == 8                              # 2 layers x q/k/v/o


def test_inspect_an_exported_int8_checkpoint(fixtures_dir, tmp_path):
    out = grace.export_int8(fixtures_dir / "qwen3vl-tiny-grace-w8g128-qat", tmp_path / "int8")
    info = grace.inspect(out)
    assert (info.format, info.kind, info.bits, info.group_size, info.quantized_modules) == ("grace-int8", "int8", 8, 128, 14)


def fake_hub(fixtures_dir, tmp_path, monkeypatch, fixture):
    """snapshot_download that copies only the files its allow_patterns name, as the Hub would send them."""
    import huggingface_hub

    asked = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        asked.append(list(allow_patterns))
        folder = tmp_path / "snapshot"
        folder.mkdir(exist_ok=True)
        for f in (fixtures_dir / fixture).iterdir():
            if any(fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, folder / f.name)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return asked


def test_inspect_a_hub_id_fetches_only_json(fixtures_dir, tmp_path, monkeypatch):
    asked = fake_hub(fixtures_dir, tmp_path, monkeypatch, "qwen3vl-tiny-grace-w4g128-awq")
    info = grace.inspect("ForeverBlue/Qwen3-VL-2B-GRACE-W4G128-AWQ")
    assert asked == [["*.json"]]
    assert sorted(p.suffix for p in info.path.iterdir()) == [".json"] * 7
    assert (info.source, info.format, info.kind, info.quantized_modules) == (
        "ForeverBlue/Qwen3-VL-2B-GRACE-W4G128-AWQ", "grace-awq", "int4", 14)


def test_inspect_a_hub_hf_awq_counts_from_the_remote_header(fixtures_dir, tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo
    from grace.checkpoint_files import read_safetensors_header

    fake_hub(fixtures_dir, tmp_path, monkeypatch, "qwen3vl-tiny-hf-awq")
    header = read_safetensors_header(fixtures_dir / "qwen3vl-tiny-hf-awq" / "model.safetensors")
    tensors = {k: TensorInfo(dtype=v["dtype"], shape=v["shape"], data_offsets=(0, 0)) for k, v in header.items()}
    remote = SafetensorsRepoMetadata(metadata=None, sharded=False, weight_map={k: "model.safetensors" for k in header},
                                     files_metadata={"model.safetensors": SafetensorsFileMetadata({}, tensors)})
    monkeypatch.setattr(HfApi, "get_safetensors_metadata", lambda self, repo_id, revision=None: remote)
    assert grace.inspect("someone/qwen3vl-awq").quantized_modules == 14

    def offline(self, repo_id, revision=None):
        raise OSError("no network")

    monkeypatch.setattr(HfApi, "get_safetensors_metadata", offline)
    info = grace.inspect("someone/qwen3vl-awq")
    assert info.format == "hf-awq" and info.quantized_modules is None          # unknown, not a guess


def test_inspect_is_public_and_eval_is_not_exported():
    assert "inspect" in grace.__all__ and "CheckpointInfo" in grace.__all__
    assert "eval" not in grace.__all__ and not hasattr(grace, "eval")
    namespace = {}
    exec("from grace import *", namespace)
    assert "eval" not in namespace                     # the builtin is not shadowed


@pytest.mark.parametrize("damage", [b"", b"\x08\x00\x00\x00\x00\x00\x00\x00[1, 2]  ", b"\xff" * 8 + b"{}"])
def test_inspect_a_damaged_header_says_which_file(fixtures_dir, tmp_path, damage):
    """hf-awq counts its packed tensors from the headers: a header it cannot read is a plain error."""
    folder = tmp_path / "hf-awq"
    shutil.copytree(fixtures_dir / "qwen3vl-tiny-hf-awq", folder)
    (folder / "model.safetensors").chmod(0o644)
    (folder / "model.safetensors").write_bytes(damage)
    with pytest.raises(grace.GraceLoadError, match="model.safetensors is not a readable safetensors file"):
        grace.inspect(folder)
