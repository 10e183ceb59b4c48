"""Config in, config out: the converted ``config.json`` from the ORIGINAL config and the vision model's config.

The dict is written by hand, with the key names every transformers release reads (``vision_feature_layers``,
``rope_theta``, ``torch_dtype``); 5.x maps the legacy names onto its own. Text settings come from the ORIGINAL
``config.json`` (its ``rms_norm_eps`` of 1e-5 differs from some Llama defaults), vision settings from the vision
model's config (never from a class default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .backbones import VICUNA, Backbone
from .errors import ConversionError
from .safejson import name as safe_name
from .safejson import type_name

FEATURE_LAYERS = (-2, -5, -8, -11, 6)
ROW_MULTIPLE = 64
_TEXT_KEYS_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_VISION_KEYS_REQUIRED = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
)


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


# Config numbers are checked before anything is built from them (a placeholder model, a shape, a division): the
# type, the sign and a bound far above any released model's value.
_INT = "int"
_TEXT_NUMBERS = {
    "hidden_size": (1, 1 << 16),
    "intermediate_size": (1, 1 << 18),
    "num_hidden_layers": (1, 512),
    "num_attention_heads": (1, 1024),
    "vocab_size": (1, 1 << 22),
    "mm_hidden_size": (1, 1 << 18),
}
_TEXT_OPTIONAL = {
    "num_key_value_heads": (_INT, 1, 1024),
    "max_position_embeddings": (_INT, 1, 1 << 24),
    "tokenizer_model_max_length": (_INT, 1, 1 << 24),
    "head_dim": (_INT, 1, 1 << 12),
    "rms_norm_eps": (float, 0.0, 1.0),
    "rope_theta": (float, 0.0, 1e12),
    "initializer_range": (float, -1.0, 1e3),
    "attention_dropout": (float, -1.0, 1.0),
    "resid_pdrop": (float, -1.0, 1.0),
    "embd_pdrop": (float, -1.0, 1.0),
    "sliding_window": (_INT, 1, 1 << 24),
    "original_max_position_embeddings": (_INT, 1, 1 << 24),
    "pretraining_tp": (_INT, 1, 1024),
}
_VISION_NUMBERS = {
    "hidden_size": (1, 1 << 14),
    "intermediate_size": (1, 1 << 16),
    "num_hidden_layers": (1, 256),
    "num_attention_heads": (1, 256),
    "image_size": (1, 1 << 13),
    "patch_size": (1, 1 << 10),
}
_VISION_OPTIONAL = {
    "num_channels": (_INT, 1, 16),
    "projection_dim": (_INT, 1, 1 << 16),
    "layer_norm_eps": (float, 0.0, 1.0),
    "attention_dropout": (float, -1.0, 1.0),
}


def _bad(where: str, key: str | int, value: object, expected: str) -> ConversionError:
    return ConversionError(
        f"{where}: {key} is {safe_name(repr(value))} ({type_name(value)}); expected {expected}; "
        "fix the config or pass the right model"
    )


def check_int(cfg: dict, key: str, low: int, high: int, where: str) -> int:
    v = cfg[key]
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise _bad(where, key, v, f"an integer from {low} to {high}")
    return v


def check_real(cfg: dict, key: str | int, low: float, high: float, where: str) -> float:
    """A finite number with low < v <= high (an int is a number too)."""
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low < v <= high:
        raise _bad(where, key, v, f"a finite number greater than {low:g} and at most {high:g}")
    return v


def _check_numbers(cfg: dict, required: dict, optional: dict, where: str) -> None:
    for key, (low, high) in required.items():
        if key in cfg:
            check_int(cfg, key, low, high, where)
    for key, (kind, low, high) in optional.items():
        if cfg.get(key) is None:
            continue
        (check_int if kind is _INT else check_real)(cfg, key, low, high, where)
    if cfg.get("hidden_act") is not None and not isinstance(cfg["hidden_act"], str):
        raise _bad(where, "hidden_act", cfg["hidden_act"], "the name of an activation (a string)")


def check_text_numbers(original: dict, where: str) -> None:
    """Types and ranges of the ORIGINAL config's numbers, and how they must divide."""
    _check_numbers(original, _TEXT_NUMBERS, _TEXT_OPTIONAL, where)
    heads, kv = original.get("num_attention_heads"), original.get("num_key_value_heads")
    if "hidden_size" in original and heads and original["hidden_size"] % heads and original.get("head_dim") is None:
        raise ConversionError(
            f"{where}: hidden_size {original['hidden_size']} is not a multiple of num_attention_heads "
            f"{heads}; fix the config"
        )
    if heads and kv and heads % kv:
        raise ConversionError(
            f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}; fix the config"
        )
    for key in ("rope_scaling",):
        if original.get(key) is not None and not isinstance(original[key], dict):
            raise _bad(where, key, original[key], "null or a JSON object")
    for key in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        if original.get(key) is not None and not isinstance(original[key], bool):
            raise _bad(where, key, original[key], "true or false")


