"""Independent reference implementation of the ORIGINAL ViP-LLaVA forward pass.

This module is the yardstick the converted ``VipLlavaForConditionalGeneration`` repos are
measured against.  It reads the original checkpoint layout directly and restates, in our own
code, what the original ViP-LLaVA code base (github mu-cai/ViP-LLaVA) did at inference time, for
its three text backbones: Vicuna-1.5 (the 7B/13B models, trained with transformers 4.31.0),
Llama-3-8B-Instruct and Phi-3-mini-4k-instruct.  It deliberately shares nothing with ``convert``
and uses none of transformers' Llava / VipLlava classes, processors or image processors: the
only borrowed building blocks are the ones the original itself stood on (``LlamaForCausalLM``,
``Phi3ForCausalLM`` -- the original vendored Microsoft's April-2024 Phi-3 code, which is what
transformers' Phi3 is --, ``CLIPVisionModel`` and their configs, ``sentencepiece``,
``tokenizers``, PIL, numpy).

Each backbone is one :class:`Backbone` record (``BACKBONES``): no code branches on its name.

What each part restates
-----------------------
* ``detect_backbone``: which ``LlavaXForCausalLM`` saved the checkpoint
  (``llava/model/language_model/llava_llama.py`` registers ``model_type`` "llava_llama",
  ``llava_phi3.py`` "llava_phi3"); Vicuna and Llama-3 share "llava_llama" and are told apart by
  the base tokenizer (Llama-3's has ``<|eot_id|>``).
* ``render_prompt`` / ``CONV_MODES``: ``llava/conversation.py`` ``Conversation.get_prompt()`` for
  the modes the eval scripts used (``llava_v1`` = SeparatorStyle.TWO, ``llava_llama_3`` =
  LLAMA_3, ``llava_phi_3`` = Phi_3), with the user text built as ``"<image>\n" + question``
  (``llava/eval/model_vqa.py``).
* ``load_original_state_dict`` / ``OriginalVipLlava.from_dirs``: the checkpoint as saved by
  ``LlavaLlamaForCausalLM`` / ``LlavaPhi3ForCausalLM`` (+ ``llava/model/llava_arch.py``:
  ``model.vision_tower.vision_tower.*`` is the frozen CLIP tower, ``model.mm_projector.*`` the
  projector, the rest a plain Llama or Phi-3 with its fused ``qkv_proj`` / ``gate_up_proj``).
  Shards are read with our own loader (``.bin`` only through ``torch.load(..., mmap=True,
  weights_only=True)``), and placement is strict: an original key we cannot place, or a module
  parameter left unloaded, is an error.  The text config comes from the ORIGINAL config.json
  (GQA heads, ``rope_theta``, Phi-3's ``sliding_window`` ...).
* ``OriginalVipLlava.preprocess``: ``llava/mm_utils.py`` ``process_images`` (``image_aspect_ratio``
  "pad": ``expand2square`` with ``tuple(int(x * 255) for x in image_mean)``; "resize"), followed
  by transformers 4.31's ``CLIPImageProcessor.preprocess`` (``image_processing_clip.py`` and
  ``image_transforms.py``: ``get_resize_output_image_size(default_to_square=False)``, PIL resize,
  ``center_crop``, ``rescale``, ``normalize``) done by hand with PIL + numpy.
* ``OriginalVipLlava.tokenize``: ``llava/mm_utils.py`` ``tokenizer_image_token``
  (:func:`tokenizer_image_token`) on top of the tokenizer ``llava/model/builder.py`` loaded:
  Vicuna: the slow ``LlamaTokenizer`` (``use_fast=False``) of transformers 4.37.2 -- the pin of
  the original code's HEAD -- restated in ``LlamaSlowTokenizer`` (``tokenization_llama.py``:
  ``legacy`` and non-legacy ``tokenize`` / ``_tokenize``, the latter with sentencepiece's dummy
  prefix disabled and the unk-prefix trick; ``PreTrainedTokenizer.tokenize``: cutting around added
  tokens, AddedToken ``lstrip`` / ``rstrip`` / ``single_word``).  The 4.31.0 era (the Vicuna
  7B/13B release pin) is kept as ``era="4.31.0"``: it differs in non-legacy mode after a special
  token, and plain-string special tokens strip both sides there.  Llama-3 and Phi-3:
  the FAST tokenizer (``use_fast=True``; Llama-3 has no slow class), i.e. the base model's
  ``tokenizer.json`` run by ``tokenizers`` itself (``FastTokenizer``): Llama-3's
  ``PreTrainedTokenizerFast`` keeps the file's post-processor (which adds
  ``<|begin_of_text|>``), Phi-3's ``LlamaTokenizerFast`` replaces it by BOS/EOS according to
  ``add_bos_token`` / ``add_eos_token`` (``update_post_processor``).  A Phi-3 folder with only
  ``tokenizer.model`` (LLaVA's ``train.py`` saved ``use_fast=False``) gets the fast tokenizer
  4.37.2 converted from it (``llama_fast_from_sentencepiece``: ``LlamaConverter`` +
  ``SentencePieceExtractor`` restated with ``tokenizers`` building blocks); measured equal to
  4.37.2's on the real Phi-3 vocabulary (446 of 446 prompts in ``tests/test_reference.py``).
* ``OriginalVipLlava.image_features``: ``llava/model/multimodal_encoder/clip_4layer_encoder.py``
  (``CLIPVisionTowerMultilayer.feature_select``: hidden states [-2, -5, -8, -11, 6], CLS dropped,
  concatenated on channels) and ``llava/model/multimodal_projector/builder.py``
  (``SimpleFeatureSingleModel``: LayerNorm(eps 1e-5) -> ``mlp2x_gelu``), the projector written
  with ``torch.nn.functional``.
* ``OriginalVipLlava.forward``: ``llava/model/llava_arch.py``
  ``prepare_inputs_labels_for_multimodal`` (embed the non-image ids, replace every -200 by the
  next image's features, truncate to ``tokenizer_model_max_length``, positions 0..T-1 over the
  spliced sequence) followed by the text model.
* ``OriginalVipLlava.generate_greedy``: ``generate`` with ``do_sample=False`` (greedy) and the
  eval scripts' terminators (``llava/eval/model_vqa.py``: ``eos_token_id=[tokenizer eos,
  <|eot_id|>]`` for Llama-3, ``[tokenizer eos, <|end|>]`` for Phi-3, the eos for Vicuna).
  Like the original (``llava_llama.py`` ``generate``: the spliced ``inputs_embeds`` are built
  once, then transformers' ``generate`` continues with the key/value cache), one forward over the
  prompt is followed by one cached text-model step per new token (``continue_greedy``; each new
  id embedded at the next position).  ``incremental=False`` re-runs the whole forward per token,
  the yardstick the cached path is tested against.  ``builder.py`` resized the
  embeddings to ``len(tokenizer)`` before generating, so the original could only emit ids below
  ``min(len(tokenizer), rows)``; the argmax is taken over those.

Both models run with ``attn_implementation="eager"``: plain matmul/softmax attention is
deterministic on CPU and does not depend on which fused SDPA kernel a torch build selects.

Cross-checked against the real libraries on the real Llama-2 vocabulary (``tests/test_reference.py``,
skipped unless ``VIPLLAVA_TF437_PYTHON`` / ``VIPLLAVA_TF431_PYTHON`` name a Python with that
transformers): each era's slow tokenizer gives transformers' ids on 2012 of 2012 random prompts for
eight configs (Vicuna v1.5's, legacy true / absent / null, plain-string special tokens,
lstrip/rstrip flags, an ``added_tokens_decoder``).  Cross-checked during development against
transformers 4.31.0: the
preprocessing is bitwise equal to 4.31's ``CLIPImageProcessor`` after ``expand2square``; the whole
forward on a tiny checkpoint matches a 4.31 Llama + CLIP run of the original pipeline to ~3e-6 in
fp32 logits.  The
conversation renderer reproduces, byte for byte, the strings the original ``conversation.py``
printed (``tests/test_reference.py``).

Memory: with ``dtype=torch.bfloat16`` and bf16 storages, ``.bin`` tensors stay memory-mapped
and are assigned without a copy; float32 needs 4 bytes per parameter in RAM.

Deliberate deviations from the original (all make the reference stricter, not different):
images whose count does not match the number of -200 sentinels raise (the original silently
ignored surplus images); images are converted to RGB before padding (the original callers
opened images with ``.convert("RGB")`` before ``process_images``); a Phi-3 ``rope_scaling``
other than null is refused (the ViP-LLaVA base, Phi-3-mini-4k, has none; the vendored
"su"/"yarn" embeddings are not restated).  Not restated: the exact edge of Phi-3's sliding
window (it only matters for spliced sequences longer than ``sliding_window``, 2047 for the real
model, which ``tokenizer_model_max_length`` 2048 nearly rules out).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import PIL.Image
import sentencepiece as spm
import torch
import torch.nn.functional as F
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PretrainedConfig,
)

from convert.safejson import clean, confined, load_json  # file-reading plumbing only, no model facts

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
    "TOKENIZER_ERAS",
    "DEFAULT_TOKENIZER_ERA",
    "tokenizer_image_token",
    "expected_layout",
    "ReferenceOutput",
    "OriginalVipLlava",
    "LlamaSlowTokenizer",
    "FastTokenizer",
    "ClipPreprocessSettings",
    "load_original_state_dict",
    "list_checkpoint_files",
    "OriginalLoadError",
]

IMAGE_SENTINEL = -200
FEATURE_LAYERS: tuple[int, ...] = (-2, -5, -8, -11, 6)
SPIECE_UNDERLINE = "\u2581"

VISION_PREFIX = "model.vision_tower.vision_tower."
PROJECTOR_PREFIX = "model.mm_projector."
PROJECTOR_KEYS = (
    "clip_layernorm.weight",
    "clip_layernorm.bias",
    "final_linear.0.weight",
    "final_linear.0.bias",
    "final_linear.2.weight",
    "final_linear.2.bias",
)
_LEGACY_ROTARY = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_LEGACY_POSITION_IDS = re.compile(r"^model\.vision_tower\.vision_tower\.(vision_model\.)?embeddings\.position_ids$")


class OriginalLoadError(ValueError):
    """The original checkpoint does not match the model its config describes."""


# --------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------

_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def list_checkpoint_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """Shard files of an original checkpoint folder, and the index's weight map if sharded.

    Prefers safetensors over pickles and an index over a single file, like the original's
    ``from_pretrained`` would have found them.
    """
    folder = Path(folder)
    for name in _INDEX_FILES:
        index_path = folder / name
        if index_path.is_file():
            # plumbing shared with the converter on purpose (bounded, strict JSON; names confined to the folder
            # before anything is opened): it judges no model fact
            index = load_json(index_path, OriginalLoadError, dict, hint="re-download the checkpoint's index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise OriginalLoadError(
                    f"{index_path}: expected a weight_map of tensor name -> shard file name; re-download the index"
                )
            files = sorted(set(weight_map.values()))
            paths = [confined(folder, f, OriginalLoadError, index_path, "shard") for f in files]
            missing = [f for f, p in zip(files, paths, strict=True) if not p.is_file()]
            if missing:
                raise OriginalLoadError(
                    f"{index_path} names shard(s) that do not exist: {[clean(m, 100) for m in missing[:5]]}"
                )
            return paths, dict(weight_map)
    for name in _SINGLE_FILES:
        if (folder / name).is_file():
            return [folder / name], None
    raise OriginalLoadError(f"no checkpoint in {folder}: expected one of {list(_INDEX_FILES) + list(_SINGLE_FILES)}")


def _read_shard(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".safetensors"):
        from safetensors import safe_open

        out = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
        return out
    if path.name.endswith(".bin"):
        # Never unpickle arbitrary objects: weights_only=True.
        obj = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise OriginalLoadError(f"{path} is not a flat state dict of tensors")
        return obj
    raise OriginalLoadError(f"unsupported shard format: {path}")


def load_original_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an original checkpoint folder, keys exactly as stored."""
    files, weight_map = list_checkpoint_files(Path(folder))
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for path in files:
        for key, tensor in _read_shard(path).items():
            if key in state:
                raise OriginalLoadError(f"key {key!r} appears in both {origin[key]} and {path.name}")
            if weight_map is not None and weight_map.get(key) != path.name:
                raise OriginalLoadError(
                    f"key {key!r} found in {path.name} but the index puts it in {weight_map.get(key)!r}"
                )
            state[key] = tensor
            origin[key] = path.name
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(state))
        if absent:
            raise OriginalLoadError(f"index names key(s) absent from the shards: {absent[:10]}")
    return state


