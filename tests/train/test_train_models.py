"""Student and teacher loading: a QAT release continues from its step sizes; incompatible pairs are refused."""

import pytest
import torch

from grace.load import load
from grace.tiny import TinyConfig, save_tiny
from grace.train.config import TrainConfig
from grace.train.models import check_compatible, load_student, load_teacher


@pytest.mark.parametrize("release, bits", [("qwen3vl-tiny-grace-w4g128-qat", 4), ("qwen3vl-tiny-grace-w8g128-qat", 8)])
def test_qat_release_student_starts_from_the_released_weights(fixtures_dir, release, bits):
    """A QAT release as student starts from its sidecar step sizes: its fake-quantized weights are the
    released ones, code * exp(log_scale), not those of a fresh (different) grid."""
    from grace.distill.fake_quant import fake_quant_modules
    from grace.checkpoint_files import read_sidecar

    sidecar = read_sidecar(fixtures_dir / release / "qat_quantized_weights.bin")
    loaded, _, names = load_student(TrainConfig(student=str(fixtures_dir / release), out="x", bits=bits), "cpu")
    assert loaded.format == "grace-qat" and names
    for name, module in fake_quant_modules(loaded.model).items():
        step = sidecar[name + ".log_scale"].float().exp().reshape(module.out_features, -1, 1)
        codes = torch.round(sidecar[name + ".weight"].float().reshape(module.out_features, -1, 128) / step)
        released = (codes * step).reshape(module.out_features, module.in_features)
        assert torch.allclose(module.quantized_weight(), released, rtol=1e-6, atol=0), name


def test_packed_student_is_refused(fixtures_dir):
    with pytest.raises(ValueError, match="cannot be trained"):
        load_student(TrainConfig(student=str(fixtures_dir / "qwen3vl-tiny-grace-w4g128-awq"), out="x"), "cpu")


def test_teacher_is_frozen_and_student_trains_without_vision(tmp_path):
    path = save_tiny(tmp_path / "m", 0, TinyConfig())
    teacher = load_teacher(TrainConfig(student=str(path), teacher=str(path), out="x"), "cpu")
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    student, qat, names = load_student(TrainConfig(student=str(path), out="x", bits=8, group_size=64), "cpu")
    trainable = {n for n, p in student.model.named_parameters() if p.requires_grad}
    assert student.model.training and qat.bits == 8 and names
    assert trainable and not any("visual" in n for n in trainable)
    assert any(n.endswith("log_scale") for n in trainable)
    assert not student.model.is_activation_checkpointing
    merged, _, _ = load_student(TrainConfig(student=str(path), out="x", bits=16, train_merger=True,
                                            gradient_checkpointing=True), "cpu")
    vision = {n for n, p in merged.model.named_parameters() if p.requires_grad and "visual" in n}
    assert vision and all("merger" in n for n in vision) and merged.model.is_activation_checkpointing


def test_compatibility_check_names_the_difference(tmp_path):
    a = load(save_tiny(tmp_path / "a", 0, TinyConfig()), device="cpu")
    assert check_compatible(a, a) is None
    other_patch = load(save_tiny(tmp_path / "b", 0, TinyConfig(patch_size=8)), device="cpu")
    with pytest.raises(ValueError, match="patch_size"):
        check_compatible(a, other_patch)


def test_pixel_budget_bounds_the_image_tokens(tmp_path):
    """min_pixels / max_pixels reach the processor (and so the collator and the saved release)."""
    from PIL import Image

    path = save_tiny(tmp_path / "m", 0, TinyConfig())
    picture = Image.new("RGB", (640, 480), "white")

    def grid(**pixels):
        student, _, _ = load_student(TrainConfig(student=str(path), out="x", bits=16, **pixels), "cpu")
        return student.processor.image_processor(images=[picture], return_tensors="pt")["image_grid_thw"][0].tolist()

    t, h, w = grid(max_pixels=64 * 64)
    assert h * w * 16 * 16 <= 64 * 64 * 1.01
    t, h2, w2 = grid(min_pixels=784, max_pixels=200_704)
    assert h2 * w2 > h * w and h2 * w2 * 16 * 16 <= 200_704