def check_vision_numbers(vc: dict, where: str) -> None:
    _check_numbers(vc, _VISION_NUMBERS, _VISION_OPTIONAL, where)
    if vc.get("hidden_size") and vc.get("num_attention_heads") and vc["hidden_size"] % vc["num_attention_heads"]:
        raise ConversionError(
            f"{where}: vision hidden_size {vc['hidden_size']} is not a multiple of num_attention_heads "
            f"{vc['num_attention_heads']}; fix the vision config"
        )


def check_preprocessor(pre: dict, where: str, channels: int = 3) -> None:
    """The CLIP image-processing settings, checked before anything is written (the processor files come last)."""

    def side(key: str, sub: tuple[str, ...]) -> None:
        v = pre.get(key)
        if isinstance(v, dict) and set(sub) <= set(v):
            for k in sub:
                check_int(v, k, 1, 1 << 14, f"{where}: {key}")
        elif not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1 << 14):
            raise _bad(where, key, v, f"an integer from 1 to 16384 or an object with {', '.join(sub)}")

    side("size", ("shortest_edge",))
    side("crop_size", ("height", "width"))
    for key, low in (("image_mean", -1e3), ("image_std", 0.0)):
        v = pre.get(key)
        if v is None:
            continue
        if not (isinstance(v, list) and len(v) == channels):
            raise _bad(where, key, v, f"a list of {channels} numbers")
        by_index = dict(enumerate(v))
        for i in range(channels):
            check_real(by_index, i, low, 1e3, f"{where}: {key}")
    if pre.get("rescale_factor") is not None:
        check_real(pre, "rescale_factor", 0.0, 1.0, where)
    if pre.get("resample") is not None:
        check_int(pre, "resample", 0, 5, where)
    for key in ("do_center_crop", "do_convert_rgb", "do_normalize", "do_rescale", "do_resize"):
        if pre.get(key) is not None and not isinstance(pre[key], bool):
            raise _bad(where, key, pre[key], "true or false")


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
    check_vision_numbers(vc, where)
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
        raise ConversionError(
            f"{where}: lacks {', '.join(missing)}; expected the config.json of a ViP-LLaVA checkpoint"
        )
    check_text_numbers(original, where)
    if "mm_hidden_size" not in original:
        raise ConversionError(
            f"{where}: no mm_hidden_size; this is not a multimodal LLaVA config (model_type "
            f"{original.get('model_type')!r}); pass the original ViP-LLaVA checkpoint folder"
        )


def build_config(
    original: dict, vision: dict, ids: TokenIds, dtype: str, where: str, backbone: Backbone = VICUNA
) -> dict:
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
            f"{list(FEATURE_LAYERS)} (index {out_of_range[0]} is out of range); pass the vision model this checkpoint "
            "was trained with"
        )
    if vision["image_size"] % vision["patch_size"]:
        raise ConversionError(
            f"{where}: image_size {vision['image_size']} is not a multiple of patch_size {vision['patch_size']}"
        )
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
    return {
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos,
        "pad_token_id": ids.pad,
        "suppress_tokens": suppressed_ids(ids),
    }


def load_vipllava_config(config_dict: dict):
    """A ``VipLlavaConfig`` object from the dict (for shape expectations); the dict stays the source of truth."""
    from transformers import VipLlavaConfig

    d = {k: v for k, v in config_dict.items() if k not in ("architectures", "model_type", "torch_dtype")}
    return VipLlavaConfig(**d)
