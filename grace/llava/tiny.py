"""Tiny LLaVA-1.5 models of any size, for tests and training pairs, in the original release layout.

`tiny_llava(seed, cfg)` builds a random transformers `LlavaForConditionalGeneration` with a tiny CLIP
tower, a SentencePiece BPE tokenizer trained here with Llama's options (byte fallback, <unk>/<s>/</s>
= 0/1/2, dummy prefix), and its processor. `save_tiny_llava(folder, ...)` writes it as the original
LLaVA codebase would (`LlavaLlamaForCausalLM` names, `mm_*` config, `tokenizer.model`) next to a
CLIP tower folder, the pair `grace.load(folder, vision_tower=tower)` reads.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig

from ..tiny import CORPUS
from . import naming
from .config import llava_config, original_config
from .processor import build_processor

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TOKENIZER_CONFIG = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                    "unk_token": "<unk>", "pad_token": "<unk>", "legacy": True, "model_max_length": 2048,
                    "padding_side": "right", "clean_up_tokenization_spaces": False, "sp_model_kwargs": {},
                    "tokenizer_class": "LlamaTokenizer"}


@dataclass
class TinyLlavaConfig:
    hidden: int = 128
    layers: int = 2
    intermediate: int = 256
    heads: int = 4
    kv_heads: int = 4
    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    vision_intermediate: int = 256
    image_size: int = 56
    patch_size: int = 14
    vocab_size: int = 400


def train_tokenizer(folder: Path, vocab_size: int = 400) -> Path:
    """A SentencePiece BPE `tokenizer.model` with Llama's options, trained on the tiny corpus (deterministic)."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 4), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, hard_vocab_limit=False,
        character_coverage=1.0, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        num_threads=1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2), encoding="utf-8")
    return folder / "tokenizer.model"


def clip_preprocessor(image_size: int) -> dict:
    """CLIP's old feature-extractor style preprocessor_config.json, as openai/clip-vit-large-patch14-336 has it."""
    return {"crop_size": image_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
            "resample": 3, "size": image_size}


def _original_dict(cfg: TinyLlavaConfig, vocab: int) -> dict:
    return {"model_type": "llava_llama", "hidden_size": cfg.hidden, "intermediate_size": cfg.intermediate,
            "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "vocab_size": vocab, "image_aspect_ratio": "pad",
            "mm_hidden_size": cfg.vision_hidden, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch", "mm_vision_tower": "openai/clip-vit-large-patch14-336"}


def tiny_llava(seed: int = 0, cfg: TinyLlavaConfig | None = None, workdir: str | Path | None = None,
               dtype: torch.dtype = torch.float32):
    """(model, processor) of a random tiny LLaVA-1.5; the tokenizer files live in `workdir` (a temp folder by default)."""
    import tempfile

    from transformers import LlavaForConditionalGeneration

    from .load import build_empty

    cfg = cfg or TinyLlavaConfig()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="tiny-llava-"))
    train_tokenizer(workdir, cfg.vocab_size)
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(workdir / "tokenizer.model")).get_piece_size()
    vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_intermediate,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                              image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5)
    config = llava_config(_original_dict(cfg, vocab), vision)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(dtype)
    if model.lm_head.out_features != vocab:   # as grace.load builds it: lm_head over the real vocabulary only
        head = build_empty(config, dtype).lm_head
        model.lm_head = torch.nn.Linear(head.in_features, vocab, bias=False, dtype=dtype)
    model.eval()
    processor = build_processor(workdir, config, clip_preprocessor(cfg.image_size))
    return model, processor