# --------------------------------------------------------------------------------------------
# Tokenizer: transformers' slow LlamaTokenizer (4.37.2, and the 4.31.0 era), restated
# --------------------------------------------------------------------------------------------

#: transformers releases whose slow LlamaTokenizer is restated here. The original code's HEAD pins 4.37.2
#: (with tokenizers 0.15.1); the Vicuna 7B/13B checkpoints were released while it pinned 4.31.0. The two
#: differ in non-legacy mode after a special token and in how plain-string special tokens strip whitespace.
TOKENIZER_ERAS = ("4.37.2", "4.31.0")
DEFAULT_TOKENIZER_ERA = "4.37.2"
_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_LLAMA_DEFAULTS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@dataclass(frozen=True)
class _SpecialToken:
    content: str
    # None: a plain string special token (4.31 strips whitespace on both sides of those);
    # otherwise the AddedToken's flags.
    lstrip: bool | None
    rstrip: bool | None
    single_word: bool = False


def _as_special(value: Any, wrap_plain: bool) -> _SpecialToken | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return _SpecialToken(
            str(value["content"]),
            bool(value.get("lstrip", False)),
            bool(value.get("rstrip", False)),
            bool(value.get("single_word", False)),
        )
    if isinstance(value, str):
        if (
            wrap_plain
        ):  # LlamaTokenizer.__init__ wraps bos/eos/unk/pad strings in AddedToken(lstrip=False, rstrip=False)
            return _SpecialToken(value, False, False)
        return _SpecialToken(value, None, None)
    raise OriginalLoadError(f"unsupported special-token entry: {value!r}")


def _split_on_tokens(text: str, contents: Sequence[str]) -> list[str]:
    """``text`` cut around every occurrence of ``contents`` (leftmost match first, the longest of those starting
    there), empty pieces dropped, like 4.37's ``Trie.split``."""
    if not contents or not text:
        return [text] if text else []
    pattern = re.compile("(" + "|".join(re.escape(c) for c in sorted(set(contents), key=len, reverse=True)) + ")")
    return [p for p in pattern.split(text) if p]


