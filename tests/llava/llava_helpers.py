"""Shared by the LLaVA tests (imported by name: a conftest.py here would shadow tests/conftest.py as `conftest`)."""

from checkpoint_helpers import copy_fixture  # noqa: F401 (re-exported for the LLaVA tests)

import pytest

LLAVA_FIXTURES = {"llava-tiny-grace-w4g128-qat": "grace-qat", "llava-tiny-grace-w4g128-awq": "grace-awq"}


@pytest.fixture
def clip_tiny(fixtures_dir):
    return fixtures_dir / "clip-tiny"


@pytest.fixture(autouse=True)
def no_tower_env(monkeypatch):
    monkeypatch.delenv("GRACE_VISION_TOWER", raising=False)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """The Hub unreachable and an empty cache: only what the test puts in `tmp_path / 'hf-cache'` exists."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