def save_tower(model, folder: str | Path) -> Path:
    """The model's vision tower as a CLIP vision checkpoint folder (`vision_model.*` names)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "model.vision_tower."
    tensors = {naming.CLIP_VISION_PREFIX + k[len(prefix):]: v.detach().float().contiguous()
               for k, v in model.state_dict().items() if k.startswith(prefix)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    vision = model.config.vision_config.to_dict()
    vision.update(model_type="clip_vision_model", architectures=["CLIPVisionModel"])
    (folder / "config.json").write_text(json.dumps(vision, indent=2), encoding="utf-8")
    image_size = model.config.vision_config.image_size
    (folder / "preprocessor_config.json").write_text(json.dumps(clip_preprocessor(image_size), indent=2), encoding="utf-8")
    return folder


def copy_tokenizer(processor, folder: Path) -> None:
    """tokenizer.model and the 4.37-style tokenizer config, from where the processor's tokenizer was read."""
    source = Path(processor.tokenizer.vocab_file)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, folder / "tokenizer.model")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (source.parent / name).is_file():
            shutil.copyfile(source.parent / name, folder / name)
    if not (folder / "tokenizer_config.json").is_file():
        (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2), encoding="utf-8")


def original_tensors(model, dtype: torch.dtype = torch.bfloat16, with_tower_copy: bool = True) -> dict:
    """The model's plain tensors under the original LLaVA names (the placeholder's embedding row dropped)."""
    vocab = model.lm_head.out_features
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.vision_tower.") and not with_tower_copy:
            continue
        name = naming.to_original(key)
        if name is None:
            continue
        value = value.detach().cpu()
        if key == "model.language_model.embed_tokens.weight":
            value = value[:vocab]
        out[name] = (value.to(dtype) if value.is_floating_point() else value).contiguous()
    return out


def save_tiny_llava(folder: str | Path, tower_folder: str | Path | None = None, seed: int = 0,
                    cfg: TinyLlavaConfig | None = None) -> tuple[Path, Path]:
    """A plain tiny LLaVA-1.5 checkpoint in the original layout and its CLIP tower: (folder, tower folder)."""
    folder = Path(folder)
    tower_folder = Path(tower_folder or folder.with_name(folder.name + "-clip"))
    model, processor = tiny_llava(seed, cfg, workdir=folder)
    save_original(model, processor, folder)
    save_tower(model, tower_folder)
    return folder, tower_folder


def save_original(model, processor, folder: str | Path, tensors: dict | None = None, extra_config: dict | None = None,
                  torch_dtype: str = "bfloat16") -> Path:
    """Write `model` as the original codebase saves it (tensors default: `original_tensors(model)`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if Path(processor.tokenizer.vocab_file).resolve() != (folder / "tokenizer.model").resolve():
        copy_tokenizer(processor, folder)
    tensors = original_tensors(model) if tensors is None else tensors
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = original_config(model.config, torch_dtype)
    config.update(extra_config or {})
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}),
                                                   encoding="utf-8")
    return folder


def save_tiny_llava_pair(root: str | Path, teacher_cfg: TinyLlavaConfig, student_cfg: TinyLlavaConfig,
                         seed: int = 0) -> tuple[Path, Path, Path]:
    """A teacher and a student LLaVA-1.5 of any (language model) sizes that can be distilled into each
    other, as LLaVA-1.5-13B -> 7B: one tokenizer, one CLIP tower. Returns (teacher, student, tower) folders."""
    root = Path(root)
    vision = ("vision_hidden", "vision_layers", "vision_heads", "vision_intermediate", "image_size", "patch_size",
              "vocab_size")
    if any(getattr(teacher_cfg, k) != getattr(student_cfg, k) for k in vision):
        raise ValueError(f"teacher and student must share the vision tower and vocabulary ({', '.join(vision)})")
    teacher, processor = tiny_llava(seed, teacher_cfg, workdir=root / "teacher")
    student, student_processor = tiny_llava(seed + 1, student_cfg, workdir=root / "student")
    tower = {k: v for k, v in teacher.state_dict().items() if k.startswith("model.vision_tower.")}
    student.load_state_dict(tower, strict=False)
    save_original(teacher, processor, root / "teacher")
    save_original(student, student_processor, root / "student")
    return root / "teacher", root / "student", save_tower(teacher, root / "clip")
