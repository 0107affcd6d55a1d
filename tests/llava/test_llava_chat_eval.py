"""grace.chat, `python -m grace chat` and grace.evaluate on a LLaVA-1.5 release."""

import json
import subprocess
import sys

from PIL import Image
from safetensors.torch import load_file

import grace
from grace.chat import GenerationSettings, answer
from grace.evaluation import EvalItem, build_prompt
from llava_helpers import LLAVA_FIXTURES, clip_tiny, copy_fixture, no_tower_env, offline_hub  # noqa: F401 (fixtures)


def test_cli_chat_answers_the_greedy_reference(fixtures_dir, tmp_path):
    folder = fixtures_dir / "llava-tiny-grace-w4g128-awq"
    tokenizer_ids = load_file(folder / "expected.safetensors")["greedy_ids"].tolist()
    code = (f"import sys; from grace.chat_cli import main; sys.exit(main(['--model', {str(folder)!r}, '--image', "
            f"{str(folder / 'image.png')!r}, '--device', 'cpu', '--max-new-tokens', '8', '--vision-tower', "
            f"{str(fixtures_dir / 'clip-tiny')!r}, 'Describe this image.']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "[int4, grace-awq" in run.stdout
    loaded = grace.load(folder, device="cpu", vision_tower=fixtures_dir / "clip-tiny")
    text = loaded.processor.tokenizer.decode(tokenizer_ids, skip_special_tokens=True).strip()
    assert text and text in run.stdout


def test_evaluate_scores_a_llava_model(fixtures_dir, monkeypatch):
    monkeypatch.setenv("GRACE_VISION_TOWER", str(fixtures_dir / "clip-tiny"))
    folder = fixtures_dir / "llava-tiny-grace-w4g128-qat"
    loaded = grace.load(folder, device="cpu")      # as evaluate loads it (bf16 activations)
    image = Image.open(folder / "image.png")
    probe = EvalItem("Describe this image.", "", image=image, kind="open")
    reference = answer(loaded, image, build_prompt(probe), GenerationSettings(max_new_tokens=8))
    assert reference.text
    items = [EvalItem("Describe this image.", reference.text, "describe", image, kind="open"),
             EvalItem("Describe this image.", "certainly not this", "describe", image, kind="open")]
    result = grace.evaluate(str(folder), items, max_new_tokens=8, device="cpu", progress=False)   # tower from the env
    assert result.n == 2 and result.accuracy == 0.5
