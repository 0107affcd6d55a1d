"""grace.formats: the format table recognises every fixture, and adding a format is one entry."""

from pathlib import Path

import pytest
import torch

import grace
from grace import formats
from grace.checkpoint_files import read_config

from conftest import CHECKPOINTS

FORMAT_OF = {"qwen3vl-tiny-bf16": "plain", "qwen3vl-tiny-grace-w4g128-awq": "grace-awq", "qwen3vl-tiny-hf-awq": "hf-awq",
             "qwen3vl-tiny-grace-w4g128-qat": "grace-qat", "qwen3vl-tiny-grace-w8g128-qat": "grace-qat"}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_each_fixture_is_recognised_by_exactly_its_entry(fixtures_dir, name):
    folder = fixtures_dir / name
    config = read_config(folder)
    fmt, info = formats.detect_format(folder, config)
    assert fmt.name == info.format == FORMAT_OF[name] and info.kind == CHECKPOINTS[name]
    # the entries before the winner do not claim it: order only breaks real ties
    earlier = formats.FORMATS[:formats.FORMATS.index(fmt)]
    assert not any(f.recognise(folder, config) for f in earlier)


def test_table_names_are_unique_and_plain_is_last():
    names = [f.name for f in formats.FORMATS]
    assert len(names) == len(set(names)) and names[-1] == "plain"


def test_adding_a_format_is_one_entry(fixtures_dir, tmp_path, monkeypatch):
    """A made-up format: plain weights plus a marker file, whose loader halves every q_proj on load."""
    import shutil

    folder = tmp_path / "marked"
    shutil.copytree(fixtures_dir / "qwen3vl-tiny-bf16", folder)
    (folder / "halved.json").write_text("{}")

    def place_halved(model, info, tensors, folder, device, dtype):
        for key in [k for k in tensors if k.endswith("q_proj.weight")]:
            tensors[key] = tensors[key] / 2

    entry = formats.CheckpointFormat("halved", lambda f, c: (Path(f) / "halved.json").is_file(),
                                     lambda f, c: formats.FormatInfo("halved", "bf16"), place_halved)
    monkeypatch.setattr(formats, "FORMATS", [entry, *formats.FORMATS])
    loaded = grace.load(folder, device="cpu", dtype=torch.float32)
    plain = grace.load(fixtures_dir / "qwen3vl-tiny-bf16", device="cpu", dtype=torch.float32)
    assert loaded.format == "halved" and grace.inspect(folder).format == "halved"
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(loaded.model.state_dict()[q], plain.model.state_dict()[q] / 2)
