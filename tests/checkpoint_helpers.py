"""Helpers shared by the loader tests of several folders (imported by name; tests/ is on sys.path)."""

import shutil


def copy_fixture(fixtures_dir, name, tmp_path):
    """A writable copy of a fixture checkpoint, to break in a test."""
    dst = tmp_path / name
    shutil.copytree(fixtures_dir / name, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def quantized_linear_bytes(loaded) -> tuple[int, int]:
    """(bytes the quantized linears hold, bytes the same linears take as bf16 weights)."""
    held = plain = 0
    for n in loaded.quantized_modules:
        m = loaded.model.get_submodule(n)
        held += sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
        plain += m.in_features * m.out_features * 2
    return held, plain
