"""An original LLaVA-1.5 `config.json` (`LlavaLlamaForCausalLM`) -> transformers' `LlavaConfig`.

The language model is a Llama whose settings are the top-level keys; the vision settings are the
`mm_*` keys plus the CLIP tower's own config. transformers' Llava looks the image placeholder up in
the embedding table before replacing it, so the placeholder gets its own id, the vocabulary size
(what llava-hf does with `<image>` = 32000); the table gets that one extra row, whose value is never
used, while `lm_head` keeps the real vocabulary.
"""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from ..errors import GraceLoadError

ORIGINAL_MODEL_TYPES = ("llava_llama", "llava")
IMAGE_TOKEN = "<image>"
# Llama settings read from the top level of the original config (LLaVA-1.5 relies on these values).
LLAMA_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "max_position_embeddings", "rms_norm_eps", "rope_theta", "hidden_act", "attention_bias",
              "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "head_dim")


def is_original_llava(config: dict) -> bool:
    """The original codebase's layout (mm_* keys at the top level), not a llava-hf `LlavaConfig`."""
    return config.get("model_type") in ORIGINAL_MODEL_TYPES and "vision_config" not in config \
        and ("mm_vision_tower" in config or "mm_projector_type" in config or "mm_hidden_size" in config)


def is_llava_hf(config: dict) -> bool:
    return config.get("model_type") == "llava" and "vision_config" in config


def _check_supported(config: dict, folder) -> None:
    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise GraceLoadError(f"{folder}: LLaVA projector '{projector}' is not supported (LLaVA-1.5's mlp2x_gelu is)")
    if config.get("mm_use_im_start_end") or config.get("mm_use_im_patch_token"):
        raise GraceLoadError(f"{folder}: image start/end or patch tokens (mm_use_im_start_end / mm_use_im_patch_token)"
                             " are not supported; LLaVA-1.5 uses neither")
    aspect = config.get("image_aspect_ratio", "square")
    if aspect not in ("pad", "square", None):
        raise GraceLoadError(f"{folder}: image_aspect_ratio '{aspect}' (LLaVA-NeXT style) is not supported; "
                             "LLaVA-1.5 uses 'pad'")
    if config.get("mm_vision_select_feature", "patch") not in ("patch", "cls_patch"):
        raise GraceLoadError(f"{folder}: mm_vision_select_feature '{config['mm_vision_select_feature']}' is not supported")


def llava_config(config: dict, vision: CLIPVisionConfig, folder="the checkpoint") -> LlavaConfig:
    """Build the transformers config; `vision` is the CLIP tower's vision config."""
    _check_supported(config, folder)
    if int(config.get("mm_hidden_size", vision.hidden_size)) != vision.hidden_size:
        raise GraceLoadError(f"{folder}: mm_hidden_size {config['mm_hidden_size']} does not match the vision tower's "
                             f"hidden size {vision.hidden_size}: wrong vision tower?")
    try:
        vocab = int(config["vocab_size"])
        llama = {k: config[k] for k in LLAMA_KEYS if config.get(k) is not None}
        rope = {"rope_type": "default", "rope_theta": float(config.get("rope_theta", 10000.0))}
        if config.get("rope_scaling"):
            rope.update(config["rope_scaling"])
            rope["rope_type"] = rope.pop("type", rope.get("rope_type", "default"))
        llama.pop("rope_theta", None)
        text = LlamaConfig(**llama, vocab_size=vocab + 1, rope_parameters=rope, tie_word_embeddings=False)
    except (KeyError, TypeError, ValueError) as err:
        raise GraceLoadError(f"{folder}/config.json is not a valid LLaVA-1.5 configuration: {err}") from None
    patches = (vision.image_size // vision.patch_size) ** 2
    strategy = "default" if config.get("mm_vision_select_feature", "patch") == "patch" else "full"
    result = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab, image_seq_length=patches,
                         projector_hidden_act="gelu", vision_feature_layer=int(config.get("mm_vision_select_layer", -2)),
                         vision_feature_select_strategy=strategy, multimodal_projector_bias=True,
                         tie_word_embeddings=False)
    result.image_aspect_ratio = config.get("image_aspect_ratio", "square")
    result.original_vocab_size = vocab          # lm_head's width (the embedding table has one more row)
    result.mm_vision_tower = config.get("mm_vision_tower")
    return result


def original_config(config: LlavaConfig, torch_dtype: str = "bfloat16") -> dict:
    """The inverse: an original-codebase `config.json` (what `LlavaLlamaForCausalLM` saves) for a
    transformers LLaVA-1.5 model, e.g. one built by `grace.llava.tiny` or trained here."""
    text, vision = config.text_config, config.vision_config
    vocab = getattr(config, "original_vocab_size", text.vocab_size - 1)
    out = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama"}
    for key in LLAMA_KEYS:
        value = getattr(text, key, None)
        if value is not None and key != "head_dim":
            out[key] = value
    rope = dict(getattr(text, "rope_parameters", None) or {})
    out["rope_theta"] = float(rope.pop("rope_theta", 10000.0))
    out["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    out.update({"vocab_size": vocab, "tie_word_embeddings": False, "pretraining_tp": 1, "use_cache": True,
                "image_aspect_ratio": getattr(config, "image_aspect_ratio", "pad"),
                "mm_hidden_size": vision.hidden_size, "mm_patch_merge_type": "flat", "mm_projector_type": "mlp2x_gelu",
                "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
                "mm_vision_select_feature": "patch" if config.vision_feature_select_strategy == "default" else "cls_patch",
                "mm_vision_select_layer": config.vision_feature_layer,
                "mm_vision_tower": getattr(config, "mm_vision_tower", None) or "openai/clip-vit-large-patch14-336",
                "use_mm_proj": True, "torch_dtype": torch_dtype})
    return out
