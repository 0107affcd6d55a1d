import pytest
import torch

from grace.data.shapes import write_split
from grace.tiny import save_tiny

from train_helpers import STUDENT, TEACHER, settings


@pytest.fixture(autouse=True)
def one_thread():
    """Two shared CPU cores: a single torch thread avoids oversubscription stalls (25x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"teacher": save_tiny(root / "teacher", 1, TEACHER), "student": save_tiny(root / "student", 2, STUDENT),
            "data": write_split(root / "data", "train", 4, seed=0, image_size=128), "root": root}


@pytest.fixture(scope="session")
def grace_run(models):
    """One 24-step GRACE W4 run, shared by the tests that read its outputs."""
    from grace.train import train

    torch.set_num_threads(1)
    config = settings(models, models["root"] / "run-w4")
    return config, train(config)
