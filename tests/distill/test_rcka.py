"""rcka_loss against a direct per-image loop, and the hidden-state helpers on a tiny Qwen3-VL."""

import math

import pytest
import torch

from grace.distill import capture_layer_output, penultimate_hidden, rcka_loss

IMAGE = 99


def build_batch(seed, grids, images_per_row, length=80, d_student=16, d_teacher=24):
    """Random hidden states and input_ids with each image's tokens placed contiguously among text tokens."""
    g = torch.Generator().manual_seed(seed)
    counts = [t * h * w // 4 for t, h, w in grids]
    input_ids = torch.randint(0, 50, (len(images_per_row), length), generator=g)
    image = 0
    for row, n_images in enumerate(images_per_row):
        pos = 2
        for _ in range(n_images):
            input_ids[row, pos:pos + counts[image]] = IMAGE
            pos += counts[image] + 3
            image += 1
    student = torch.randn(len(images_per_row), length, d_student, generator=g)
    teacher = torch.randn(len(images_per_row), length, d_teacher, generator=g)
    teacher[..., :d_student] += 2.0 * student      # partly related, so CKA is away from 0 and 1
    return student, teacher, input_ids, torch.tensor(grids)


def loop_reference(student, teacher, input_ids, grids, merge=2):
    """Per image: cosine Gram, H K H with an explicit centring matrix, CKA; in float64."""
    positions = [(b, i) for b in range(input_ids.shape[0]) for i in range(input_ids.shape[1])
                 if input_ids[b, i] == IMAGE]
    ckas, start = [], 0
    for t, h, w in grids.tolist():
        n = t * h * w // (merge * merge)
        span, start = positions[start:start + n], start + n
        if n < 4:
            continue
        grams = []
        for hidden in (student, teacher):
            f = torch.stack([hidden[b, i].double() for b, i in span])
            f = f / f.norm(dim=1, keepdim=True)
            centre = torch.eye(n, dtype=torch.float64) - 1.0 / n
            grams.append(centre @ (f @ f.T) @ centre)
        ks, kt = grams
        ckas.append(((kt * ks).sum() / torch.sqrt((kt * kt).sum() * (ks * ks).sum())).item())
    return ckas


@pytest.mark.parametrize("seed,grids,images_per_row", [
    (0, [[1, 4, 4], [1, 6, 4], [1, 2, 2], [2, 4, 6]], [2, 2]),    # a 1-token image is skipped
    (1, [[1, 12, 12]], [1]),                                       # 36 tokens: the feature-product path
    (2, [[1, 2, 4], [1, 4, 4], [1, 8, 2], [1, 4, 8], [1, 2, 2]], [1, 0, 4]),
])
def test_matches_per_image_loop(seed, grids, images_per_row):
    student, teacher, input_ids, grid_thw = build_batch(seed, grids, images_per_row)
    loss, stats = rcka_loss(student, teacher, input_ids, grid_thw, IMAGE, merge_size=2)
    expected = loop_reference(student, teacher, input_ids, grid_thw)
    assert stats["images"] == len(expected)
    assert stats["cka_per_image"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert stats["cka"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert loss.item() == pytest.approx(sum(1 - c for c in expected) / len(expected), rel=1e-5, abs=1e-6)
    assert all(0.05 < c < 0.99 for c in expected)   # a non-trivial case


def test_merge_size_changes_the_split():
    student, teacher, input_ids, grid_thw = build_batch(3, [[1, 4, 4], [1, 4, 6]], [2])
    # merge 2: 4 + 6 tokens. Read the same 10 tokens as one image (t*h*w = 10 with merge 1): different split.
    _, split_two = rcka_loss(student, teacher, input_ids, grid_thw, IMAGE, merge_size=2)
    _, as_one = rcka_loss(student, teacher, input_ids, torch.tensor([[1, 2, 5]]), IMAGE, merge_size=1)
    assert split_two["images"] == 2 and as_one["images"] == 1
    assert as_one["cka"] != pytest.approx(split_two["cka"], rel=1e-3)


def test_gradient_flows_to_student_image_tokens_only():
    student, teacher, input_ids, grid_thw = build_batch(4, [[1, 4, 4], [1, 2, 2], [1, 6, 4]], [1, 2])
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss, _ = rcka_loss(student, teacher, input_ids, grid_thw, IMAGE)
    loss.backward()
    assert teacher.grad is None
    touched = student.grad.abs().sum(-1) > 0
    image_rows = input_ids == IMAGE
    assert not touched[~image_rows].any()                   # text tokens
    skipped = image_rows[1].nonzero().squeeze(1)[:1]        # the 1-token image opens row 1
    assert not touched[1, skipped].any()
    assert int(touched.sum()) == int(image_rows.sum()) - 1


def test_gradient_against_reference_autograd():
    student, teacher, input_ids, grid_thw = build_batch(5, [[1, 4, 4], [1, 6, 4]], [1, 1])
    leaf = student.clone().requires_grad_(True)
    rcka_loss(leaf, teacher, input_ids, grid_thw, IMAGE)[0].backward()

    ref = student.double().requires_grad_(True)
    positions = (input_ids == IMAGE).nonzero().tolist()
    losses, start = [], 0
    for n in (4, 6):
        span, start = positions[start:start + n], start + n
        fs = torch.stack([ref[b, i] for b, i in span])
        ft = torch.stack([teacher[b, i].double() for b, i in span])
        centre = torch.eye(n, dtype=torch.float64) - 1.0 / n
        ks = centre @ ((fs / fs.norm(dim=1, keepdim=True)) @ (fs / fs.norm(dim=1, keepdim=True)).T) @ centre
        kt = centre @ ((ft / ft.norm(dim=1, keepdim=True)) @ (ft / ft.norm(dim=1, keepdim=True)).T) @ centre
        losses.append(1 - (kt * ks).sum() / torch.sqrt((kt * kt).sum() * (ks * ks).sum()))
    torch.stack(losses).mean().backward()
    torch.testing.assert_close(leaf.grad, ref.grad.float(), rtol=1e-4, atol=1e-6)


def test_identical_relations_give_zero_loss_across_widths():
    student, _, input_ids, grid_thw = build_batch(6, [[1, 4, 4], [1, 4, 8]], [2])
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    teacher = torch.cat([student @ q * 3.0, torch.zeros(*student.shape[:2], 8)], dim=-1)   # rotated, scaled, wider
    loss, stats = rcka_loss(student.bfloat16(), teacher.bfloat16(), input_ids, grid_thw, IMAGE)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.0, abs=1e-2)          # bf16 rounding of the rotated copy
    loss32, _ = rcka_loss(student, teacher, input_ids, grid_thw, IMAGE)
    assert loss32.item() == pytest.approx(0.0, abs=1e-5)


def test_no_usable_image_and_count_mismatch():
    student, teacher, input_ids, grid_thw = build_batch(7, [[1, 2, 2], [1, 2, 4]], [2])   # 1 and 2 tokens
    student.requires_grad_(True)
    loss, stats = rcka_loss(student, teacher, input_ids, grid_thw, IMAGE)
    assert loss.item() == 0.0 and stats["images"] == 0 and math.isnan(stats["cka"])
    loss.backward()
    assert (student.grad == 0).all()
    text_only = torch.zeros_like(input_ids)
    loss, stats = rcka_loss(student, teacher, text_only, None, IMAGE)
    assert loss.item() == 0.0 and math.isnan(stats["cka"])
    with pytest.raises(ValueError, match="image tokens"):
        rcka_loss(student, teacher, input_ids, torch.tensor([[1, 4, 4]]), IMAGE)


@pytest.fixture(scope="module")
def tiny_pair():
    from grace.tiny import tiny_qwen3vl

    student, processor = tiny_qwen3vl(seed=0)
    teacher, _ = tiny_qwen3vl(seed=1)
    return student, teacher, processor


def test_hidden_state_indexing_on_tiny_qwen3vl(tiny_pair):
    model = tiny_pair[0]
    layers = model.model.language_model.layers
    input_ids = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(0))
    model(input_ids=input_ids, output_hidden_states=True)           # transformers installs its own hooks once
    hooks_before = len(layers[-2]._forward_hooks)
    with capture_layer_output(model, -2) as penultimate, torch.no_grad():
        with capture_layer_output(model, len(layers) - 1) as last:
            outputs = model(input_ids=input_ids, output_hidden_states=True)
    assert len(outputs.hidden_states) == len(layers) + 1
    torch.testing.assert_close(penultimate_hidden(outputs), penultimate.output, rtol=0, atol=0)
    # the last entry is the final RMSNorm of the last layer's output, not the raw output
    torch.testing.assert_close(outputs.hidden_states[-1], model.model.language_model.norm(last.output))
    assert not torch.allclose(outputs.hidden_states[-1], last.output)
    assert len(layers[-2]._forward_hooks) == hooks_before        # ours removed on exit


def test_rcka_on_tiny_qwen3vl_image_batch(tiny_pair):
    from PIL import Image

    student, teacher, processor = tiny_pair
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (64, 64), (20, 90, 220))]
    batch = processor(text=[text, text], images=images, return_tensors="pt")
    with capture_layer_output(student, -2) as captured:
        student(**batch)
    with torch.no_grad():
        teacher_hidden = penultimate_hidden(teacher(**batch, output_hidden_states=True))
    loss, stats = rcka_loss(captured.output, teacher_hidden, batch["input_ids"], batch["image_grid_thw"],
                            student.config.image_token_id, student.config.vision_config.spatial_merge_size)
    assert stats["images"] == 2 and 0.0 < stats["cka"] < 1.0
    loss.backward()
    assert student.model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("collapsed", ["teacher", "student"])
