"""Tiny ORIGINAL-format ViP-LLaVA checkpoints, built deterministically from a seed.

The original checkpoint (``mucai/vip-llava-7b``) is a ``LlavaLlamaForCausalLM`` state dict saved by
transformers 4.x: a Llama decoder under ``model.*`` / ``lm_head.weight``, the frozen CLIP vision tower
under ``model.vision_tower.vision_tower.vision_model.*`` and the ViP-LLaVA projector under
``model.mm_projector.{clip_layernorm,final_linear.0,final_linear.2}.*`` (the layout the original
ViP-LLaVA code's ``LlavaLlamaForCausalLM.state_dict()`` saves; :mod:`verify.original` restates it).
This module produces the same layout at toy sizes, plus the configs that go with it, and the
``VipLlavaConfig`` a correct conversion should target.

Three backbones (``TinySpec.backbone``): ``vicuna`` (Llama-2 decoder, ``mucai/vip-llava-{7b,13b}``),
``llama3`` (Llama decoder with GQA and rope_theta 500000, ``mucai/vip-llava-llama-3-8b``) and ``phi3``
(Phi-3 decoder with fused ``qkv_proj`` / ``gate_up_proj``, ``llava_phi3``, ``mucai/vip-llava-phi-3-mini-3.8B``).
What differs between them is plain data, one ``Backbone`` each, in ``BACKBONES``; ``TinySpec.for_backbone``
gives the spec of each backbone's tiny fixture.

Nothing here touches the network or the disk; ``fixtures.build`` writes the files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

import torch

from .original import FEATURE_LAYERS  # the original's multilayer vision features: one home, the reference

__all__ = [
    "TinySpec",
    "Backbone",
    "BACKBONES",
    "get_backbone",
    "FEATURE_LAYERS",
    "CLIP_MEAN",
    "CLIP_STD",
    "TEXT_PREFIX",
    "VISION_PREFIX",
    "PROJECTOR_PREFIX",
    "original_config",
    "base_text_config",
    "clip_config",
    "clip_vision_config_dict",
    "clip_preprocessor_config",
    "vipllava_config",
    "padded_vocab_size",
    "converted_rows",
    "original_state_dict",
    "original_key_shapes",
    "is_legacy_buffer",
    "text_state_dict",
    "vision_state_dict",
    "build_reference_modules",
    "sanity_report",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: prefix of the CLIP tower inside the original state dict (4.x CLIPVisionModel names follow it)
VISION_PREFIX = "model.vision_tower.vision_tower."
PROJECTOR_PREFIX = "model.mm_projector."
TEXT_PREFIX = "model."


# --------------------------------------------------------------------------------------------
# backbones: what differs between Vicuna, Llama-3 and Phi-3, as data
# --------------------------------------------------------------------------------------------


def _no_extra_fields(spec: "TinySpec") -> dict:
    return {}


def _phi3_fields(spec: "TinySpec") -> dict:
    """The Phi-3 config fields a Llama config lacks (Phi-3-mini-4k: 4096 positions, sliding window 2047)."""
    return {
        "original_max_position_embeddings": spec.max_position_embeddings,
        "sliding_window": spec.max_position_embeddings - 1,
        "rope_scaling": None,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "attention_dropout": 0.0,
    }


@dataclass(frozen=True)
class Backbone:
    """One backbone of ViP-LLaVA. Token ids are those of the tiny fixture's tokenizer for this backbone."""

    name: str
    conv_mode: str  # the original conversation mode (llava/conversation.py)
    original_model_type: str  # ORIGINAL config.json
    original_architecture: str
    base_model_type: str  # the base text model's config.json
    base_architecture: str
    hf_config: str  # transformers classes of the text model (key names and shapes; reference modules)
    hf_model: str
    rope_theta: float
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int | None  # None: the config has no pad_token_id
    # the original carries model.layers.{i}.self_attn.rotary_emb.inv_freq when legacy_buffers: only saves by
    # transformers <= 4.31 (Vicuna ViP-LLaVA); 4.32 made it non-persistent (transformers PR #24998), and the
    # Llama-3 / Phi-3 variants were trained on 4.36+ (Phi-3's vendored model never had it persistent)
    rotary_buffers: bool
    tiny: tuple[tuple[str, Any], ...] = ()  # the tiny fixture's TinySpec fields (besides backbone)
    extra_fields: Callable[["TinySpec"], dict] = _no_extra_fields  # backbone-only text config fields


