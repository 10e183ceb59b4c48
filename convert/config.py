"""Config in, config out: the converted ``config.json`` from the ORIGINAL config and the vision model's config.

The dict is written by hand, with the key names every transformers release reads (``vision_feature_layers``,
``rope_theta``, ``torch_dtype``); 5.x maps the legacy names onto its own. Text settings come from the ORIGINAL
``config.json`` (its ``rms_norm_eps`` of 1e-5 differs from some Llama defaults), vision settings from the vision
model's config (never from a class default).
"""

from __future__ import annotations

from dataclasses import dataclass

from .backbones import VICUNA, Backbone
from .errors import ConversionError

FEATURE_LAYERS = (-2, -5, -8, -11, 6)
ROW_MULTIPLE = 64
_TEXT_KEYS_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_VISION_KEYS_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")


def padded_rows(vocab: int, multiple: int = ROW_MULTIPLE) -> int:
    """Rows after adding ``<image>`` and ``<pad>``, rounded up to ``multiple``."""
    return -(-(vocab + 2) // multiple) * multiple


@dataclass(frozen=True)
class TokenIds:
    """Token layout after conversion. ``<image>`` and ``<pad>`` follow the base tokenizer's last token; the
    matrices grow only when those ids do not fit in the original rows (Phi-3's 32064 rows hold its 32011 tokens
    and both new ids)."""

    vocab: int  # embedding rows of the original checkpoint
    bos: int | None
    eos: int | list[int] | None
    tokens: int | None = None  # tokens of the base tokenizer (None: as many as rows)

    @property
    def image(self) -> int:
        return self.vocab if self.tokens is None else self.tokens

    @property
    def pad(self) -> int:
        return self.image + 1

    @property
    def rows(self) -> int:
        return max(self.vocab, padded_rows(self.image))


def vision_tower_config(vision_model_config: dict, where: str) -> dict:
    """The CLIP vision settings from a full CLIP config (``model_type: clip``) or a bare vision config."""
    mt = vision_model_config.get("model_type")
    if mt == "clip":
        vc = vision_model_config.get("vision_config")
        if not isinstance(vc, dict):
            raise ConversionError(f"{where}: CLIP config without a vision_config; pass a CLIP vision model")
    elif mt == "clip_vision_model":
        vc = vision_model_config
    else:
        raise ConversionError(f"{where}: expected a CLIP config (model_type clip or clip_vision_model), found {mt!r}")
    missing = [k for k in _VISION_KEYS_REQUIRED if k not in vc]
    if missing:
        raise ConversionError(f"{where}: vision_config lacks {', '.join(missing)}")
    return {
        "model_type": "clip_vision_model",
        "hidden_size": vc["hidden_size"],
        "intermediate_size": vc["intermediate_size"],
        "num_hidden_layers": vc["num_hidden_layers"],
        "num_attention_heads": vc["num_attention_heads"],
        "num_channels": vc.get("num_channels", 3),
        "image_size": vc["image_size"],
        "patch_size": vc["patch_size"],
        "hidden_act": vc.get("hidden_act", "quick_gelu"),
        "layer_norm_eps": vc.get("layer_norm_eps", 1e-5),
        "attention_dropout": vc.get("attention_dropout", 0.0),
        "projection_dim": vc.get("projection_dim", 768),
    }


def check_original_config(original: dict, where: str) -> None:
    missing = [k for k in _TEXT_KEYS_REQUIRED if k not in original]
    if missing:
        raise ConversionError(f"{where}: lacks {', '.join(missing)}; expected the config.json of a ViP-LLaVA checkpoint")
    if "mm_hidden_size" not in original:
        raise ConversionError(
            f"{where}: no mm_hidden_size; this is not a multimodal LLaVA config (model_type "
            f"{original.get('model_type')!r}); pass the original ViP-LLaVA checkpoint folder"
        )


def build_config(original: dict, vision: dict, ids: TokenIds, dtype: str, where: str, backbone: Backbone = VICUNA) -> dict:
    """The converted ``config.json`` as a plain dict (sorted when written)."""
    check_original_config(original, where)
    n_layers = len(FEATURE_LAYERS)
    if vision["hidden_size"] * n_layers != original["mm_hidden_size"]:
        raise ConversionError(
            f"{where}: mm_hidden_size is {original['mm_hidden_size']} but the vision model's hidden_size "
            f"{vision['hidden_size']} x {n_layers} feature layers = {vision['hidden_size'] * n_layers}; "
            "pass the vision model this checkpoint was trained with"
        )
    states = vision["num_hidden_layers"] + 1  # hidden_states: the embeddings' output, then one per layer
    out_of_range = [i for i in FEATURE_LAYERS if not -states <= i < states]
    if out_of_range:
        raise ConversionError(
            f"{where}: the vision model has {vision['num_hidden_layers']} layers, too few for feature layers "
            f"{list(FEATURE_LAYERS)} (index {out_of_range[0]} is out of range); pass the vision model this checkpoint was trained with"
        )
    if vision["image_size"] % vision["patch_size"]:
        raise ConversionError(f"{where}: image_size {vision['image_size']} is not a multiple of patch_size {vision['patch_size']}")
    heads = original["num_attention_heads"]
    text = {
        "model_type": backbone.text_model_type,
        "architectures": [backbone.text_architecture],
        "vocab_size": ids.rows,
        "hidden_size": original["hidden_size"],
        "intermediate_size": original["intermediate_size"],
        "num_hidden_layers": original["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": original.get("num_key_value_heads") or heads,
        "hidden_act": original.get("hidden_act", "silu"),
        "max_position_embeddings": original.get("max_position_embeddings", 4096),
        "rms_norm_eps": original.get("rms_norm_eps", 1e-6),
        "rope_theta": original.get("rope_theta", 10000.0),
        "rope_scaling": original.get("rope_scaling"),
        "attention_dropout": original.get("attention_dropout", 0.0),
        "initializer_range": original.get("initializer_range", 0.02),
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos,
        "pad_token_id": ids.pad,
        "torch_dtype": dtype,
    }
    for key, default in backbone.text_fields:
        text[key] = original.get(key, default)
    if "head_dim" in text and text["head_dim"] is None:
        text["head_dim"] = original["hidden_size"] // heads
    if original.get("tie_word_embeddings"):
        raise ConversionError(f"{where}: tie_word_embeddings is true; ViP-LLaVA checkpoints have a separate lm_head")
    grid = vision["image_size"] // vision["patch_size"]
    return {
        "architectures": ["VipLlavaForConditionalGeneration"],
        "model_type": "vipllava",
        "text_config": text,
        "vision_config": vision,
        "image_token_index": ids.image,
        "pad_token_id": ids.pad,
        "projector_hidden_act": "gelu",
        "projector_layernorm_eps": 1e-5,
        "vision_feature_layers": list(FEATURE_LAYERS),
        "image_seq_length": grid * grid,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }


def suppressed_ids(ids: TokenIds) -> list[int]:
    """Every id in [T, rows): ``<image>``, ``<pad>`` and the padding rows. The original resized its embeddings to
    ``len(tokenizer)`` when it loaded (``llava/model/builder.py``), so it could never emit one of them."""
    return list(range(ids.image, ids.rows))


def generation_config(ids: TokenIds) -> dict:
    """``generation_config.json``: the special ids, and ``suppress_tokens`` so that ``generate`` never emits an id
    the original could not (honoured from this file by transformers 4.37.2 and 5.x alike)."""
    return {"bos_token_id": ids.bos, "eos_token_id": ids.eos, "pad_token_id": ids.pad, "suppress_tokens": suppressed_ids(ids)}


def load_vipllava_config(config_dict: dict):
    """A ``VipLlavaConfig`` object from the dict (for shape expectations); the dict stays the source of truth."""
    from transformers import VipLlavaConfig

    d = {k: v for k, v in config_dict.items() if k not in ("architectures", "model_type", "torch_dtype")}
    return VipLlavaConfig(**d)