def test_a_degenerate_image_is_skipped_alone(collapsed):
    """One image whose tokens all coincide (any scale) has no structure: it is left out and counted,
    and the others give the loss they give without it, instead of a NaN for the whole term."""
    student, teacher, input_ids, grid_thw = build_batch(5, [[1, 4, 4], [1, 4, 6], [1, 4, 4]], [3])
    _, reference = rcka_loss(student, teacher, input_ids, grid_thw, IMAGE, merge_size=2)
    positions = (input_ids[0] == IMAGE).nonzero().squeeze(1)
    second = positions[4:10]                                   # the second image's 6 tokens
    broken = {"teacher": teacher.clone(), "student": student.clone()}
    target = broken[collapsed]
    target[0, second] = target[0, second[0]] * torch.arange(1.0, 7.0)[:, None]   # one direction, six lengths
    loss, stats = rcka_loss(broken["student"], broken["teacher"], input_ids, grid_thw, IMAGE, merge_size=2)
    kept = [reference["cka_per_image"][0], reference["cka_per_image"][2]]
    assert stats["degenerate"] == 1 and stats["images"] == 2 and reference["degenerate"] == 0
    assert stats["cka_per_image"] == pytest.approx(kept, rel=1e-5)
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(1 - sum(kept) / 2, rel=1e-5)