BACKBONES = MappingProxyType(
    {
        b.name: b
        for b in (
            Backbone(
                name="vicuna",
                conv_mode="llava_v1",
                original_model_type="llava_llama",
                original_architecture="LlavaLlamaForCausalLM",
                base_model_type="llama",
                base_architecture="LlamaForCausalLM",
                hf_config="LlamaConfig",
                hf_model="LlamaForCausalLM",
                rope_theta=10000.0,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
                rotary_buffers=True,
            ),
            Backbone(
                name="llama3",
                conv_mode="llava_llama_3",
                original_model_type="llava_llama",
                original_architecture="LlavaLlamaForCausalLM",
                base_model_type="llama",
                base_architecture="LlamaForCausalLM",
                hf_config="LlamaConfig",
                hf_model="LlamaForCausalLM",
                rope_theta=500000.0,
                bos_token_id=900,
                eos_token_id=901,
                pad_token_id=None,
                rotary_buffers=False,
                tiny=(("vocab_size", 1000), ("text_kv_heads", 2)),
            ),
            Backbone(
                name="phi3",
                conv_mode="llava_phi_3",
                original_model_type="llava_phi3",
                original_architecture="LlavaPhi3ForCausalLM",
                base_model_type="phi3",
                base_architecture="Phi3ForCausalLM",
                hf_config="Phi3Config",
                hf_model="Phi3ForCausalLM",
                rope_theta=10000.0,
                bos_token_id=1,
                eos_token_id=997,
                pad_token_id=997,
                rotary_buffers=False,
                tiny=(("vocab_size", 1024), ("tokenizer_size", 1008)),
                extra_fields=_phi3_fields,
            ),
        )
    }
)


def get_backbone(name: str) -> Backbone:
    """The ``Backbone`` called ``name``; ValueError naming the known ones otherwise."""
    try:
        return BACKBONES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}") from None


