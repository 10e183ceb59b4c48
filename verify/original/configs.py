"""The configs the original model was built from, read from the ORIGINAL checkpoint's ``config.json``.

``LlavaLlamaConfig(LlamaConfig)`` (``llava/model/language_model/llava_llama.py``) and ``LlavaPhi3Config(Phi3Config)``
(``llava_phi3.py`` over the vendored ``configuration_phi3.py``): the text config comes from the original
``config.json`` (GQA heads, ``rope_theta``, ``rms_norm_eps``, Phi-3's ``sliding_window`` ... as saved, not the base
model's).  The vision config is transformers 4.31's ``CLIPVisionConfig.from_pretrained`` of the vision model folder.
:func:`check_vip_config` and :func:`multimodal_hidden_size` refuse the multimodal settings this reference does not
restate (``llava/model/llava_arch.py`` and ``multimodal_projector/builder.py`` read them).

Attention as the original's pin (transformers 4.37.2) chose it when ``from_pretrained`` was not told: Llama (Vicuna,
Llama-3) runs ``"sdpa"`` (4.37.2 loads ``LlamaSdpaAttention``); the vendored Phi-3 (``_supports_sdpa = False``) and
CLIP (no SDPA class in 4.37.2) run ``"eager"``. Measured 2026-11-30 in the 4.37.2 environment: ``from_pretrained``
of a Llama gives ``sdpa``, of a CLIP vision model ``eager``. :data:`TEXT_ATTENTION` states it per text model type.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import CLIPVisionConfig, LlamaConfig, Phi3Config

from .errors import OriginalLoadError
from .vision import FEATURE_LAYERS

# the text attention the original ran, by the text config's model_type (see the module docstring)
TEXT_ATTENTION = {"llama": "sdpa", "phi3": "eager"}

_LLAMA_KEYS = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "pretraining_tp",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
    "head_dim",
}
_CLIP_VISION_KEYS = {
    "hidden_size",
    "intermediate_size",
    "projection_dim",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
    "initializer_range",
    "initializer_factor",
}


_PHI3_KEYS = {  # the fields the vendored configuration_phi3.py (April 2024) knows
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "resid_pdrop",
    "embd_pdrop",
    "attention_dropout",
    "hidden_act",
    "max_position_embeddings",
    "original_max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_theta",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sliding_window",
}


def llama_config_from_original(cfg: dict[str, Any]) -> LlamaConfig:
    """``LlavaLlamaConfig(LlamaConfig)``: the Llama fields of the original config.json (GQA heads,
    ``rope_theta``, ``rms_norm_eps`` ... as saved, not the base model's)."""
    mt = cfg.get("model_type")
    if mt not in ("llava_llama", "llama"):
        raise OriginalLoadError(f"original config.json has model_type {mt!r}; a Llama backbone needs 'llava_llama'")
    kwargs = {k: v for k, v in cfg.items() if k in _LLAMA_KEYS}
    lc = LlamaConfig(**kwargs)
    lc._attn_implementation = TEXT_ATTENTION["llama"]
    return lc


def phi3_config_from_original(cfg: dict[str, Any]) -> Phi3Config:
    """``LlavaPhi3Config(Phi3Config)`` of the vendored ``configuration_phi3.py``: the Phi-3 fields
    of the original config.json (``sliding_window``, ``rope_theta``, ``original_max_position_embeddings``
    ... as saved; absent ones take that file's defaults, which are transformers' Phi3 defaults)."""
    mt = cfg.get("model_type")
    if mt != "llava_phi3":
        raise OriginalLoadError(f"original config.json has model_type {mt!r}; a Phi-3 backbone needs 'llava_phi3'")
    scaling = cfg.get("rope_scaling")
    if scaling is not None:
        raise OriginalLoadError(
            f"original config.json has rope_scaling {scaling!r}: this reference restates Phi-3 with rope_scaling null "
            "(Phi-3-mini-4k, the ViP-LLaVA base) only; the vendored 'su'/'yarn' embeddings are not restated"
        )
    kwargs = {k: v for k, v in cfg.items() if k in _PHI3_KEYS}
    pc = Phi3Config(**kwargs)
    pc._attn_implementation = TEXT_ATTENTION["phi3"]
    return pc


def clip_vision_config_from_dir(vision_model: Path) -> CLIPVisionConfig:
    d = json.loads((Path(vision_model) / "config.json").read_text())
    # 4.31 CLIPVisionConfig.from_pretrained: a full CLIP config contributes its "vision_config"
    # (not "vision_config_dict").
    if d.get("model_type") == "clip" or "vision_config" in d:
        d = d["vision_config"]
    elif d.get("model_type") not in (None, "clip_vision_model"):
        raise OriginalLoadError(f"vision config has model_type {d.get('model_type')!r}")
    vc = CLIPVisionConfig(**{k: v for k, v in d.items() if k in _CLIP_VISION_KEYS})
    vc._attn_implementation = "eager"
    return vc


def check_vip_config(config: dict[str, Any]) -> None:
    """The multimodal fields of the original config.json name the ViP-LLaVA architecture restated here."""
    ptype = config.get("mm_projector_type")
    if ptype != "mlp2x_gelu":
        raise OriginalLoadError(f"mm_projector_type {ptype!r}: ViP-LLaVA uses 'mlp2x_gelu'")
    tower = config.get("mm_vision_tower")
    if tower is not None and tower != "clip_4layers_336":
        raise OriginalLoadError(f"mm_vision_tower {tower!r}: ViP-LLaVA uses 'clip_4layers_336'")
    if config.get("mm_use_im_start_end") or config.get("mm_use_im_patch_token"):
        raise OriginalLoadError("mm_use_im_start_end / mm_use_im_patch_token are not supported")
    merge = config.get("mm_patch_merge_type", "flat")
    if merge != "flat":
        raise OriginalLoadError(f"mm_patch_merge_type {merge!r} is not supported")


def multimodal_hidden_size(config: dict[str, Any], vcfg: CLIPVisionConfig) -> int:
    """``mm_hidden_size``: the projector's input width, one vision hidden size per feature layer; every feature
    layer must exist in the tower."""
    n_layers = len(FEATURE_LAYERS)
    mm_hidden = config.get("mm_hidden_size", n_layers * vcfg.hidden_size)
    if mm_hidden != n_layers * vcfg.hidden_size:
        raise OriginalLoadError(f"mm_hidden_size {mm_hidden} != {n_layers} x vision hidden size {vcfg.hidden_size}")
    for idx in FEATURE_LAYERS:
        if not -(vcfg.num_hidden_layers + 1) <= idx <= vcfg.num_hidden_layers:
            raise OriginalLoadError(f"feature layer {idx} out of range for {vcfg.num_hidden_layers} layers")
    return mm_hidden
