"""The original's text backbones (Vicuna-1.5, Llama-3-8B-Instruct, Phi-3-mini-4k-instruct), one record each.

Each backbone is one :class:`Backbone` record (:data:`BACKBONES`): no code branches on its name.

* :func:`detect_backbone`: which ``LlavaXForCausalLM`` saved the checkpoint
  (``llava/model/language_model/llava_llama.py`` registers ``model_type`` "llava_llama", ``llava_phi3.py``
  "llava_phi3"); Vicuna and Llama-3 share "llava_llama" and are told apart by the base tokenizer (Llama-3's has
  ``<|eot_id|>``).
* :func:`load_base_tokenizer` / :func:`tokenizer_eras`: the tokenizer ``llava/model/builder.py`` loaded for the
  backbone (:mod:`verify.original.slow_tokenizer`, :mod:`verify.original.fast_tokenizer`).
* :func:`terminator_ids`: the eval scripts' terminators (``llava/eval/model_vqa.py``: ``eos_token_id=[tokenizer eos,
  <|eot_id|>]`` for Llama-3, ``[tokenizer eos, <|end|>]`` for Phi-3, the eos for Vicuna).
* :func:`expected_layout`: the converted token layout the reference holds the converted repo to (shared contract).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from transformers import LlamaForCausalLM, Phi3ForCausalLM, PretrainedConfig

from .configs import llama_config_from_original, phi3_config_from_original
from .errors import OriginalLoadError
from .fast_tokenizer import FastTokenizer
from .slow_tokenizer import TOKENIZER_ERAS, LlamaSlowTokenizer
from .tokenizer_files import base_tokenizer_tokens, read_json


@dataclass(frozen=True)
class Backbone:
    """What differs between the original's text backbones, as data."""

    name: str  # "vicuna" | "llama3" | "phi3"
    original_model_type: str  # model_type of the ORIGINAL config.json
    marker_token: str | None  # a base-tokenizer token that singles it out among backbones sharing the model_type
    conv_mode: str  # the original conversation mode its eval used
    tokenizer: Callable[[Path], Any]  # base text model folder -> the tokenizer the original inference loaded
    text_config: Callable[[dict[str, Any]], PretrainedConfig]
    text_model: type  # the transformers causal LM the original stood on
    stop_tokens: tuple[str, ...]  # eval terminators besides the tokenizer's eos (llava/eval/model_vqa.py)


BACKBONES: Mapping[str, Backbone] = {
    b.name: b
    for b in (
        Backbone(
            "vicuna",
            "llava_llama",
            None,
            "llava_v1",
            LlamaSlowTokenizer,
            llama_config_from_original,
            LlamaForCausalLM,
            (),
        ),
        Backbone(
            "llama3",
            "llava_llama",
            "<|eot_id|>",
            "llava_llama_3",
            lambda d: FastTokenizer(d, "post_processor"),
            llama_config_from_original,
            LlamaForCausalLM,
            ("<|eot_id|>",),
        ),
        Backbone(
            "phi3",
            "llava_phi3",
            None,
            "llava_phi_3",
            lambda d: FastTokenizer(d, "add_bos_token"),
            phi3_config_from_original,
            Phi3ForCausalLM,
            ("<|end|>",),
        ),
    )
}


def detect_backbone(original_dir: Path, text_model_dir: Path) -> str:
    """The backbone of an original checkpoint: its config.json's ``model_type`` names the
    ``LlavaXForCausalLM`` that saved it; backbones sharing one (Vicuna, Llama-3: "llava_llama") are
    told apart by a token only one base tokenizer has (``<|eot_id|>``)."""
    path = Path(original_dir) / "config.json"
    if not path.is_file():
        raise OriginalLoadError(f"{path} not found: the original checkpoint folder needs its config.json")
    mt = read_json(path).get("model_type")
    candidates = [b for b in BACKBONES.values() if b.original_model_type == mt]
    if not candidates:
        known = sorted({b.original_model_type for b in BACKBONES.values()})
        raise OriginalLoadError(f"{path}: model_type {mt!r} is not a ViP-LLaVA backbone; expected one of {known}")
    marked = [b for b in candidates if b.marker_token is not None]
    if marked:
        tokens = base_tokenizer_tokens(Path(text_model_dir))
        hit = [b for b in marked if b.marker_token in tokens]
        if hit:
            return hit[0].name
    plain = [b for b in candidates if b.marker_token is None]
    return plain[0].name


def load_base_tokenizer(backbone: str, text_model: Path, era: str | None = None) -> LlamaSlowTokenizer | FastTokenizer:
    """The tokenizer the original inference used for ``backbone`` (``LlamaSlowTokenizer`` or ``FastTokenizer``).

    ``era`` (one of :data:`TOKENIZER_ERAS`) picks the transformers release whose slow tokenizer is restated; only a
    backbone the original ran with the slow tokenizer (Vicuna) has eras, the fast ones are one tokenizer in every
    release here (ValueError)."""
    factory = BACKBONES[backbone].tokenizer
    if era is None:
        return factory(Path(text_model))
    if factory is not LlamaSlowTokenizer:
        raise ValueError(
            f"{backbone}: the original loaded the fast tokenizer (use_fast=True); it has no tokenizer eras"
        )
    return LlamaSlowTokenizer(Path(text_model), era=era)


def tokenizer_eras(backbone: str) -> tuple[str, ...]:
    """The transformers eras whose tokenizer for ``backbone`` is restated (empty for the fast-tokenizer backbones)."""
    return TOKENIZER_ERAS if BACKBONES[backbone].tokenizer is LlamaSlowTokenizer else ()


def terminator_ids(backbone: str, tokenizer) -> dict[str, int]:
    """The original eval's ``eos_token_id`` list as {token: id}: the tokenizer's eos, then the backbone's end-of-turn
    tokens."""
    out: dict[str, int] = {}
    eos_token = getattr(tokenizer, "eos_token", None) or "eos"
    if tokenizer.eos_id is None:
        raise OriginalLoadError("the base tokenizer has no eos_token; the original eval stopped on it")
    out[eos_token] = tokenizer.eos_id
    for tok in BACKBONES[backbone].stop_tokens:
        tid = tokenizer.token_id(tok)
        if tid is None:
            raise OriginalLoadError(f"the base tokenizer has no {tok!r}, which the original {backbone} eval stopped on")
        out[tok] = tid
    return out


def expected_layout(base_tokens: int, original_rows: int, multiple: int = 64) -> dict[str, int]:
    """The converted token layout (shared contract): ``<image>`` = T, ``<pad>`` = T + 1, rows =
    max(V, ceil((T + 2) / 64) * 64), for T base-tokenizer tokens and V original embedding rows."""
    T, V = int(base_tokens), int(original_rows)
    if T > V:
        raise OriginalLoadError(f"the base tokenizer has {T} tokens but the original embedding only {V} rows")
    return {
        "image": T,
        "pad": T + 1,
        "rows": max(V, math.ceil((T + 2) / multiple) * multiple),
        "original_rows": V,
        "base_tokens": T,
    }