@dataclass(frozen=True)
class TinySpec:
    vocab_size: int = 997  # ORIGINAL vocab = embedding rows in the original checkpoint
    text_hidden: int = 64
    text_intermediate: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 4
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_layers: int = 12  # hidden_states has layers+1 entries; [-2,-5,-8,-11,6] must be valid
    vision_heads: int = 4
    image_size: int = 42
    patch_size: int = 14  # -> (42/14)^2 = 9 image tokens
    legacy_buffers: bool = True  # include rotary inv_freq and CLIP position_ids buffers like old saves
    max_position_embeddings: int = 512
    backbone: str = "vicuna"  # a key of BACKBONES
    # len(base tokenizer) T, all added specials included; None = vocab_size. Rows [T, vocab) of lm_head are zero.
    tokenizer_size: int | None = None
    # (bos, eos, pad) ids of the configs when the tokenizer is not the backbone's tiny one (a real vocabulary);
    # None = the Backbone's. pad may be None (no pad_token_id in the config).
    token_ids: tuple[int, int, int | None] | None = None

    def __post_init__(self) -> None:
        get_backbone(self.backbone)
        if self.text_hidden % self.text_heads:
            raise ValueError("text_hidden must be divisible by text_heads")
        if self.text_heads % self.text_kv_heads:
            raise ValueError("text_heads must be divisible by text_kv_heads")
        if (self.text_hidden // self.text_heads) % 2:
            raise ValueError("text head_dim must be even (rotary embeddings)")
        if self.vision_hidden % self.vision_heads:
            raise ValueError("vision_hidden must be divisible by vision_heads")
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        n = self.vision_layers + 1  # number of hidden states
        if any(not (-n <= i < n) for i in FEATURE_LAYERS):
            raise ValueError(f"vision_layers={self.vision_layers} too small for feature layers {FEATURE_LAYERS}")
        if self.tokenizer_size is not None and not (1 <= self.tokenizer_size <= self.vocab_size):
            raise ValueError(f"tokenizer_size must be in 1..vocab_size={self.vocab_size}, got {self.tokenizer_size}")

    @classmethod
    def for_backbone(cls, name: str) -> "TinySpec":
        """The spec of ``name``'s tiny fixture (vicuna: the defaults; llama3: vocab 1000, 2 kv heads;
        phi3: 1024 original rows, a 1008-token tokenizer)."""
        return cls(backbone=name, **dict(get_backbone(name).tiny))

    @property
    def backbone_info(self) -> Backbone:
        """The ``Backbone`` data of ``self.backbone``."""
        return get_backbone(self.backbone)

    @property
    def special_ids(self) -> tuple[int, int, int | None]:
        """(bos, eos, pad) ids the configs carry: ``token_ids`` when given, else the backbone's tiny fixture's."""
        if self.token_ids is not None:
            bos, eos, pad = self.token_ids
            return bos, eos, pad
        bb = self.backbone_info
        return bb.bos_token_id, bb.eos_token_id, bb.pad_token_id

    @classmethod
    def for_real_vocab(
        cls, backbone: str, rows: int, tokens: int, token_ids: tuple[int, int, int | None]
    ) -> "TinySpec":
        """Tiny dimensions with a REAL vocabulary: ``rows`` original embedding rows (32000 Vicuna, 128256 Llama-3,
        32064 Phi-3), a base tokenizer of ``tokens`` tokens and its (bos, eos, pad) ids."""
        base = cls.for_backbone(backbone)
        fields = {
            **base.as_dict(),
            "vocab_size": rows,
            "tokenizer_size": None if tokens == rows else tokens,
            "token_ids": tuple(token_ids),
        }
        return cls(**fields)

    @property
    def tokenizer_len(self) -> int:
        """T: the number of tokens of the base tokenizer."""
        return self.vocab_size if self.tokenizer_size is None else self.tokenizer_size

    @property
    def text_head_dim(self) -> int:
        return self.text_hidden // self.text_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def mm_hidden(self) -> int:
        return len(FEATURE_LAYERS) * self.vision_hidden

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------


def _text_fields(spec: TinySpec, rms_norm_eps: float) -> dict:
    """The text-model fields of a config.json (the original's and the base model's share them)."""
    bb = spec.backbone_info
    fields = {
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_intermediate,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": rms_norm_eps,
        "rope_theta": bb.rope_theta,
        "vocab_size": spec.vocab_size,
        "bos_token_id": spec.special_ids[0],
        "eos_token_id": spec.special_ids[1],
        "tie_word_embeddings": False,
        "use_cache": True,
        **bb.extra_fields(spec),
    }
    if spec.special_ids[2] is not None:
        fields["pad_token_id"] = spec.special_ids[2]
    return fields


def _mm_fields(spec: TinySpec) -> dict:
    """The LLaVA fields the original training added to the config (llava_arch.py, train.py)."""
    return {
        "mm_vision_tower": "clip_4layers_336",
        "mm_hidden_size": spec.mm_hidden,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_patch_merge_type": "flat",
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "freeze_mm_mlp_adapter": False,
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }


def original_config(spec: TinySpec = TinySpec()) -> dict:
    """The ORIGINAL ``config.json`` (``llava_llama`` or ``llava_phi3``), as saved next to the original weights."""
    bb = spec.backbone_info
    return {
        "architectures": [bb.original_architecture],
        "model_type": bb.original_model_type,
        **_text_fields(spec, rms_norm_eps=1e-5),
        "torch_dtype": "bfloat16",
        **_mm_fields(spec),
    }


def base_text_config(spec: TinySpec = TinySpec()) -> dict:
    """``config.json`` of the base text model directory (a plain Llama / Phi-3 config, 4.x style).

    ``rms_norm_eps`` is deliberately 1e-6 here while the ORIGINAL config says 1e-5: a converter must
    take the text hyper-parameters from the original checkpoint, and this difference shows if not.
    """
    bb = spec.backbone_info
    return {
        "architectures": [bb.base_architecture],
        "model_type": bb.base_model_type,
        **_text_fields(spec, rms_norm_eps=1e-6),
        "initializer_range": 0.02,
        "torch_dtype": "float16",
    }


def clip_vision_config_dict(spec: TinySpec = TinySpec()) -> dict:
    """The vision tower settings (the ``vision_config`` of the full CLIP config)."""
    return {
        "model_type": "clip_vision_model",
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_intermediate,
        "num_hidden_layers": spec.vision_layers,
        "num_attention_heads": spec.vision_heads,
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "num_channels": 3,
        "projection_dim": 16,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
    }


def clip_config(spec: TinySpec = TinySpec()) -> dict:
    """A FULL CLIP config like ``openai/clip-vit-large-patch14-336``'s: text + vision towers."""
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": 16,
        "logit_scale_init_value": 2.6592,
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "clip_text_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 16,
            "vocab_size": 128,
            "bos_token_id": 126,
            "eos_token_id": 127,
            "pad_token_id": 1,
            "projection_dim": 16,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "attention_dropout": 0.0,
            "dropout": 0.0,
            "initializer_range": 0.02,
            "initializer_factor": 1.0,
        },
        "vision_config": clip_vision_config_dict(spec),
    }


