"""LLaVA-1.5 pairs for GRACE training: the tiny pair builder, the collator, QAT of the language model,
the GRACE objectives over a few optimizer steps, and the QAT release -> AWQ path."""

import torch
from PIL import Image

import grace
from grace.distill import QATConfig, apply_qat, freeze_vision, gated_dkd_loss, rcka_loss
from grace.distill.hidden import capture_layer_output, decoder_layers
from grace.llava.export import save_llava_qat_release
from grace.llava.tiny import TinyLlavaConfig, save_tiny_llava_pair, tiny_llava
from grace.llava.training import (QAT_SKIP_KEYWORDS, VISION_KEYWORD, LlavaCollator, image_grid, tokens_per_image)
from llava_helpers import LLAVA_FIXTURES, clip_tiny, copy_fixture, no_tower_env, offline_hub  # noqa: F401 (fixtures)

RECORDS = [{"id": 0, "image": Image.new("RGB", (60, 40), "red"),
            "conversations": [{"from": "human", "value": "<image>\nWhat color is the square?"},
                              {"from": "gpt", "value": "red"},
                              {"from": "human", "value": "Is there a circle?"}, {"from": "gpt", "value": "no"}]},
           {"id": 1, "image": Image.new("RGB", (30, 70), "blue"),
            "conversations": [{"from": "human", "value": "What color is the circle?\n<image>"},
                              {"from": "gpt", "value": "a blue circle"}]}]


def test_pair_collator_qat_and_a_few_grace_steps(tmp_path):
    teacher_dir, student_dir, tower = save_tiny_llava_pair(
        tmp_path, TinyLlavaConfig(hidden=256, layers=3, intermediate=512, heads=4, kv_heads=2),
        TinyLlavaConfig(hidden=128, layers=2, intermediate=256, heads=4, kv_heads=4), seed=4)
    teacher = grace.load(teacher_dir, device="cpu", dtype=torch.float32, vision_tower=tower)
    student = grace.load(student_dir, device="cpu", dtype=torch.float32, vision_tower=tower)
    assert teacher.processor.tokenizer.get_vocab() == student.processor.tokenizer.get_vocab()

    batch = LlavaCollator(student.processor)(RECORDS)
    ids, labels = batch["input_ids"], batch["labels"]
    per_image = tokens_per_image(student.model.config)
    assert (ids == student.model.config.image_token_index).sum(1).tolist() == [per_image, per_image]
    assert (ids[:, 0] == 1).all() and int((ids == 1).sum()) == 2                  # BOS once per sequence
    tok = student.processor.tokenizer
    answers = [tok.decode(ids[r][labels[r] != -100]) for r in range(2)]
    assert [a.strip() for a in answers[0].split("</s>")] == ["red", "no", ""]     # each answer through its </s>
    assert answers[1].strip() == "a blue circle</s>"
    assert (labels[:, :5] == -100).all()

    model = student.model
    freeze_vision(model, VISION_KEYWORD)
    qat = QATConfig(bits=4, group_size=128, skip_keywords=QAT_SKIP_KEYWORDS)
    names = apply_qat(model, qat)
    assert len(names) == 7 * 2 and all(n.startswith("model.language_model.layers.") for n in names)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert not any(p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n)
    optimizer = torch.optim.AdamW(trainable, lr=2e-3)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    grid = image_grid(model.config, batch["pixel_values"].shape[0])
    losses = []
    with capture_layer_output(model, len(decoder_layers(model)) - 1) as s_cap, \
            capture_layer_output(teacher.model, len(decoder_layers(teacher.model)) - 1) as t_cap:
        for _ in range(4):
            logits = model(**inputs).logits
            with torch.no_grad():
                t_logits = teacher.model(**inputs).logits[..., : logits.shape[-1]]
            mask = labels[:, 1:] != -100
            ce = torch.nn.functional.cross_entropy(logits[:, :-1][mask], labels[:, 1:][mask])
            gdkd, gate = gated_dkd_loss(logits, t_logits, labels, 2.0, 1.0, 4.0)
            rcka, stats = rcka_loss(s_cap.output, t_cap.output, ids, grid, model.config.image_token_index, 1)
            loss = ce + 0.5 * gdkd + 0.5 * rcka
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(ce.item())
            assert torch.isfinite(loss) and 0 <= stats["cka"] <= 1
    assert losses[-1] < losses[0]

    release = save_llava_qat_release(model, student.processor, tmp_path / "release", qat)
    loaded = grace.load(release, device="cpu", dtype=torch.float32, vision_tower=tower)
    assert (loaded.kind, loaded.format, len(loaded.quantized_modules)) == ("int4", "grace-qat", 14)
    model.eval()
    with torch.no_grad():
        diff = (loaded.model(**inputs).logits - model(**inputs).logits).abs().max().item()
    assert diff < 0.05        # bf16-stored plain tensors; the INT4 codes are exact
    awq = grace.export_awq(release, tmp_path / "awq", vision_tower=tower)
    assert grace.load(awq, device="cpu", vision_tower=tower).format == "grace-awq"


def test_trainer_questions_answered_per_architecture(tmp_path):
    from grace.data.conversations import Collator
    from grace.llava import training
    from grace.tiny import tiny_qwen3vl

    llava, processor = tiny_llava(0, workdir=tmp_path)
    qwen, qwen_processor = tiny_qwen3vl(0)
    assert training.vision_keyword(llava) == "vision_tower" and training.vision_keyword(qwen) == "visual"
    assert training.projector_keyword(llava) == "multi_modal_projector" and training.projector_keyword(qwen) == "merger"
    assert training.qat_skip_keywords(qwen, ("visual",)) == ("visual",)
    assert isinstance(training.collator(processor), LlavaCollator)
    assert isinstance(training.collator(qwen_processor), Collator)
    assert training.release_name(llava, "model.language_model.layers.0.mlp.up_proj") == "model.layers.0.mlp.up_proj"
    batch = LlavaCollator(processor)(RECORDS[:1])
    grid, merge = training.rcka_image_grid(llava, batch)
    assert merge == 1 and grid.tolist() == [[1, 16, 1]]
