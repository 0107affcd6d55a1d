"""llava-hf checkpoints (the fp16 reference column, llava-hf/llava-1.5-7b-hf), in both transformers namings."""

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

import grace
from grace.chat import build_inputs
from grace.llava.tiny import TinyLlavaConfig, tiny_llava
from llava_helpers import LLAVA_FIXTURES, clip_tiny, copy_fixture, no_tower_env, offline_hub  # noqa: F401 (fixtures)


@pytest.mark.parametrize("naming", ["as-saved", "transformers-4", "in-memory"])
def test_llava_hf_checkpoint_loads(tmp_path, naming):
    student, processor = tiny_llava(2, TinyLlavaConfig(image_size=28), workdir=tmp_path / "tok")
    torch.manual_seed(2)
    model = LlavaForConditionalGeneration(student.config).eval()      # llava-hf: lm_head covers <image> too
    model.save_pretrained(tmp_path / "hf")
    processor.save_pretrained(tmp_path / "hf")
    # as saved by transformers 5: language_model.model.*, language_model.lm_head, vision_tower.*, multi_modal_projector.*
    if naming == "transformers-4":   # ... and vision_tower.vision_model.*
        tensors = load_file(tmp_path / "hf" / "model.safetensors")
        renamed = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in tensors.items()}
        save_file(renamed, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    elif naming == "in-memory":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "hf" / "model.safetensors"),
                  metadata={"format": "pt"})
    loaded = grace.load(tmp_path / "hf", device="cpu", dtype=torch.float32)
    assert (loaded.kind, loaded.format, loaded.packed) == ("bf16", "plain", False)
    image = Image.new("RGB", (50, 30), (10, 200, 30))
    inputs = build_inputs(loaded.processor, image, "What is it?")
    assert torch.equal(inputs["input_ids"], build_inputs(processor, image, "What is it?")["input_ids"])
    with torch.no_grad():
        assert torch.allclose(loaded.model(**inputs).logits, model(**inputs).logits, atol=1e-5)
