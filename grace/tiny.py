"""Tiny Qwen3-VL models for tests and the offline zoo, and the shape-faithful Qwen3-VL-2B config.

`tiny_qwen3vl(seed)` builds a randomly initialised Qwen3-VL (the real transformers class)
with a small byte-level BPE tokenizer trained on a built-in corpus, and the processor that
goes with it; `save_tiny(...)` writes it as a plain checkpoint folder `grace.load` reads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Qwen2Tokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# A minimal Qwen-style template: user turns may hold an image and text; answers end with <|im_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Words the tiny models meet: the shapes task, chat roles, and enough English to tokenize anything bytewise.
CORPUS = """user assistant system Describe this image. What color is the circle? What color is the square?
What color is the triangle? How many shapes are there? Is there a red circle? Is there a blue square?
What shape is on the left? Answer with the option's letter from the given choices directly.
a red circle and a blue square, a green triangle, a red circle and a yellow square. yes no one two three
red green blue yellow circle square triangle shape shapes color left right image picture the a and is of
A B C D Question Options Hint answer 0 1 2 3 4 5 6 7 8 9 . , ? ! : ; ' " ( ) - the quick brown fox jumps
over the lazy dog. Hello world, this is a tiny vision language model for testing GRACE distillation."""


@dataclass
class TinyConfig:
    """Sizes of a tiny Qwen3-VL. Defaults: the zoo's working recipe (64x64 images, 4 image tokens)."""

    hidden: int = 128
    layers: int = 2
    intermediate: int = 384
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    vision_hidden: int = 128
    vision_depth: int = 2
    vision_intermediate: int = 256
    vision_heads: int = 4
    patch_size: int = 16
    merge_size: int = 2
    image_size: int = 64
    vocab_size: int = 512
    tie_word_embeddings: bool = False


def build_tokenizer(vocab_size: int = 512) -> Qwen2Tokenizer:
    """Byte-level BPE trained on CORPUS, with Qwen's special tokens (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    bpe.train_from_iterator([CORPUS] * 4, trainer=trainer)
    tokenizer = Qwen2Tokenizer(vocab=bpe.get_vocab(), merges=_merges(bpe), eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    return tokenizer


def _merges(bpe) -> list[tuple[str, str]]:
    import json

    merges = json.loads(bpe.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def build_image_processor(cfg: TinyConfig) -> Qwen2VLImageProcessorPil:
    pixels = cfg.image_size * cfg.image_size
    return Qwen2VLImageProcessorPil(patch_size=cfg.patch_size, merge_size=cfg.merge_size, temporal_patch_size=2,
                                    size={"shortest_edge": pixels, "longest_edge": pixels},
                                    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def qwen3vl_config(cfg: TinyConfig, tokenizer) -> Qwen3VLConfig:
    ids = tokenizer.convert_tokens_to_ids
    vocab = max(cfg.vocab_size, len(tokenizer))
    return Qwen3VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                          "mrope_section": _mrope_section(cfg.head_dim), "mrope_interleaved": True},
                         pad_token_id=ids("<|endoftext|>"), tie_word_embeddings=cfg.tie_word_embeddings),
        vision_config=dict(depth=cfg.vision_depth, hidden_size=cfg.vision_hidden,
                           intermediate_size=cfg.vision_intermediate, num_heads=cfg.vision_heads,
                           patch_size=cfg.patch_size, spatial_merge_size=cfg.merge_size, temporal_patch_size=2,
                           out_hidden_size=cfg.hidden, num_position_embeddings=64, deepstack_visual_indexes=[0]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=cfg.tie_word_embeddings,
    )


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (t, h, w) the way Qwen3-VL-2B does (24/20/20 of 64)."""
    half = head_dim // 2
    h = w = (half * 5) // 16
    return [half - h - w, h, w]


def tiny_qwen3vl(seed: int = 0, cfg: TinyConfig | None = None, dtype: torch.dtype = torch.float32):
    """(model, processor): a randomly initialised tiny Qwen3-VL and its processor, deterministic in `seed`."""
    from .processor import ImageOnlyQwen3VLProcessor

    cfg = cfg or TinyConfig()
    tokenizer = build_tokenizer(cfg.vocab_size)
    processor = ImageOnlyQwen3VLProcessor(build_image_processor(cfg), tokenizer, chat_template=CHAT_TEMPLATE)
    config = qwen3vl_config(cfg, tokenizer)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return model, processor


def save_checkpoint(model, processor, out_dir: str | Path, extra_config: dict | None = None) -> Path:
    """Write a plain transformers checkpoint folder with processor files and chat template."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for key, value in (extra_config or {}).items():
        setattr(model.config, key, value)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if not (out / "chat_template.jinja").is_file() and processor.chat_template:
        (out / "chat_template.jinja").write_text(processor.chat_template, encoding="utf-8")
    return out


def save_tiny(out_dir: str | Path, seed: int = 0, cfg: TinyConfig | None = None) -> Path:
    model, processor = tiny_qwen3vl(seed, cfg)
    return save_checkpoint(model.to(torch.bfloat16), processor, out_dir, {"grace_tiny": asdict(cfg or TinyConfig())})


def qwen3vl_2b_config(num_hidden_layers: int = 28) -> Qwen3VLConfig:
    """Qwen3-VL-2B-Instruct's shapes (from its config.json), optionally cut to fewer decoder layers."""
    return Qwen3VLConfig(
        text_config=dict(vocab_size=151_936, hidden_size=2048, intermediate_size=6144,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=16, num_key_value_heads=8,
                         head_dim=128, max_position_embeddings=262_144, rms_norm_eps=1e-6, hidden_act="silu",
                         rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                          "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                         tie_word_embeddings=True),
        vision_config=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048,
                           num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17],
                           hidden_act="gelu_pytorch_tanh"),
        image_token_id=151_655, video_token_id=151_656, vision_start_token_id=151_652, vision_end_token_id=151_653,
        tie_word_embeddings=True,
    )