def clip_preprocessor_config(spec: TinySpec = TinySpec()) -> dict:
    """``preprocessor_config.json`` of the vision model directory (a CLIPImageProcessor)."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "feature_extractor_type": "CLIPFeatureExtractor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": spec.image_size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": spec.image_size, "width": spec.image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
    }


def padded_vocab_size(original_vocab: int, multiple: int = 64) -> int:
    """Rows of the converted embedding / lm_head: original vocab + <image> + <pad>, rounded up."""
    return -(-(original_vocab + 2) // multiple) * multiple


def converted_rows(spec: TinySpec) -> int:
    """Rows after conversion: max(V, round_up(T + 2, 64)) (T = tokenizer tokens, V = original rows)."""
    return max(spec.vocab_size, padded_vocab_size(spec.tokenizer_len))


def vipllava_config(spec: TinySpec = TinySpec(), image_token_index: int | None = None, pad_token_id: int | None = None):
    """The ``VipLlavaConfig`` a correct conversion of the tiny original targets.

    Text rows = ``converted_rows(spec)``; ``<image>`` = T, ``<pad>`` = T + 1 (by default; T = the
    tokenizer's length, = vocab for Vicuna); the backbone's text config class (Llama or Phi-3) with
    ``rms_norm_eps`` 1e-5 (from the ORIGINAL config); feature layers [-2, -5, -8, -11, 6].
    (transformers 5.x names the field ``vision_feature_layer``.)
    """
    from transformers import CLIPVisionConfig, VipLlavaConfig

    image_token_index = spec.tokenizer_len if image_token_index is None else image_token_index
    pad_token_id = spec.tokenizer_len + 1 if pad_token_id is None else pad_token_id
    text = _text_config(spec, layers=spec.text_layers, vocab_size=converted_rows(spec), pad_token_id=pad_token_id)
    vision_kwargs = {k: v for k, v in clip_vision_config_dict(spec).items() if k != "model_type"}
    vision = CLIPVisionConfig(**vision_kwargs)
    cfg = VipLlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=image_token_index,
        projector_hidden_act="gelu",
        projector_layernorm_eps=1e-5,
        vision_feature_layer=list(FEATURE_LAYERS),
        image_seq_length=spec.num_patches,
        tie_word_embeddings=False,
    )
    cfg.architectures = ["VipLlavaForConditionalGeneration"]
    # VipLlavaConfig (5.x) has no pad_token_id of its own; the 4.x Hub config (llava-hf/vip-llava-7b-hf)
    # carries one at the top level, so set it there too (it round-trips through save/from_pretrained).
    cfg.pad_token_id = pad_token_id
    return cfg


# --------------------------------------------------------------------------------------------
# key layout
# --------------------------------------------------------------------------------------------


def _text_config(spec: TinySpec, layers: int, rms_norm_eps: float = 1e-5, **overrides):
    """The backbone's transformers text config (``LlamaConfig`` / ``Phi3Config``) with ``layers`` layers."""
    import transformers

    bb = spec.backbone_info
    kwargs = {
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": bb.rope_theta},
        "bos_token_id": spec.special_ids[0],
        "eos_token_id": spec.special_ids[1],
        "pad_token_id": spec.special_ids[2],
        "tie_word_embeddings": False,
        **{k: v for k, v in bb.extra_fields(spec).items() if k != "rope_scaling"},  # rope_parameters says it
        **overrides,
    }
    return getattr(transformers, bb.hf_config)(**kwargs)


def _text_model(spec: TinySpec, config):
    """The backbone's causal LM (``LlamaForCausalLM`` / ``Phi3ForCausalLM``) built from ``config``."""
    import transformers

    return getattr(transformers, spec.backbone_info.hf_model)(config)


def _clip_vision_config(spec: TinySpec, layers: int):
    from transformers import CLIPVisionConfig

    kw = {k: v for k, v in clip_vision_config_dict(spec).items() if k != "model_type"}
    kw["num_hidden_layers"] = layers
    return CLIPVisionConfig(**kw)


def _expand_layers(shapes: list[tuple[str, tuple[int, ...]]], marker: str, n: int):
    """Replace every ``{marker}0.`` entry by n copies (``{marker}{i}.``), keeping module order."""
    out: list[tuple[str, tuple[int, ...]]] = []
    block: list[tuple[str, tuple[int, ...]]] = []
    for name, shape in shapes:
        if name.startswith(marker + "0."):
            block.append((name[len(marker) + 2 :], shape))
            continue
        if block:
            out += [(f"{marker}{i}.{rest}", s) for i in range(n) for rest, s in block]
            block = []
        out.append((name, shape))
    if block:
        out += [(f"{marker}{i}.{rest}", s) for i in range(n) for rest, s in block]
    return out


def _meta_shapes(module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def original_key_shapes(spec: TinySpec = TinySpec()) -> dict[str, tuple[int, ...]]:
    """Every key of the ORIGINAL state dict with its shape, in module (= save) order.

    Names are derived from the installed transformers modules, instantiated on the meta device with
    ONE layer each (so any size is free) and replicated per layer. transformers 5.x flattened
    ``CLIPVisionModel`` (no ``vision_model.`` level); the original checkpoint was saved by 4.x, so
    ``vision_model.`` is put back here. The text model is the backbone's (``LlamaForCausalLM``, or
    ``Phi3ForCausalLM`` with its fused ``qkv_proj`` / ``gate_up_proj``); only backbones whose old saves
    carried the rotary ``inv_freq`` buffer get it (Phi-3's is non-persistent).
    """
    from transformers import CLIPVisionModel

    with torch.device("meta"):
        text_model = _text_model(spec, _text_config(spec, layers=1))
        clip = CLIPVisionModel(_clip_vision_config(spec, layers=1))

    text = _expand_layers(_meta_shapes(text_model), "model.layers.", spec.text_layers)
    if (
        spec.legacy_buffers and spec.backbone_info.rotary_buffers
    ):  # 4.x LlamaAttention had rotary_emb (inv_freq) after o_proj
        with_buf = []
        for name, shape in text:
            with_buf.append((name, shape))
            if name.endswith(".self_attn.o_proj.weight"):
                layer = name[: -len("o_proj.weight")]
                with_buf.append((layer + "rotary_emb.inv_freq", (spec.text_head_dim // 2,)))
        text = with_buf
    lm_head = [(k, s) for k, s in text if not k.startswith("model.")]
    text = [(k, s) for k, s in text if k.startswith("model.")]

    vision = _expand_layers(_meta_shapes(clip), "encoder.layers.", spec.vision_layers)
    if spec.legacy_buffers:  # 4.x CLIPVisionEmbeddings: class_embedding, position_ids, submodules
        i = [k for k, _ in vision].index("embeddings.class_embedding")
        vision.insert(i + 1, ("embeddings.position_ids", (1, spec.num_patches + 1)))
    vision = [(VISION_PREFIX + "vision_model." + k, s) for k, s in vision]

    m = spec.mm_hidden
    projector = [
        (PROJECTOR_PREFIX + "clip_layernorm.weight", (m,)),
        (PROJECTOR_PREFIX + "clip_layernorm.bias", (m,)),
        (PROJECTOR_PREFIX + "final_linear.0.weight", (spec.text_hidden, m)),
        (PROJECTOR_PREFIX + "final_linear.0.bias", (spec.text_hidden,)),
        (PROJECTOR_PREFIX + "final_linear.2.weight", (spec.text_hidden, spec.text_hidden)),
        (PROJECTOR_PREFIX + "final_linear.2.bias", (spec.text_hidden,)),
    ]
    ordered = text + vision + projector + lm_head
    out = dict(ordered)
    assert len(out) == len(ordered), "duplicate keys"
    return out


def is_legacy_buffer(key: str) -> bool:
    """True for the buffers old transformers saved and that are dropped on conversion."""
    return key.endswith(".rotary_emb.inv_freq") or key.endswith(".embeddings.position_ids")


# --------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------


def _init_kind(key: str, shape: tuple[int, ...]) -> tuple[str, float]:
    """(kind, scale) of the deterministic initialisation for one key."""
    if key.endswith(".bias"):
        return "normal", 0.2
    if key.endswith("embed_tokens.weight"):
        return "normal", 0.5
    if key.endswith("class_embedding") or key.endswith("position_embedding.weight"):
        return "normal", 0.5
    if key.endswith(".weight") and "norm" in key.rsplit(".", 2)[-2]:
        # RMSNorm / LayerNorm weights: input_layernorm, post_attention_layernorm, model.norm,
        # pre_layrnorm, post_layernorm, layer_norm1/2, clip_layernorm
        return "one_plus", 0.2
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return "normal", 1.0 / math.sqrt(fan_in)
    raise ValueError(f"no initialisation rule for {key} {shape}")


def buffer_value(spec: TinySpec, key: str) -> torch.Tensor:
    """The value old transformers saved for a legacy buffer (rotary inv_freq, CLIP position_ids)."""
    if key.endswith(".rotary_emb.inv_freq"):
        d = spec.text_head_dim
        return 1.0 / (spec.backbone_info.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if key.endswith(".embeddings.position_ids"):
        return torch.arange(spec.num_patches + 1, dtype=torch.int64).unsqueeze(0)
    raise KeyError(key)


def _zero_unused_rows(spec: TinySpec, key: str, x: torch.Tensor) -> torch.Tensor:
    """``lm_head.weight`` with rows [T, vocab) zeroed (a copy); any other tensor unchanged."""
    if key != "lm_head.weight" or spec.tokenizer_len == spec.vocab_size:
        return x
    x = x.clone()
    x[spec.tokenizer_len :] = 0.0
    return x


def original_state_dict(
    spec: TinySpec = TinySpec(), seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """A full ORIGINAL-layout state dict with deterministic, seeded, non-trivial values.

    ONE ``torch.Generator`` seeded with ``seed``; keys are drawn in sorted order (so the values do
    not depend on the module order), in fp32, then cast to ``dtype``. Legacy buffers keep their
    own dtypes (inv_freq fp32, position_ids int64) and real values; they consume no random numbers.
    Every tensor matters: weights ~ N(0, 1/fan_in), norm weights 1 + N(0, 0.2), every bias
    N(0, 0.2), token embeddings N(0, 0.5^2), CLIP class/position embeddings N(0, 0.5^2).
    Rows [T, vocab) of ``lm_head.weight`` are zero when the tokenizer has T < vocab tokens (Phi-3: a
    trained model never targets its padding ids, so greedy decoding must not pick them either); they
    are drawn like the others and then zeroed, so no other value depends on T.
    The returned dict is in module (save) order; every tensor owns its own contiguous storage.
    """
    shapes = original_key_shapes(spec)
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    values: dict[str, torch.Tensor] = {}
    for key in sorted(shapes):
        if is_legacy_buffer(key):
            values[key] = buffer_value(spec, key)
            continue
        shape = shapes[key]
        kind, scale = _init_kind(key, shape)
        x = torch.randn(shape, generator=g, dtype=torch.float32) * scale
        if kind == "one_plus":
            x = x + 1.0
        values[key] = _zero_unused_rows(spec, key, x).to(dtype).contiguous()
    return {k: values[k] for k in shapes}


# --------------------------------------------------------------------------------------------
# reference modules (sanity checks; NOT the original forward pass)
# --------------------------------------------------------------------------------------------


def text_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Llama part of an original state dict, in ``LlamaForCausalLM`` names (no buffers)."""
    return {
        k: v
        for k, v in sd.items()
        if (
            k.startswith(TEXT_PREFIX)
            and not k.startswith(VISION_PREFIX)
            and not k.startswith(PROJECTOR_PREFIX)
            and not is_legacy_buffer(k)
        )
        or k == "lm_head.weight"
    }


def vision_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CLIP tower of an original state dict, in transformers-5 ``CLIPVisionModel`` names."""
    p = VISION_PREFIX + "vision_model."
    return {k[len(p) :]: v for k, v in sd.items() if k.startswith(p) and not is_legacy_buffer(k)}


def build_reference_modules(spec: TinySpec, sd: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    """(text model, CLIPVisionModel) carrying the text / vision weights of ``sd`` (strict load).

    The text model is the backbone's causal LM: ``LlamaForCausalLM`` (vicuna, llama3) or ``Phi3ForCausalLM``.
    """
    from transformers import CLIPVisionModel

    text_model = _text_model(spec, _text_config(spec, layers=spec.text_layers))
    text_model.load_state_dict({k: v.to(dtype) for k, v in text_state_dict(sd).items()}, strict=True)
    clip = CLIPVisionModel(_clip_vision_config(spec, layers=spec.vision_layers))
    clip.load_state_dict({k: v.to(dtype) for k, v in vision_state_dict(sd).items()}, strict=True)
    # transformers types PreTrainedModel.to through a decorator that hides nn.Module.to's dtype overload
    return text_model.to(dtype).eval(), clip.to(dtype).eval()  # type: ignore[arg-type]


@torch.no_grad()
def sanity_report(spec: TinySpec = TinySpec(), sd: dict[str, torch.Tensor] | None = None, seed: int = 0) -> dict:
    """Forward the tiny towers once (fp32) and report the statistics the fixtures promise.

    Returns ``finite`` (no NaN/Inf anywhere), ``logits_std``, ``feature_min_pairwise_diff``
    (smallest max-abs difference between the 5 feature hidden states) and ``hidden_states``.
    """
    if sd is None:
        sd = original_state_dict(spec, seed=seed)
    text_model, clip = build_reference_modules(spec, sd)
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, spec.vocab_size, (1, 12), generator=g)
    logits = text_model(input_ids=ids).logits
    pixels = torch.randn(1, 3, spec.image_size, spec.image_size, generator=g)
    hs = clip(pixel_values=pixels, output_hidden_states=True).hidden_states
    feats = [hs[i] for i in FEATURE_LAYERS]
    diffs = [(a - b).abs().max().item() for i, a in enumerate(feats) for b in feats[i + 1 :]]
    proj_keys = [k for k in sd if k.startswith(PROJECTOR_PREFIX)]
    finite = bool(torch.isfinite(logits).all()) and all(bool(torch.isfinite(h).all()) for h in hs)
    finite = finite and all(bool(torch.isfinite(sd[k].float()).all()) for k in proj_keys)
    return {
        "finite": finite,
        "logits_std": logits.float().std().item(),
        "feature_min_pairwise_diff": min(diffs),
        "hidden_states": len(hs),
    }
