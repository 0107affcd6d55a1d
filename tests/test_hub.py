"""Hub ids resolve through huggingface_hub's cache (populated here by hand, as a download would)."""

import shutil

import torch

import grace
from grace.hub import is_repo_id


def test_repo_id_recognition():
    assert is_repo_id("ForeverBlue/Qwen3-VL-2B-GRACE-W4G128-AWQ")
    assert not is_repo_id("./local/folder") and not is_repo_id("/abs/path") and not is_repo_id("plain")


def test_cached_repo_loads_offline(fixtures_dir, tmp_path, monkeypatch):
    """A repo already in the HF cache loads with the network off, through snapshot_download."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    snapshot = cache / "models--ForeverBlue--Qwen3-VL-2B-GRACE-W4G128-AWQ" / "snapshots" / ("0" * 40)
    shutil.copytree(fixtures_dir / "qwen3vl-tiny-grace-w4g128-awq", snapshot)
    (cache / "models--ForeverBlue--Qwen3-VL-2B-GRACE-W4G128-AWQ" / "refs").mkdir()
    (cache / "models--ForeverBlue--Qwen3-VL-2B-GRACE-W4G128-AWQ" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    loaded = grace.load("ForeverBlue/Qwen3-VL-2B-GRACE-W4G128-AWQ", device="cpu", dtype=torch.float32)
    assert loaded.kind == "int4" and loaded.source == "ForeverBlue/Qwen3-VL-2B-GRACE-W4G128-AWQ"
    assert loaded.path == snapshot
