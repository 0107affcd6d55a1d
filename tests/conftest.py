import os
import sys
from pathlib import Path

import pytest
import torch

# Tests live in folders that mirror the source (tests/train/, tests/distill/, ...); their shared helpers
# (alt_shapes.py, app_server.py, ...) stay in tests/ and import from there wherever a test sits.
sys.path.insert(0, str(Path(__file__).resolve().parent))

FIXTURES = Path(os.environ.get("GRACE_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
CHECKPOINTS = {
    "qwen3vl-tiny-bf16": "bf16",
    "qwen3vl-tiny-grace-w4g128-awq": "int4",
    "qwen3vl-tiny-hf-awq": "int4",
    "qwen3vl-tiny-grace-w4g128-qat": "int4",
    "qwen3vl-tiny-grace-w8g128-qat": "int8",
}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"checkpoint fixtures not found at {FIXTURES} (set GRACE_FIXTURES)")
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A plain tiny Qwen3-VL checkpoint made by grace.tiny (seed 0)."""
    from grace.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-seed0", seed=0)