def _spm_without_dummy_prefix(model_file: Path) -> spm.SentencePieceProcessor:
    """The sentencepiece model with ``normalizer_spec.add_dummy_prefix`` off (4.37 ``get_spm_processor``,
    non-legacy)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto.SerializeToString())
    return sp


class LlamaSlowTokenizer:
    """The slow sentencepiece ``LlamaTokenizer`` (``use_fast=False``) as the original loaded it, for one
    transformers era (``era``, one of :data:`TOKENIZER_ERAS`; default 4.37.2, the original code's pin).

    Both eras: BOS is prepended (``add_bos_token``, default True), EOS appended if ``add_eos_token``; the text is
    split on the special-token strings first; every other piece goes through sentencepiece.

    * 4.37.2 (``tokenization_llama.py`` + ``PreTrainedTokenizer.tokenize``): ``legacy`` absent or null means True.
      The text is cut around every added token (``Trie.split``); a token's AddedToken flags (``lstrip``/``rstrip``/
      ``single_word``) strip the neighbouring text; plain-string special tokens strip nothing. Flags come from
      ``added_tokens_decoder`` when ``tokenizer_config.json`` has one (``special_tokens_map.json`` is then not read),
      else from the config's entries overridden by ``special_tokens_map.json``; when several special attributes
      share one token, the last (bos, eos, unk, sep, pad, cls, mask, additional) sets its flags.
      Legacy: every piece is ``sp.encode(piece)`` (dummy prefix on). Non-legacy: ``tokenize`` encodes
      ``"\u2581" + text`` (with "\u2581" in the text replaced by spaces) and drops a leading lone "\u2581" piece when a
      special token follows it; ``_tokenize`` runs sentencepiece with the dummy prefix OFF, and a piece starting with
      "\u2581" or a space is encoded as ``unk_token + piece`` with the unk token's own pieces cut off again.
    * 4.31.0: ``legacy`` absent means True, an explicit null is falsy (non-legacy). Plain-string special tokens from
      ``special_tokens_map.json`` / ``additional_special_tokens`` strip both sides; bos/eos/unk/pad strings from
      ``tokenizer_config.json`` are AddedTokens that strip nothing. Non-legacy: "\u2581" is prepended to the whole
      text once, and every piece after a special token has the leading "\u2581" of its first sentencepiece piece
      removed (unless it starts with a space); the remainder is looked up as a piece (which can give ``<unk>``).
    """

    def __init__(self, text_model: Path, era: str = DEFAULT_TOKENIZER_ERA):
        if era not in TOKENIZER_ERAS:
            raise ValueError(f"tokenizer era {era!r}: expected one of {TOKENIZER_ERAS}")
        self.era = era
        text_model = Path(text_model)
        model_file = text_model / "tokenizer.model"
        if not model_file.is_file():
            raise OriginalLoadError(f"{model_file} not found")
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        cfg_path = text_model / "tokenizer_config.json"
        cfg = _read_json(cfg_path)
        added_path = text_model / "added_tokens.json"
        if added_path.is_file() and json.loads(added_path.read_text() or "{}"):
            raise OriginalLoadError(f"{added_path} adds tokens; the original ViP-LLaVA tokenizer had none")
        if era == "4.31.0":
            # LlamaTokenizer(legacy=True) by default; an explicit null is falsy -> non-legacy.
            self.legacy = bool(cfg.get("legacy", True))
        else:
            # legacy=None -> a warning, then legacy = True.
            self.legacy = True if cfg.get("legacy") is None else bool(cfg["legacy"])
        self.add_bos_token = bool(cfg.get("add_bos_token", True))
        self.add_eos_token = bool(cfg.get("add_eos_token", False))
        self._ids: dict[str, int] = {}  # added tokens beyond the sentencepiece pieces (4.37 added_tokens_decoder)
        if era == "4.31.0":
            specials = self._specials_431(cfg, text_model)
        else:
            specials = self._specials_437(cfg, text_model, cfg_path)
        self.bos_id = self._special_id(specials["bos_token"])
        self.eos_id = self._special_id(specials["eos_token"])
        self.unk_id = self._special_id(specials["unk_token"])
        self.bos_token = specials["bos_token"].content if specials["bos_token"] else None
        self.eos_token = specials["eos_token"].content if specials["eos_token"] else None
        self.unk_token = specials["unk_token"].content if specials["unk_token"] else None
        self.all_special_tokens = {t.content for a in _SPECIAL_ATTRS if (t := specials[a]) is not None}
        self.all_special_tokens |= {t.content for t in specials["additional_special_tokens"] if t is not None}
        self._contents = sorted(self._strip, key=len, reverse=True)
        self._split_re = (
            re.compile("(" + "|".join(re.escape(c) for c in self._contents) + ")") if self._contents else None
        )
        if era != "4.31.0" and not self.legacy:
            if self.unk_token is None:
                raise OriginalLoadError(f"{cfg_path}: non-legacy LlamaTokenizer needs an unk_token")
            self.sp_plain = _spm_without_dummy_prefix(model_file)
            self.unk_token_length = len(self.sp_plain.encode(self.unk_token))

    # -- special tokens per era ---------------------------------------------------------------
    def _specials_431(self, cfg: dict[str, Any], text_model: Path) -> dict[str, Any]:
        wrapped = {"bos_token", "eos_token", "unk_token", "pad_token"}
        specials: dict[str, Any] = {}
        for a in _SPECIAL_ATTRS:
            specials[a] = _as_special(cfg.get(a, _LLAMA_DEFAULTS.get(a)), wrap_plain=a in wrapped)
        specials["additional_special_tokens"] = [
            _as_special(v, wrap_plain=False) for v in (cfg.get("additional_special_tokens") or [])
        ]
        # special_tokens_map.json is applied afterwards with setattr: it overrides, and plain
        # strings there stay plain strings.
        for key, value in _read_json(text_model / "special_tokens_map.json").items():
            if key == "additional_special_tokens":
                specials[key] = [_as_special(v, wrap_plain=False) for v in (value or [])]
            elif key in _SPECIAL_ATTRS:
                specials[key] = _as_special(value, wrap_plain=False)
        ordered: list[_SpecialToken] = [specials[a] for a in _SPECIAL_ATTRS if specials[a] is not None]
        ordered += [t for t in specials["additional_special_tokens"] if t is not None]
        # Flags per content: the first AddedToken with that content wins; a content that only
        # ever appears as a plain string strips both sides.
        self._strip: dict[str, tuple[bool | None, bool | None, bool]] = {}
        for tok in ordered:
            self._special_id(tok)
            if tok.lstrip is not None and tok.content not in self._strip:
                self._strip[tok.content] = (tok.lstrip, tok.rstrip, False)
        for tok in ordered:
            self._strip.setdefault(tok.content, (True, True, False))
        return specials

    def _added_tokens_437(self, decoder: Any, cfg_path: Path) -> dict[str, _SpecialToken]:
        """from_pretrained's added_tokens_map from tokenizer_config.json's added_tokens_decoder; each token must sit
        at its id in tokenizer.model or, when tokenizer.model lacks it, beyond tokenizer.model's pieces."""
        known: dict[str, _SpecialToken] = {}
        if not isinstance(decoder, dict):
            raise OriginalLoadError(f"{cfg_path}: added_tokens_decoder must be an object")
        for sid, entry in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            if not isinstance(entry, dict) or "content" not in entry:
                raise OriginalLoadError(f"{cfg_path}: added_tokens_decoder[{sid}] is not an AddedToken: {entry!r}")
            tok = _as_special(entry, wrap_plain=True)
            assert tok is not None  # a dict entry always makes a token
            known[tok.content] = tok
            pid = self.sp.piece_to_id(tok.content)
            in_vocab = not (pid == self.sp.unk_id() and tok.content != self.sp.id_to_piece(pid))
            if in_vocab and pid != int(sid):
                raise OriginalLoadError(
                    f"{cfg_path}: added token {tok.content!r} has id {sid}, but tokenizer.model has it at {pid}"
                )
            if not in_vocab:
                if int(sid) < self.sp.get_piece_size():
                    raise OriginalLoadError(
                        f"{cfg_path}: added token {tok.content!r} claims id {sid}, which tokenizer.model gives to "
                        f"{self.sp.id_to_piece(int(sid))!r}"
                    )
                self._ids[tok.content] = int(sid)
        return known

    def _specials_437(self, cfg: dict[str, Any], text_model: Path, cfg_path: Path) -> dict[str, Any]:
        values: dict[str, Any] = {a: cfg.get(a, _LLAMA_DEFAULTS.get(a)) for a in _SPECIAL_ATTRS}
        values["additional_special_tokens"] = list(cfg.get("additional_special_tokens") or [])
        known: dict[str, _SpecialToken] = {}  # from_pretrained's added_tokens_map
        decoder = cfg.get("added_tokens_decoder")
        if decoder is not None:
            known = self._added_tokens_437(decoder, cfg_path)
        else:
            # legacy loading: special_tokens_map.json overrides the config's entries
            for key, value in _read_json(text_model / "special_tokens_map.json").items():
                if key == "additional_special_tokens" and isinstance(value, list):
                    for v in value:
                        if all(_token_content(v) != _token_content(w) for w in values[key]):
                            values[key].append(v)
                elif key in _SPECIAL_ATTRS:
                    values[key] = value
        specials: dict[str, Any] = {}
        for a in _SPECIAL_ATTRS:
            tok = _as_special(values[a], wrap_plain=True)
            specials[a] = known.get(tok.content, tok) if tok is not None else None
        specials["additional_special_tokens"] = [
            known.get(t.content, t) if t is not None else None
            for t in (_as_special(v, wrap_plain=True) for v in values["additional_special_tokens"])
        ]
        self._strip = {t.content: (t.lstrip, t.rstrip, t.single_word) for t in known.values()}
        # PreTrainedTokenizer.__init__ adds every special token again, in attribute order: the last one with a
        # given content sets its flags.
        for tok in [specials[a] for a in _SPECIAL_ATTRS] + specials["additional_special_tokens"]:
            if tok is not None:
                self._special_id(tok)
                self._strip[tok.content] = (bool(tok.lstrip), bool(tok.rstrip), tok.single_word)
        return specials

    def _special_id(self, tok: _SpecialToken | None) -> int | None:
        if tok is None:
            return None
        if tok.content in self._ids:
            return self._ids[tok.content]
        pid = self.sp.piece_to_id(tok.content)
        if pid == self.sp.unk_id() and tok.content != self.sp.id_to_piece(self.sp.unk_id()):
            raise OriginalLoadError(
                f"special token {tok.content!r} is not in the sentencepiece vocabulary; "
                "the original ViP-LLaVA vocabulary had no added tokens"
            )
        return pid

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    # -- tokenize ---------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        if self.era == "4.31.0":
            return self._tokenize_431(text)
        if self.legacy or not text:
            return self._split_and_encode_437(text)
        pieces = self._split_and_encode_437(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "))
        if len(pieces) > 1 and pieces[0] == SPIECE_UNDERLINE and pieces[1] in self.all_special_tokens:
            pieces = pieces[1:]
        return pieces

    def _split_and_encode_437(self, text: str) -> list[str]:
        """PreTrainedTokenizer.tokenize (4.37): cut around added tokens, apply their flags, encode the rest."""
        parts = _split_on_tokens(text, self._contents)
        for i, part in enumerate(parts):
            if part not in self._strip:
                continue
            lstrip, rstrip, single_word = self._strip[part]
            left = parts[i - 1] if i > 0 else None
            right = parts[i + 1] if i < len(parts) - 1 else None
            if rstrip and right:
                parts[i + 1] = right.lstrip()
            if lstrip and left:
                parts[i - 1] = left.rstrip()
            if single_word and left and left[-1] != " ":
                parts[i - 1] += part
                parts[i] = ""
            elif single_word and right and right[0] != " ":
                parts[i + 1] = part + parts[i + 1]
                parts[i] = ""
        pieces: list[str] = []
        for part in parts:
            if not part:
                continue
            if part in self._strip:
                pieces.append(part)
            else:
                pieces.extend(self._tokenize_437(part))
        return pieces

    def _tokenize_437(self, text: str) -> list[str]:
        """LlamaTokenizer._tokenize (4.37)."""
        if self.legacy:
            return self.sp.encode(text, out_type=str)
        if not text.startswith((SPIECE_UNDERLINE, " ")):
            return self.sp_plain.encode(text, out_type=str)
        assert self.unk_token is not None, "non-legacy tokenization needs the unk token"
        pieces = self.sp_plain.encode(self.unk_token + text, out_type=str)
        return pieces[self.unk_token_length :] if len(pieces) >= self.unk_token_length else pieces

    # -- PreTrainedTokenizer.tokenize (4.31) ------------------------------------------------
    def _tokenize_431(self, text: str) -> list[str]:
        if not self.legacy:
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        parts = [p for p in self._split_re.split(text)] if self._split_re else [text]
        # re.split with one capture group alternates text, special, text, ...; drop the empty
        # text slots but remember which entries are special tokens.
        segs: list[tuple[str, bool]] = []
        for i, p in enumerate(parts):
            is_special = i % 2 == 1
            if p or is_special:
                segs.append((p, is_special))
        for i, (p, is_special) in enumerate(segs):
            if not is_special:
                continue
            lstrip, rstrip, _ = self._strip[p]
            if rstrip and i + 1 < len(segs) and segs[i + 1][0]:
                segs[i + 1] = (segs[i + 1][0].lstrip(), segs[i + 1][1])
            if lstrip and i > 0 and segs[i - 1][0]:
                segs[i - 1] = (segs[i - 1][0].rstrip(), segs[i - 1][1])
        pieces: list[str] = []
        for p, is_special in segs:
            if not p:
                continue
            if is_special:
                pieces.append(p)
            else:
                pieces.extend(self._piece_431(p))
        return pieces

    # -- LlamaTokenizer._tokenize (4.31) ----------------------------------------------------
    def _piece_431(self, text: str) -> list[str]:
        if self.legacy:
            return self.sp.encode(text, out_type=str)
        is_first = text.startswith(SPIECE_UNDERLINE)
        if is_first:
            text = text[1:]
        pieces = self.sp.encode(text, out_type=str)
        if not is_first and not text.startswith(" ") and pieces and pieces[0].startswith(SPIECE_UNDERLINE):
            pieces = ([pieces[0][1:]] if len(pieces[0]) > 1 else []) + pieces[1:]
        return pieces

    def _piece_id(self, piece: str) -> int:
        return self._ids[piece] if piece in self._ids else self.sp.piece_to_id(piece)

    def encode(self, text: str) -> list[int]:
        """``tokenizer(text).input_ids`` of the original slow tokenizer."""
        ids = [self._piece_id(p) for p in self.tokenize(text)]
        # as transformers' build_inputs_with_special_tokens: [bos_token_id] even when it is None
        if self.add_bos_token:
            ids = [self.bos_id] + ids  # type: ignore[assignment]
        if self.add_eos_token:
            ids = ids + [self.eos_id]  # type: ignore[list-item]
        return ids

    def __len__(self) -> int:
        """``len(tokenizer)``: the sentencepiece pieces plus any added token beyond them."""
        return self.sp.get_piece_size() + len(self._ids)

    def token_id(self, token: str) -> int | None:
        """``convert_tokens_to_ids(token)``, or None when the vocabulary lacks it."""
        if token in self._ids:
            return self._ids[token]
        pid = self.sp.piece_to_id(token)
        return None if pid == self.sp.unk_id() and token != self.sp.id_to_piece(pid) else pid

    def encode_with_images(self, prompt: str, image_token: str = "<image>") -> list[int]:
        return tokenizer_image_token(prompt, self.encode, self.bos_id, image_token)


def tokenizer_image_token(
    prompt: str, encode: Callable[[str], list[int]], bos_id: int | None, image_token: str = "<image>"
) -> list[int]:
    """llava/mm_utils.py ``tokenizer_image_token``: ids with ``IMAGE_SENTINEL`` for each ``<image>``.

    Every chunk between ``<image>`` markers is tokenized on its own (``tokenizer(chunk).input_ids``,
    special tokens added).  When the first chunk starts with the BOS, that BOS is kept once and
    the first id of EVERY chunk (its own BOS) is dropped; otherwise nothing is dropped.
    """
    chunks = [encode(c) for c in prompt.split(image_token)]
    out: list[int] = []
    offset = 0
    if chunks and chunks[0] and bos_id is not None and chunks[0][0] == bos_id:
        offset = 1
        out.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i > 0:
            out.append(IMAGE_SENTINEL)
        out.extend(chunk[offset:])
    return out


# --------------------------------------------------------------------------------------------
# Tokenizer: transformers' fast tokenizer as builder.py loaded it (use_fast=True)
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except json.JSONDecodeError as e:
        raise OriginalLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise OriginalLoadError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:
        return str(value["content"])
    raise OriginalLoadError(f"unsupported special-token entry: {value!r}")


def _sentencepiece_bpe_merges(pieces: Sequence[tuple[str, float]], known: Mapping[str, int]) -> list[tuple[str, str]]:
    """The BPE merges transformers 4.37.2's ``SentencePieceExtractor.extract(vocab_scores)`` derives from a
    sentencepiece model, restated: every way to cut a piece into two pieces of the model (``known``: piece -> id),
    those of one piece ordered by the two halves' ids, all of them then ranked by the score of the piece they make,
    highest first (a stable sort, so equal scores keep the pieces' id order)."""
    ranked: list[tuple[float, str, str]] = []
    for piece, score in pieces:
        cuts = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        cuts = [(a, b) for a, b in cuts if a in known and b in known]
        cuts.sort(key=lambda ab: (known[ab[0]], known[ab[1]]))
        ranked.extend((score, a, b) for a, b in cuts)
    ranked.sort(key=lambda t: t[0], reverse=True)
    return [(a, b) for _, a, b in ranked]


def llama_fast_from_sentencepiece(model_file: Path, cfg: Mapping[str, Any], cfg_path: Path):
    """The ``tokenizers.Tokenizer`` that transformers 4.37.2's ``LlamaTokenizerFast.from_pretrained`` built from a
    folder with only ``tokenizer.model`` (``LlamaConverter`` + ``PreTrainedTokenizerFast.__init__``), restated with
    tokenizers' own building blocks:

    * a byte-fallback BPE (``fuse_unk``; unk = the model's unk piece) over the pieces, the first three renamed
      ``<unk>``, ``<s>``, ``</s>``, with the merges of :func:`_sentencepiece_bpe_merges`;
    * normalizer: prepend "▁", then every space -> "▁" (per text segment between added tokens); no
      pre-tokenizer;
    * added tokens: ``<unk>``, ``<s>``, ``</s>`` (special, not normalized), then every ``added_tokens_decoder`` entry
      of ``tokenizer_config.json`` in id order with its own flags (an entry for a token already there replaces its
      flags), then any special token the config names that is still missing.
    Only BPE models (Llama-2 / Phi-3) are restated; anything else is refused."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2
    from tokenizers import AddedToken, Tokenizer, normalizers
    from tokenizers.models import BPE

    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(model_file).read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise OriginalLoadError(f"{model_file}: not a sentencepiece model ({e})") from None
    if proto.trainer_spec.model_type != model_pb2.TrainerSpec.BPE:
        raise OriginalLoadError(
            f"{model_file}: a sentencepiece model of type {proto.trainer_spec.model_type}; only BPE (Llama-2, Phi-3) "
            "is "
            "restated for building the fast tokenizer; pass the base model's tokenizer.json"
        )
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(p.piece, p.score) for p in proto.pieces[3:]]
    known = {p.piece: i for i, p in enumerate(proto.pieces)}
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    bpe = BPE(
        vocab,
        _sentencepiece_bpe_merges(pieces, known),
        unk_token=proto.trainer_spec.unk_piece,
        fuse_unk=True,
        byte_fallback=True,
    )
    tk = Tokenizer(bpe)
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    decoder = cfg.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise OriginalLoadError(f"{cfg_path}: added_tokens_decoder must be an object")
    for sid, entry in sorted(decoder.items(), key=lambda kv: int(kv[0])):
        if not isinstance(entry, dict) or "content" not in entry:
            raise OriginalLoadError(f"{cfg_path}: added_tokens_decoder[{sid}] is not an AddedToken: {entry!r}")
        special = bool(entry.get("special", False))
        token = AddedToken(
            str(entry["content"]),
            single_word=bool(entry.get("single_word", False)),
            lstrip=bool(entry.get("lstrip", False)),
            rstrip=bool(entry.get("rstrip", False)),
            normalized=bool(entry.get("normalized", not special)),
            special=special,
        )
        (tk.add_special_tokens if special else tk.add_tokens)([token])
    named = [
        cfg.get(k) for k in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
    ]
    named += list(cfg.get("additional_special_tokens") or [])
    for value in named:
        content = _token_content(value)
        if content is not None and tk.token_to_id(content) is None:
            flags = value if isinstance(value, dict) else {}
            tk.add_special_tokens(
                [
                    AddedToken(
                        content,
                        lstrip=bool(flags.get("lstrip", False)),
                        rstrip=bool(flags.get("rstrip", False)),
                        normalized=False,
                        special=True,
                    )
                ]
            )
    return tk


class FastTokenizer:
    """A base model's ``tokenizer.json``, run by ``tokenizers`` as transformers' fast tokenizer did.

    ``bos_policy``:

    * ``"post_processor"`` (Llama-3, ``PreTrainedTokenizerFast``): ``tokenizer(text)`` is the file's
      own pipeline with special tokens, i.e. its ``TemplateProcessing`` post-processor prepends
      ``<|begin_of_text|>`` to every encode.
    * ``"add_bos_token"`` (Phi-3, ``LlamaTokenizerFast``): its ``update_post_processor`` replaces
      the file's post-processor by ``bos`` if ``add_bos_token`` (default true) and ``eos`` if
      ``add_eos_token`` (default false) from ``tokenizer_config.json``.

    bos / eos come from ``tokenizer_config.json``, overridden by ``special_tokens_map.json`` (as
    ``from_pretrained`` merged them).  Strict: every ``added_tokens_decoder`` entry of the config
    must sit at the same id in ``tokenizer.json``, and the ids must be 0..len-1.
    """

    POLICIES = ("post_processor", "add_bos_token")

    def __init__(self, text_model: Path, bos_policy: str):
        from tokenizers import Tokenizer

        if bos_policy not in self.POLICIES:
            raise ValueError(f"bos_policy {bos_policy!r}: expected one of {self.POLICIES}")
        text_model = Path(text_model)
        path = text_model / "tokenizer.json"
        cfg_path = text_model / "tokenizer_config.json"
        cfg = _read_json(cfg_path)
        if path.is_file():
            try:
                self.tk = Tokenizer.from_file(str(path))
            except Exception as e:  # tokenizers raises its own exception type for a malformed file
                raise OriginalLoadError(f"{path}: unreadable tokenizer ({str(e).splitlines()[0]})") from None
            self.source = "tokenizer.json"
        elif bos_policy == "add_bos_token" and (text_model / "tokenizer.model").is_file():
            # LlamaTokenizerFast from a slow-only folder: transformers 4.37.2 converted tokenizer.model itself
            self.tk = llama_fast_from_sentencepiece(text_model / "tokenizer.model", cfg, cfg_path)
            self.source = "tokenizer.model (converted like transformers 4.37.2's LlamaConverter)"
        else:
            raise OriginalLoadError(
                f"{path} not found: the original inference loaded this backbone's fast tokenizer (builder.py "
                "use_fast=True)"
                + ("" if bos_policy == "post_processor" else " and there is no tokenizer.model to build it from")
            )
        self.bos_policy = bos_policy
        specials = {k: _token_content(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        for k, v in _read_json(text_model / "special_tokens_map.json").items():
            if k in specials:
                specials[k] = _token_content(v)
        self.add_bos_token = bool(cfg.get("add_bos_token", True))
        self.add_eos_token = bool(cfg.get("add_eos_token", False))
        self.bos_token, self.eos_token = specials["bos_token"], specials["eos_token"]
        self.bos_id = self._required(self.bos_token, "bos_token", cfg_path)
        self.eos_id = self._required(self.eos_token, "eos_token", cfg_path)
        for sid, entry in (cfg.get("added_tokens_decoder") or {}).items():
            content = _token_content(entry)
            found = self.tk.token_to_id(content) if content is not None else None
            if found != int(sid):
                raise OriginalLoadError(
                    f"{cfg_path}: added token {content!r} has id {sid}, but {path.name} gives "
                    f"{found}; the two files do not describe one tokenizer"
                )
        vocab = self.tk.get_vocab(with_added_tokens=True)
        self._len = self.tk.get_vocab_size(with_added_tokens=True)
        if sorted(vocab.values()) != list(range(self._len)):
            raise OriginalLoadError(f"{path}: token ids are not 0..{self._len - 1} without gaps")
        if bos_policy == "add_bos_token" and self.add_bos_token and self.bos_id is None:
            raise OriginalLoadError(f"{cfg_path}: add_bos_token is true but there is no bos_token")

    def _required(self, content: str | None, what: str, cfg_path: Path) -> int | None:
        if content is None:
            return None
        tid = self.tk.token_to_id(content)
        if tid is None:
            raise OriginalLoadError(f"{cfg_path}: {what} {content!r} is not in tokenizer.json")
        return tid

    def __len__(self) -> int:
        return self._len

    def token_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """``tokenizer(text).input_ids`` of the fast tokenizer."""
        if self.bos_policy == "post_processor":
            return list(self.tk.encode(text, add_special_tokens=True).ids)
        ids = list(self.tk.encode(text, add_special_tokens=False).ids)
        if self.add_bos_token:  # as transformers: [bos_token_id] even when it is None
            ids = [self.bos_id] + ids  # type: ignore[assignment]
        if self.add_eos_token and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def tokens(self, ids: Sequence[int]) -> list[str | None]:  # None for an id the tokenizer lacks
        return [self.tk.id_to_token(int(i)) for i in ids]

    def encode_with_images(self, prompt: str, image_token: str = "<image>") -> list[int]:
        return tokenizer_image_token(prompt, self.encode, self.bos_id, image_token)


# --------------------------------------------------------------------------------------------
# Image preprocessing: expand2square + transformers 4.31 CLIPImageProcessor, restated
# --------------------------------------------------------------------------------------------


@dataclass
class ClipPreprocessSettings:
    shortest_edge: int
    crop_height: int
    crop_width: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    resample: int = 3
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @classmethod
    def from_file(cls, path: Path) -> "ClipPreprocessSettings":
        d = json.loads(Path(path).read_text())
        size = d.get("size", 224)
        if isinstance(size, int):
            shortest = size  # get_size_dict(int, default_to_square=False)
        elif isinstance(size, dict) and "shortest_edge" in size:
            shortest = int(size["shortest_edge"])
        else:
            raise OriginalLoadError(f"CLIP resize needs size['shortest_edge'], got {size!r}")
        crop = d.get("crop_size", 224)
        if isinstance(crop, int):
            ch = cw = crop  # get_size_dict(int, default_to_square=True)
        elif isinstance(crop, dict) and "height" in crop and "width" in crop:
            ch, cw = int(crop["height"]), int(crop["width"])
        elif isinstance(crop, dict) and "shortest_edge" in crop:
            ch = cw = int(crop["shortest_edge"])
        else:
            raise OriginalLoadError(f"unsupported crop_size {crop!r}")
        mean = d.get("image_mean", [0.48145466, 0.4578275, 0.40821073])
        std = d.get("image_std", [0.26862954, 0.26130258, 0.27577711])
        return cls(
            shortest_edge=shortest,
            crop_height=ch,
            crop_width=cw,
            image_mean=tuple(float(m) for m in mean),
            image_std=tuple(float(s) for s in std),
            resample=int(d.get("resample", 3)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            do_resize=bool(d.get("do_resize", True)),
            do_center_crop=bool(d.get("do_center_crop", True)),
            do_rescale=bool(d.get("do_rescale", True)),
            do_normalize=bool(d.get("do_normalize", True)),
            do_convert_rgb=bool(d.get("do_convert_rgb", True)),
        )

    @property
    def pad_color(self) -> tuple[int, ...]:
        return tuple(int(x * 255) for x in self.image_mean)


def expand_to_square(img: PIL.Image.Image, color: tuple[int, ...]) -> PIL.Image.Image:
    """llava/mm_utils.py expand2square: centre on a max(w, h) square, offsets floored."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = PIL.Image.new(img.mode, (side, side), color)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def clip_preprocess(img: PIL.Image.Image, s: ClipPreprocessSettings) -> np.ndarray:
    """transformers 4.31 CLIPImageProcessor.preprocess for one image, returning CHW."""
    if s.do_convert_rgb:
        img = img.convert("RGB")
    arr = np.array(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if s.do_resize:
        h, w = arr.shape[:2]
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = s.shortest_edge, int(s.shortest_edge * long / short)
        out_h, out_w = (new_long, new_short) if w <= h else (new_short, new_long)
        pil = PIL.Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        arr = np.array(pil.resize((out_w, out_h), resample=PIL.Image.Resampling(s.resample), reducing_gap=None))
        if arr.ndim == 2:
            arr = arr[:, :, None]
    if s.do_center_crop:
        h, w = arr.shape[:2]
        ch, cw = s.crop_height, s.crop_width
        top, left = (h - ch) // 2, (w - cw) // 2
        if top >= 0 and left >= 0 and top + ch <= h and left + cw <= w:
            arr = arr[top : top + ch, left : left + cw]
        else:  # smaller than the crop: zero-pad around it, then crop (4.31 center_crop)
            nh, nw = max(ch, h), max(cw, w)
            padded = np.zeros((nh, nw) + arr.shape[2:], dtype=arr.dtype)
            tp, lp = (nh - h) // 2, (nw - w) // 2
            padded[tp : tp + h, lp : lp + w] = arr
            top, left = top + tp, left + lp
            arr = padded[max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]
    if s.do_rescale:
        arr = (arr * s.rescale_factor).astype(np.float32)  # float64 product, then float32
    if s.do_normalize:
        mean = np.array(s.image_mean, dtype=arr.dtype)
        std = np.array(s.image_std, dtype=arr.dtype)
        arr = (arr - mean) / std
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

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
    lc._attn_implementation = "eager"
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
    pc._attn_implementation = "eager"
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


# --------------------------------------------------------------------------------------------
# Conversation formats: llava/conversation.py Conversation.get_prompt(), restated
# --------------------------------------------------------------------------------------------

SYSTEM_LLAVA_V1 = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
SYSTEM_VIP_V3 = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
ROLES = ("user", "assistant")  # our turn roles, mapped onto each mode's own spelling


@dataclass(frozen=True)
class ConversationMode:
    """One ``conv_templates`` entry: the fields ``get_prompt()`` reads, and how it joins them."""

    name: str
    system: str
    roles: tuple[str, str]  # (user, assistant) as the original spells them
    style: str  # the SeparatorStyle's branch of get_prompt(): "two" | "llama_3" | "phi_3"
    sep: str
    sep2: str | None


def _render_two(mode: ConversationMode, messages: list[tuple[str, str | None]]) -> str:
    # SeparatorStyle.TWO: system + sep; "role: msg" + [sep, sep2][i % 2]; an empty turn is "role:".
    seps = (mode.sep, mode.sep2)
    ret = mode.system + seps[0]
    for i, (role, msg) in enumerate(messages):
        ret += f"{role}: {msg}{seps[i % 2]}" if msg else f"{role}:"
    return ret


def _first_turn_rule(mode: ConversationMode, messages: list[tuple[str, str | None]]) -> None:
    # get_prompt() asserts this for LLAMA_3 and Phi_3.
    if messages and (not messages[0][1] or messages[0][0] != mode.roles[0]):
        raise ValueError(f"{mode.name}: the first message must be a non-empty user message (get_prompt asserts it)")


def _render_llama_3(mode: ConversationMode, messages: list[tuple[str, str | None]]) -> str:
    # SeparatorStyle.LLAMA_3: sep/sep2 unused; the literal <|begin_of_text|> opens the system block.
    _first_turn_rule(mode, messages)
    ret = (
        f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{mode.system}<|eot_id|>" if mode.system else ""
    )
    for role, msg in messages:
        ret += "<|start_header_id|>" + role + "<|end_header_id|>\n\n"
        if msg:
            ret += msg + ("" if "<|eot_id|>" in msg else "<|eot_id|>")
    return ret


def _render_phi_3(mode: ConversationMode, messages: list[tuple[str, str | None]]) -> str:
    # SeparatorStyle.Phi_3: no BOS in the text; '<|end|>\n' is skipped only when the message holds
    # '<|eot_id|>' (the original's copy of the LLAMA_3 branch).
    _first_turn_rule(mode, messages)
    ret = f"<|system|>\n{mode.system}<|end|>\n" if mode.system else ""
    for role, msg in messages:
        ret += f"<|{role}|>" + "\n"
        if msg:
            ret += msg + ("" if "<|eot_id|>" in msg else "<|end|>\n")
    return ret


_STYLES: Mapping[str, Callable[[ConversationMode, list[tuple[str, str | None]]], str]] = {
    "two": _render_two,
    "llama_3": _render_llama_3,
    "phi_3": _render_phi_3,
}

CONV_MODES: Mapping[str, ConversationMode] = {
    m.name: m
    for m in (
        ConversationMode("llava_v1", SYSTEM_LLAVA_V1, ("USER", "ASSISTANT"), "two", " ", "</s>"),
        ConversationMode(
            "llava_llama_3", SYSTEM_VIP_V3, ("user", "assistant"), "llama_3", "<|begin_of_text|>", "<|end_of_text|>"
        ),
        ConversationMode("llava_phi_3", SYSTEM_VIP_V3, ("user", "assistant"), "phi_3", "", "<|end|>"),
    )
}


def _turn(t: Any) -> tuple[str, str | None]:
    if isinstance(t, Mapping):
        role, text = t.get("role"), t.get("text")
    elif isinstance(t, (tuple, list)) and len(t) == 2:
        role, text = t
    else:
        raise ValueError(f"a turn is {{'role', 'text'}} or (role, text), got {t!r}")
    if role not in ROLES:
        raise ValueError(f"turn role {role!r}: expected one of {ROLES}")
    if text is not None and not isinstance(text, str):
        raise ValueError(f"turn text must be a string or None, got {text!r}")
    return role, text


def render_prompt(turns: Sequence[Any], mode: str) -> str:
    """The prompt string ``Conversation.get_prompt()`` returns for ``turns`` in conversation ``mode``.

    ``turns``: ``{"role": "user" | "assistant", "text": str | None}`` (or ``(role, text)``) in order,
    as ``conv.append_message(conv.roles[i], text)`` would have added them; a None (or empty) text is
    the open turn the model answers.  The first user text of an image prompt is
    ``"<image>\n" + question``, as the eval scripts built it.
    """
    if mode not in CONV_MODES:
        raise ValueError(f"conversation mode {mode!r}: expected one of {sorted(CONV_MODES)}")
    m = CONV_MODES[mode]
    role_names = dict(zip(ROLES, m.roles, strict=True))
    messages = [(role_names[r], text) for r, text in map(_turn, turns)]
    return _STYLES[m.style](m, messages)


# --------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------


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


def _base_tokenizer_tokens(text_model: Path) -> set[str]:
    """Every token string the base tokenizer files name (vocabulary, added and special tokens)."""
    text_model = Path(text_model)
    found: set[str] = set()
    tj = text_model / "tokenizer.json"
    if tj.is_file():
        data = _read_json(tj)
        vocab = (data.get("model") or {}).get("vocab") or {}
        found.update(vocab if isinstance(vocab, dict) else (v[0] for v in vocab if isinstance(v, list) and v))
        found.update(str(a.get("content")) for a in data.get("added_tokens") or [] if isinstance(a, dict))
    cfg = _read_json(text_model / "tokenizer_config.json")
    for entry in (cfg.get("added_tokens_decoder") or {}).values():
        found.add(_token_content(entry) or "")
    found.update(_read_json(text_model / "added_tokens.json"))
    model = text_model / "tokenizer.model"
    if model.is_file():
        sp = spm.SentencePieceProcessor(model_file=str(model))
        found.update(sp.id_to_piece(i) for i in range(sp.get_piece_size()))
    return found


def detect_backbone(original_dir: Path, text_model_dir: Path) -> str:
    """The backbone of an original checkpoint: its config.json's ``model_type`` names the
    ``LlavaXForCausalLM`` that saved it; backbones sharing one (Vicuna, Llama-3: "llava_llama") are
    told apart by a token only one base tokenizer has (``<|eot_id|>``)."""
    path = Path(original_dir) / "config.json"
    if not path.is_file():
        raise OriginalLoadError(f"{path} not found: the original checkpoint folder needs its config.json")
    mt = _read_json(path).get("model_type")
    candidates = [b for b in BACKBONES.values() if b.original_model_type == mt]
    if not candidates:
        known = sorted({b.original_model_type for b in BACKBONES.values()})
        raise OriginalLoadError(f"{path}: model_type {mt!r} is not a ViP-LLaVA backbone; expected one of {known}")
    marked = [b for b in candidates if b.marker_token is not None]
    if marked:
        tokens = _base_tokenizer_tokens(Path(text_model_dir))
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


# --------------------------------------------------------------------------------------------
# Placing the original tensors
# --------------------------------------------------------------------------------------------


def _materialize_meta_buffers(model: torch.nn.Module, name: str) -> None:
    """Non-persistent buffers (rotary inv_freq, CLIP position_ids) of a meta-built model are
    rebuilt by constructing their owning module again on CPU from the same config."""
    todo = []
    for mod_name, module in model.named_modules():
        redo = [b for b, t in module.named_buffers(recurse=False) if t is not None and t.is_meta]
        if redo:
            todo.append((mod_name, module, redo))
    for mod_name, module, redo in todo:
        try:
            fresh = type(module)(module.config if hasattr(module, "config") else model.config)
        except Exception as exc:  # pragma: no cover - depends on transformers internals
            raise OriginalLoadError(f"cannot rebuild buffers {redo} of {name}.{mod_name}: {exc}") from exc
        if not any(True for _ in module.parameters()) and mod_name:
            # A parameter-free module (the rotary embedding): replace it whole, so that any plain
            # attribute its constructor derived alongside the buffers is rebuilt as well.
            parent_name, _, child = mod_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, fresh)
        else:
            for b in redo:
                setattr(module, b, getattr(fresh, b))
    left = [n for n, t in model.named_buffers() if t.is_meta]
    left += [n for n, t in model.named_parameters() if t.is_meta]
    if left:
        raise OriginalLoadError(f"{name}: tensors left unloaded: {left}")


def _assign(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    expected = model.state_dict()
    for k, t in state.items():
        if k not in expected:
            raise OriginalLoadError(f"{name}: unexpected key {k!r}")
        if tuple(expected[k].shape) != tuple(t.shape):
            raise OriginalLoadError(f"{name}: {k!r} has shape {tuple(t.shape)}, model wants {tuple(expected[k].shape)}")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise OriginalLoadError(f"{name}: key(s) missing from the original checkpoint: {missing}")
    model.load_state_dict(state, strict=True, assign=True)


def _cache_argument(llm: torch.nn.Module) -> str:
    """The text model's keyword for the key/value cache: ``cache`` (transformers >= 5.2x), ``past_key_values``
    before."""
    import inspect

    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


def _returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


@dataclass
class ReferenceOutput:
    logits: torch.Tensor
    input_positions: list[int]
    trace: dict[str, torch.Tensor] = field(default_factory=dict)
    # the text model's key/value cache after the sequence (``forward(keep_cache=True)``), for greedy continuation
    cache: Any = None


class OriginalVipLlava:
    """The original ViP-LLaVA (Vicuna, Llama-3 or Phi-3 backbone, ``clip_4layers_336`` tower), restated."""

    feature_layers: tuple[int, ...] = FEATURE_LAYERS

    def __init__(
        self,
        config: dict[str, Any],
        llm: LlamaForCausalLM | Phi3ForCausalLM,
        vision: CLIPVisionModel,
        projector: dict[str, torch.Tensor],
        tokenizer: LlamaSlowTokenizer | FastTokenizer,
        image_settings: ClipPreprocessSettings,
        dtype: torch.dtype,
        backbone: Backbone = BACKBONES["vicuna"],
    ):
        self.config = config
        self.backbone = backbone
        self.llm = llm
        self.vision = vision
        self.projector = projector
        self.tokenizer = tokenizer
        self.sp = getattr(tokenizer, "sp", None)
        self.image_settings = image_settings
        self.dtype = dtype
        self.image_aspect_ratio = config.get("image_aspect_ratio", "square")
        self.max_length = config.get("tokenizer_model_max_length")
        self.projector_eps = 1e-5  # nn.LayerNorm default in SimpleFeatureSingleModel
        self.terminators = terminator_ids(backbone.name, tokenizer)
        self.eos_token_ids = set(self.terminators.values())
        # builder.py: model.resize_token_embeddings(len(tokenizer)) before generating
        self.emit_limit = min(len(tokenizer), llm.config.vocab_size)

    @property
    def conv_mode(self) -> str:
        return self.backbone.conv_mode

    @property
    def base_tokens(self) -> int:
        """T = len(base tokenizer), for the converted layout (``expected_layout``)."""
        return len(self.tokenizer)

    def render(self, turns: Sequence[Any]) -> str:
        """The original prompt string for ``turns`` in this backbone's conversation mode."""
        return render_prompt(turns, self.backbone.conv_mode)

    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_dirs(  # noqa: C901 - load-time validation of every input file
        cls, original: Path, text_model: Path, vision_model: Path, dtype: torch.dtype = torch.float32
    ) -> "OriginalVipLlava":
        original, text_model, vision_model = Path(original), Path(text_model), Path(vision_model)
        backbone = BACKBONES[detect_backbone(original, text_model)]
        config = json.loads((original / "config.json").read_text())
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

        lcfg = backbone.text_config(config)
        vcfg = clip_vision_config_from_dir(vision_model)
        n_layers = len(FEATURE_LAYERS)
        mm_hidden = config.get("mm_hidden_size", n_layers * vcfg.hidden_size)
        if mm_hidden != n_layers * vcfg.hidden_size:
            raise OriginalLoadError(f"mm_hidden_size {mm_hidden} != {n_layers} x vision hidden size {vcfg.hidden_size}")
        for idx in FEATURE_LAYERS:
            if not -(vcfg.num_hidden_layers + 1) <= idx <= vcfg.num_hidden_layers:
                raise OriginalLoadError(f"feature layer {idx} out of range for {vcfg.num_hidden_layers} layers")

        with torch.device("meta"):
            llm = backbone.text_model(lcfg)
            vision = CLIPVisionModel(vcfg)
        vision_keys = set(vision.state_dict())

        raw = load_original_state_dict(original)
        llm_sd: dict[str, torch.Tensor] = {}
        vis_sd: dict[str, torch.Tensor] = {}
        proj_sd: dict[str, torch.Tensor] = {}
        for key, tensor in raw.items():
            if _LEGACY_ROTARY.match(key) or _LEGACY_POSITION_IDS.match(key):
                continue
            if key.startswith(VISION_PREFIX):
                sub = key[len(VISION_PREFIX) :]
                candidates = [sub]
                if sub.startswith("vision_model."):
                    candidates.append(sub[len("vision_model.") :])
                else:
                    candidates.append("vision_model." + sub)
                placed = next((c for c in candidates if c in vision_keys), None)
                if placed is None:
                    raise OriginalLoadError(f"vision tower: unexpected key {key!r}")
                vis_sd[placed] = tensor.to(dtype)
            elif key.startswith(PROJECTOR_PREFIX):
                sub = key[len(PROJECTOR_PREFIX) :]
                if sub not in PROJECTOR_KEYS:
                    raise OriginalLoadError(f"projector: unexpected key {key!r}")
                proj_sd[sub] = tensor.to(dtype)
            else:
                llm_sd[key] = tensor.to(dtype)
        del raw

        tied = bool(getattr(lcfg, "tie_word_embeddings", False))
        if tied and "lm_head.weight" not in llm_sd and "model.embed_tokens.weight" in llm_sd:
            llm_sd["lm_head.weight"] = llm_sd["model.embed_tokens.weight"]
        _assign(llm, llm_sd, "language model")
        _assign(vision, vis_sd, "vision tower")
        missing = [PROJECTOR_PREFIX + k for k in PROJECTOR_KEYS if k not in proj_sd]
        if missing:
            raise OriginalLoadError(f"projector: key(s) missing from the original checkpoint: {missing}")
        hidden = lcfg.hidden_size
        want = {
            "clip_layernorm.weight": (mm_hidden,),
            "clip_layernorm.bias": (mm_hidden,),
            "final_linear.0.weight": (hidden, mm_hidden),
            "final_linear.0.bias": (hidden,),
            "final_linear.2.weight": (hidden, hidden),
            "final_linear.2.bias": (hidden,),
        }
        for k, shape in want.items():
            if tuple(proj_sd[k].shape) != shape:
                raise OriginalLoadError(
                    f"projector: {PROJECTOR_PREFIX + k!r} has shape {tuple(proj_sd[k].shape)}, want {shape}"
                )
        if tied:
            llm.tie_weights()
        _materialize_meta_buffers(llm, "language model")
        _materialize_meta_buffers(vision, "vision tower")
        for m in (llm, vision):
            m.eval()
            m.requires_grad_(False)
        if llm.config.vocab_size != llm.get_input_embeddings().weight.shape[0]:
            raise OriginalLoadError("embedding rows differ from vocab_size")

        tokenizer = backbone.tokenizer(text_model)
        if len(tokenizer) > lcfg.vocab_size:
            raise OriginalLoadError(
                f"{text_model}: the tokenizer has {len(tokenizer)} tokens, the original model only {lcfg.vocab_size} "
                "rows"
            )
        settings = ClipPreprocessSettings.from_file(vision_model / "preprocessor_config.json")
        return cls(config, llm, vision, proj_sd, tokenizer, settings, dtype, backbone)

    # ---------------------------------------------------------------------------------------
    @property
    def num_patches(self) -> int:
        c = self.vision.config
        # transformers types CLIP's image_size and patch_size as int | list | tuple | None; they are ints here
        return (c.image_size // c.patch_size) ** 2  # type: ignore[operator]

    def preprocess(self, image: PIL.Image.Image) -> torch.Tensor:
        """llava/mm_utils.py process_images for one image -> [3, crop_h, crop_w] float32."""
        s = self.image_settings
        img = image.convert("RGB")
        if self.image_aspect_ratio == "pad":
            img = expand_to_square(img, s.pad_color)
        elif self.image_aspect_ratio == "resize":
            img = img.resize((s.crop_height, s.crop_height))
        arr = clip_preprocess(img, s)
        return torch.from_numpy(arr).to(torch.float32)

    def tokenize(self, prompt: str) -> list[int]:
        """llava/mm_utils.py tokenizer_image_token: ids with IMAGE_SENTINEL for each <image>."""
        return self.tokenizer.encode_with_images(prompt)

    # ---------------------------------------------------------------------------------------
    def _vision_hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # float32 pixels: the tower's patch embedding casts them to its own weights' dtype (CLIPVisionEmbeddings)
        out = self.vision(pixel_values=pixel_values.float(), output_hidden_states=True)
        hs = out.hidden_states
        if hs is None or len(hs) != self.vision.config.num_hidden_layers + 1:
            raise RuntimeError("CLIPVisionModel did not return all hidden states")
        return tuple(hs)

    def _select_and_project(self, hs: Sequence[torch.Tensor]) -> torch.Tensor:
        feats = torch.cat([hs[i][:, 1:] for i in FEATURE_LAYERS], dim=-1)
        # in the dtype the tower computed in (float32 when its blocks are upcast around bf16 weights)
        p = {k: v.to(feats.dtype) for k, v in self.projector.items()}
        x = F.layer_norm(
            feats, (feats.shape[-1],), p["clip_layernorm.weight"], p["clip_layernorm.bias"], self.projector_eps
        )
        x = F.linear(x, p["final_linear.0.weight"], p["final_linear.0.bias"])
        x = F.gelu(x)  # nn.GELU() default: exact erf form
        return F.linear(x, p["final_linear.2.weight"], p["final_linear.2.bias"])

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> projected features [B, num_patches, text_hidden] (model dtype)."""
        if pixel_values.ndim == 3:
            pixel_values = pixel_values[None]
        return self._select_and_project(self._vision_hidden_states(pixel_values))

    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(  # noqa: C901 - the original forward, restated branch for branch
        self,
        input_ids: Sequence[int],
        images: Sequence[PIL.Image.Image] | None = None,
        capture: bool = False,
        features: torch.Tensor | None = None,
        last_only: bool = False,
        keep_cache: bool = False,
    ) -> ReferenceOutput:
        """Logits of the original model over the spliced sequence.

        ``input_ids`` may hold ``IMAGE_SENTINEL``; ``images`` (PIL) are consumed in order, one per
        sentinel.  Returns float32 logits ``[T, vocab]`` with ``T = len(input_ids) +
        n_images * (num_patches - 1)`` (capped at ``tokenizer_model_max_length``) and, per spliced
        position, the index into ``input_ids`` it came from.

        ``last_only=True`` (greedy decoding): the logits of the last position only, ``[1, vocab]``.
        ``features``: the images' projected features, computed before (the vision side does not depend on the text).

        ``capture=True`` also records float32 intermediates in ``trace``:
        ``vision.embeddings`` (CLIP hidden state 0, after ``pre_layrnorm``) and
        ``vision.layer.{i}`` (output of encoder layer i), both ``[n_images, 1 + num_patches,
        vision_hidden]``; ``projector`` ``[n_images, num_patches, hidden]``;
        ``decoder.embeddings`` (the spliced input embeddings) ``[T, hidden]``;
        ``decoder.layer.{i}`` (output of decoder layer i; the last one before the final norm)
        ``[T, hidden]``; ``decoder.norm`` ``[T, hidden]``; ``logits`` ``[T, vocab]``.

        ``keep_cache=True`` keeps the text model's key/value cache in ``cache`` (the state the original's
        ``generate`` continued from after its first step); :meth:`continue_greedy` consumes it.
        """
        ids = [int(i) for i in input_ids]
        images = list(images or [])
        vocab = self.llm.config.vocab_size
        bad = [i for i in ids if i != IMAGE_SENTINEL and not 0 <= i < vocab]
        if bad:
            raise ValueError(f"token ids outside [0, {vocab}) other than {IMAGE_SENTINEL}: {bad[:5]}")
        n_sentinels = ids.count(IMAGE_SENTINEL)
        if n_sentinels != len(images):
            raise ValueError(f"{n_sentinels} image sentinel(s) in input_ids but {len(images)} image(s) given")
        if not ids:
            raise ValueError("empty input_ids")

        trace: dict[str, torch.Tensor] = {}
        if capture and last_only:
            raise ValueError("capture needs the logits of every position (last_only=False)")
        if features is not None:  # the projected features of these images, computed before (generate_greedy)
            if capture or features.shape[0] != len(images):
                raise ValueError("precomputed features need one entry per image and capture=False")
        elif images:
            pixel_values = torch.stack([self.preprocess(im) for im in images])
            hs = self._vision_hidden_states(pixel_values)
            features = self._select_and_project(hs)
            if capture:
                trace["vision.embeddings"] = hs[0].float().clone()
                for i in range(1, len(hs)):
                    trace[f"vision.layer.{i - 1}"] = hs[i].float().clone()
                trace["projector"] = features.float().clone()

        embed = self.llm.get_input_embeddings()
        text_ids = torch.tensor([i for i in ids if i != IMAGE_SENTINEL], dtype=torch.long)
        text_emb = embed(text_ids)
        pieces: list[torch.Tensor] = []
        positions: list[int] = []
        t = 0
        img = 0
        for pos, tok in enumerate(ids):
            if tok == IMAGE_SENTINEL:
                assert features is not None  # computed above whenever the prompt has images
                feat = features[img]
                pieces.append(feat)
                positions.extend([pos] * feat.shape[0])
                img += 1
            else:
                pieces.append(text_emb[t : t + 1])
                positions.append(pos)
                t += 1
        inputs_embeds = torch.cat(pieces, dim=0)
        if self.max_length is not None and inputs_embeds.shape[0] > self.max_length:
            # prepare_inputs_labels_for_multimodal truncates to tokenizer_model_max_length.
            inputs_embeds = inputs_embeds[: self.max_length]
            positions = positions[: self.max_length]
        T = inputs_embeds.shape[0]
        if capture:
            trace["decoder.embeddings"] = inputs_embeds.float().clone()

        hooks = []
        if capture:

            def make_hook(name):
                def hook(_module, _inputs, output):
                    out = output[0] if isinstance(output, (tuple, list)) else output
                    trace[name] = out[0].float().clone()

                return hook

            for i, layer in enumerate(self.llm.model.layers):
                hooks.append(layer.register_forward_hook(make_hook(f"decoder.layer.{i}")))
            hooks.append(self.llm.model.norm.register_forward_hook(make_hook("decoder.norm")))
        try:
            out = self.llm(
                inputs_embeds=inputs_embeds[None],
                position_ids=torch.arange(T, dtype=torch.long)[None],
                use_cache=keep_cache,
                # last_only: the lm_head on the last position alone (what greedy decoding reads)
                **({"logits_to_keep": 1} if last_only else {}),
            )
        finally:
            for h in hooks:
                h.remove()
        logits = out.logits[0].float()
        if capture:
            trace["logits"] = logits.clone()
        cache = _returned_cache(out) if keep_cache else None
        return ReferenceOutput(logits=logits, input_positions=positions, trace=trace, cache=cache)

    __call__ = forward

    @torch.no_grad()
    def extend(self, prefix: ReferenceOutput, more_ids: Sequence[int], keep_cache: bool = False) -> ReferenceOutput:
        """``forward(ids + more_ids)`` computed from ``forward(ids, keep_cache=True)`` = ``prefix``: the text ids
        ``more_ids`` (no image sentinel) are embedded at the positions after the prefix's spliced sequence and attend
        to a copy of its key/value cache (``prefix`` stays usable for the next extension). The logits are the
        prefix's followed by the new positions'. Prompts that share a prefix (system text and image) compute it once;
        the original's ``generate`` ran each prompt whole, and the function is the same."""
        import copy

        ids = [int(i) for i in more_ids]
        vocab = self.llm.config.vocab_size
        if not ids or any(not 0 <= i < vocab for i in ids):
            raise ValueError(f"extend needs text ids in [0, {vocab}), got {ids[:5]}")
        if prefix.cache is None:
            raise ValueError("extend needs forward(..., keep_cache=True)")
        start = len(prefix.input_positions)
        if self.max_length is not None and start + len(ids) > self.max_length:
            raise ValueError(f"prefix + {len(ids)} ids exceed tokenizer_model_max_length {self.max_length}")
        first_id = (prefix.input_positions[-1] + 1) if prefix.input_positions else 0
        cache = copy.deepcopy(prefix.cache)
        out = self.llm(
            inputs_embeds=self.llm.get_input_embeddings()(torch.tensor([ids], dtype=torch.long)),
            position_ids=torch.arange(start, start + len(ids), dtype=torch.long)[None],
            use_cache=True,
            **{_cache_argument(self.llm): cache},
        )
        logits = torch.cat([prefix.logits, out.logits[0].float()], dim=0)
        positions = list(prefix.input_positions) + list(range(first_id, first_id + len(ids)))
        return ReferenceOutput(
            logits=logits, input_positions=positions, cache=_returned_cache(out) if keep_cache else None
        )

    def _pick(self, logits_row: torch.Tensor) -> int:
        """The greedy choice among the ids the original could emit (``builder.py`` had resized the embeddings to
        ``len(tokenizer)``: ``self.emit_limit``)."""
        return int(torch.argmax(logits_row[: self.emit_limit]).item())

    @torch.no_grad()
    def continue_greedy(self, out: ReferenceOutput, max_new_tokens: int = 8) -> tuple[list[int], list[torch.Tensor]]:
        """Greedy continuation of a ``forward(..., keep_cache=True)`` result, one token per step through the text
        model with its key/value cache, as the original's ``generate`` ran after its first step: each new id is
        embedded, placed at the next position (``T``, ``T + 1``, ... over the spliced sequence) and attends to the
        cached keys/values.  Returns the new ids (a terminator included when produced) and the float32 logits row
        each was picked from.  The cache is consumed (``out.cache`` is set to None)."""
        if out.cache is None:
            raise ValueError("continue_greedy needs forward(..., keep_cache=True)")
        cache, out.cache = out.cache, None
        embed = self.llm.get_input_embeddings()
        position = len(out.input_positions)  # T, the spliced length (out.logits may hold the last row only)
        row = out.logits[-1]
        new: list[int] = []
        rows: list[torch.Tensor] = []
        for step in range(max_new_tokens):
            nxt = self._pick(row)
            new.append(nxt)
            rows.append(row)
            if nxt in self.eos_token_ids or step == max_new_tokens - 1:
                break
            step_out = self.llm(
                inputs_embeds=embed(torch.tensor([[nxt]], dtype=torch.long)),
                position_ids=torch.tensor([[position]], dtype=torch.long),
                use_cache=True,
                **{_cache_argument(self.llm): cache},
            )
            cache = _returned_cache(step_out)
            row = step_out.logits[0, -1].float()
            position += 1
        return new, rows

    @torch.no_grad()
    def generate_greedy(
        self,
        input_ids: Sequence[int],
        images: Sequence[PIL.Image.Image] | None = None,
        max_new_tokens: int = 8,
        incremental: bool = True,
        return_logits: bool = False,
    ):
        """Greedy continuation (new ids only; a terminator is included when it is produced).

        Stops on the original eval's terminators (``self.terminators``); the argmax runs over the
        ids the original could emit after ``builder.py`` resized the embeddings to
        ``len(tokenizer)`` (``self.emit_limit``).  ``incremental`` (default): one forward over the prompt,
        then one cached step per token (:meth:`continue_greedy`).  ``incremental=False`` re-runs the whole
        forward for every new token (slow; the yardstick the cached path is tested against).
        ``return_logits``: also return the float32 logits row behind each new id."""
        ids = [int(i) for i in input_ids]
        features = None
        if images:  # the vision tower and projector do not depend on the text: run them once
            features = self._select_and_project(
                self._vision_hidden_states(torch.stack([self.preprocess(im) for im in images]))
            )
        if incremental:
            new, rows = self.continue_greedy(
                self.forward(ids, images, features=features, keep_cache=True, last_only=True), max_new_tokens
            )
            return (new, rows) if return_logits else new
        new, rows = [], []
        for _ in range(max_new_tokens):
            row = self.forward(ids + new, images, features=features, last_only=True).logits[-1]
            nxt = self._pick(row)
            new.append(nxt)
            rows.append(row)
            if nxt in self.eos_token_ids:
                break
        return (new, rows) if return_logits else new
