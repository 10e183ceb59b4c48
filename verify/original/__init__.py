"""Independent reference implementation of the ORIGINAL ViP-LLaVA forward pass.

This package is the yardstick the converted ``VipLlavaForConditionalGeneration`` repos are measured against.  It
reads the original checkpoint layout directly and restates, in our own code, what the original ViP-LLaVA code base
(github mu-cai/ViP-LLaVA) did at inference time, for its three text backbones: Vicuna-1.5 (the 7B/13B models,
trained with transformers 4.31.0), Llama-3-8B-Instruct and Phi-3-mini-4k-instruct.  It deliberately shares nothing
with ``convert`` (but the file-reading plumbing of ``convert.safejson``, which judges no model fact) and uses none
of transformers' Llava / VipLlava classes, processors or image processors: the only borrowed building blocks are the
ones the original itself stood on (``LlamaForCausalLM``, ``Phi3ForCausalLM`` -- the original vendored Microsoft's
April-2024 Phi-3 code, which is what transformers' Phi3 is --, ``CLIPVisionModel`` and their configs,
``sentencepiece``, ``tokenizers``, PIL, numpy).

What each part restates (each module's docstring says it in full, with the original file names)
-----------------------------------------------------------------------------------------------
* :mod:`~verify.original.checkpoint`: the checkpoint as ``LlavaLlamaForCausalLM`` / ``LlavaPhi3ForCausalLM`` saved it
  (``llava/model/llava_arch.py``); shard readers; strict placement.
* :mod:`~verify.original.configs`: the text and vision configs from the ORIGINAL ``config.json``
  (``LlavaLlamaConfig``, the vendored ``configuration_phi3.py``, 4.31's ``CLIPVisionConfig``).
* :mod:`~verify.original.slow_tokenizer`: transformers 4.37.2's (and 4.31.0's) slow ``LlamaTokenizer``
  (``tokenization_llama.py``), Vicuna's.
* :mod:`~verify.original.fast_tokenizer`: the fast tokenizer of Llama-3 and Phi-3 (``tokenizer.json`` run by
  ``tokenizers``; 4.37.2's ``LlamaConverter`` for a slow-only Phi-3 folder).
* :mod:`~verify.original.tokenizer_files`: the tokenizer files as ``from_pretrained`` read them.
* :mod:`~verify.original.image_token`: ``llava/mm_utils.py`` ``tokenizer_image_token`` and the -200 sentinel.
* :mod:`~verify.original.preprocess`: ``llava/mm_utils.py`` ``process_images`` (``expand2square``) and 4.31's
  ``CLIPImageProcessor``, by hand.
* :mod:`~verify.original.conversation`: ``llava/conversation.py`` ``Conversation.get_prompt()``.
* :mod:`~verify.original.backbones`: one :class:`Backbone` record per text backbone, ``detect_backbone``, the
  tokenizer and terminators of each, the converted token layout (``expected_layout``).
* :mod:`~verify.original.vision`: ``clip_4layer_encoder.py`` (the five feature layers) and the projector
  (``multimodal_projector/builder.py``).
* :mod:`~verify.original.model`: :class:`OriginalVipLlava` (``prepare_inputs_labels_for_multimodal``, the forward,
  greedy ``generate``).
* :mod:`~verify.original.errors`: :class:`OriginalLoadError`.

Deliberate deviations from the original (all make the reference stricter, not different): images whose count does
not match the number of -200 sentinels raise (the original silently ignored surplus images); images are converted to
RGB before padding (the original callers opened images with ``.convert("RGB")`` before ``process_images``); a Phi-3
``rope_scaling`` other than null is refused (the ViP-LLaVA base, Phi-3-mini-4k, has none; the vendored "su"/"yarn"
embeddings are not restated).  Not restated: the exact edge of Phi-3's sliding window (it only matters for spliced
sequences longer than ``sliding_window``, 2047 for the real model, which ``tokenizer_model_max_length`` 2048 nearly
rules out).
"""

from __future__ import annotations

from .backbones import (
    BACKBONES,
    Backbone,
    detect_backbone,
    expected_layout,
    load_base_tokenizer,
    terminator_ids,
    tokenizer_eras,
)
from .checkpoint import list_checkpoint_files, load_original_state_dict
from .configs import clip_vision_config_from_dir, llama_config_from_original, phi3_config_from_original
from .conversation import CONV_MODES, ConversationMode, render_prompt
from .errors import OriginalLoadError
from .fast_tokenizer import FastTokenizer, llama_fast_from_sentencepiece
from .image_token import IMAGE_SENTINEL, tokenizer_image_token
from .model import OriginalVipLlava, ReferenceOutput
from .preprocess import ClipPreprocessSettings, clip_preprocess, expand_to_square, process_image
from .slow_tokenizer import DEFAULT_TOKENIZER_ERA, TOKENIZER_ERAS, LlamaSlowTokenizer
from .vision import FEATURE_LAYERS

__all__ = [
    "IMAGE_SENTINEL",
    "FEATURE_LAYERS",
    "Backbone",
    "BACKBONES",
    "ConversationMode",
    "CONV_MODES",
    "detect_backbone",
    "render_prompt",
    "load_base_tokenizer",
    "tokenizer_eras",
    "terminator_ids",
    "TOKENIZER_ERAS",
    "DEFAULT_TOKENIZER_ERA",
    "tokenizer_image_token",
    "expected_layout",
    "ReferenceOutput",
    "OriginalVipLlava",
    "LlamaSlowTokenizer",
    "FastTokenizer",
    "llama_fast_from_sentencepiece",
    "ClipPreprocessSettings",
    "clip_preprocess",
    "expand_to_square",
    "process_image",
    "clip_vision_config_from_dir",
    "llama_config_from_original",
    "phi3_config_from_original",
    "load_original_state_dict",
    "list_checkpoint_files",
    "OriginalLoadError",
]
