"""Tokenizer, processor, chat template and their files, written so that every transformers release reads them.

Tokenization must match the original: it tokenized each chunk between ``<image>`` markers separately with the
slow sentencepiece tokenizer, so every chunk got sentencepiece's dummy-prefix piece, including the text right
after an image (``<image>\\nWhat`` -> [image] ``▁`` ``<0x0A>`` ...). A fast tokenizer whose Metaspace prepends
only to the first segment drops that piece; ours prepends to every segment between special tokens
(a ``Prepend("▁")`` normalizer, as the legacy Llama fast tokenizer had), which is what the chunked original did.

The JSON files are written by hand: transformers 5.x's own ``save_pretrained`` writes a tokenizer config that 4.x
cannot read (``extra_special_tokens`` as a list) and keeps the image-processor settings only in
``processor_config.json``, which 4.51 does not look at.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .backbones import CHAT_TEMPLATE_V1, VICUNA, Backbone  # noqa: F401  (CHAT_TEMPLATE_V1: re-exported)
from .config import TokenIds
from .errors import ConversionError

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"


@dataclass(frozen=True)
class TokenizerInfo:
    ids: TokenIds
    bos_token: str | None
    eos_token: str | None
    unk_token: str | None
    add_bos_token: bool


def _added_entry(added) -> dict:
    return {"content": added.content, "lstrip": added.lstrip, "normalized": added.normalized, "rstrip": added.rstrip,
            "single_word": added.single_word, "special": added.special}


def _base_add_bos(text_dir: Path) -> bool:
    p = text_dir / "tokenizer_config.json"
    try:
        return bool(json.loads(p.read_text()).get("add_bos_token", True)) if p.is_file() else True
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConversionError(f"{p}: not valid JSON; re-download the text model") from None


def load_base_tokenizer(text_dir: Path):
    """The text model's tokenizer as transformers loads it (fast)."""
    from transformers import AutoTokenizer

    if not ((text_dir / "tokenizer.model").is_file() or (text_dir / "tokenizer.json").is_file()):
        raise ConversionError(f"{text_dir}: no tokenizer.model or tokenizer.json; pass --text-model with the base tokenizer")
    try:
        return AutoTokenizer.from_pretrained(str(text_dir), legacy=True)
    except Exception as e:  # transformers raises many types here; the message is what the user needs
        raise ConversionError(f"{text_dir}: tokenizer does not load ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None


def build_tokenizer(tok, text_dir: Path, vocab: int, backbone: Backbone = VICUNA):
    """The base tokenizer ``tok`` with ``<image>`` and ``<pad>`` appended after its last token (see
    :class:`TokenIds`). Sentencepiece backbones get the dummy prefix on every segment between special tokens, as
    the original's chunked tokenization gave; byte-level ones (Llama-3) are kept as they are.
    Returns (tokenizer, TokenizerInfo)."""
    from tokenizers import AddedToken, normalizers

    tokens = len(tok)
    if tokens > vocab or (tokens != vocab and not backbone.rows_padded):
        raise ConversionError(
            f"{text_dir}: tokenizer has {tokens} tokens but the original embedding has {vocab} rows; "
            "pass the text model this checkpoint was trained with"
        )
    existing = tok.get_vocab()
    for t in (IMAGE_TOKEN, PAD_TOKEN):
        if t in existing:
            raise ConversionError(f"{text_dir}: tokenizer already has {t} (id {existing[t]}); expected a base text tokenizer")
    missing = [t for t in backbone.stop_tokens if t not in existing]
    if missing:
        raise ConversionError(f"{text_dir}: tokenizer lacks {missing[0]}, the end-of-turn token of {backbone.title}; pass its base text model")
    if backbone.tokenizer_kind == "sentencepiece":
        # Every segment between special tokens gets the dummy prefix, unconditionally, as sentencepiece gives each
        # chunk (" What" -> "▁▁What"). Metaspace(prepend_scheme="always") is NOT the same: it skips the prefix when
        # the segment already starts with a space.
        backend = tok.backend_tokenizer
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        backend.pre_tokenizer = None
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False)})
    got = (tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.convert_tokens_to_ids(PAD_TOKEN))
    if got != (tokens, tokens + 1):
        raise ConversionError(f"{text_dir}: <image>/<pad> landed at ids {got}, expected ({tokens}, {tokens + 1})")
    eos = [existing[t] for t in backbone.stop_tokens]
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    info = TokenizerInfo(
        ids=TokenIds(vocab=vocab, bos=tok.bos_token_id, eos=eos[0] if len(eos) == 1 else eos, tokens=None if tokens == vocab else tokens),
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
        unk_token=tok.unk_token,
        add_bos_token=_base_add_bos(text_dir),
    )
    return tok, info


def tokenizer_json(backend) -> str:
    """``backend`` (a ``tokenizers.Tokenizer``) as tokenizer.json text that tokenizers 0.15+ reads with the same ids.

    tokenizers >= 0.20 writes BPE merges as pairs (``["a", "b"]``); tokenizers < 0.20 (transformers < 4.45, e.g. the
    original's pin 4.37.2 + tokenizers 0.15.1) reads only the older ``"a b"`` strings and refuses the file. Both
    forms mean the same merges, so they are written as strings unless a piece contains a space (which the string
    form cannot express; then the pairs stay).
    """
    data = json.loads(backend.to_str())
    model = data.get("model") or {}
    merges = model.get("merges")
    if model.get("type") == "BPE" and isinstance(merges, list) and all(
            isinstance(m, list) and len(m) == 2 and " " not in m[0] + m[1] for m in merges):
        model["merges"] = [f"{a} {b}" for a, b in merges]
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def write_tokenizer_files(out: Path, tok, info: TokenizerInfo, text_dir: Path, model_max_length: int, backbone: Backbone = VICUNA) -> None:
    """tokenizer.json, tokenizer.model (when the base has one), tokenizer_config.json, special_tokens_map.json."""
    (out / "tokenizer.json").write_text(tokenizer_json(tok.backend_tokenizer), encoding="utf-8")
    sentencepiece = backbone.tokenizer_kind == "sentencepiece"
    if sentencepiece and (text_dir / "tokenizer.model").is_file():
        shutil.copyfile(text_dir / "tokenizer.model", out / "tokenizer.model")
    decoder = {str(idx): _added_entry(added) for idx, added in sorted(tok.added_tokens_decoder.items())}
    # Every special added token outside the named ones is listed as an additional special token too, <image>
    # first: transformers 4.x's slow LlamaTokenizer (use_fast=False) skips only the tokens in the special-tokens
    # map when decoding with skip_special_tokens=True; without the entries it printed "<image>" back (and Phi-3's
    # "</s>"), measured on 4.51.3 and 4.57.6. Vicuna's list is just ["<image>"].
    named = {info.bos_token, info.eos_token, info.unk_token, PAD_TOKEN, IMAGE_TOKEN}
    additional = [IMAGE_TOKEN] + [a.content for _, a in sorted(tok.added_tokens_decoder.items()) if a.special and a.content not in named]
    cfg = {
        "additional_special_tokens": additional,
        "added_tokens_decoder": decoder,
        "bos_token": info.bos_token,
        "chat_template": backbone.chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": info.eos_token,
        "model_max_length": model_max_length,
        "pad_token": PAD_TOKEN,
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "tokenizer_class": backbone.tokenizer_class,
    }
    if sentencepiece:  # the slow-tokenizer settings (transformers 4.x, use_fast=False)
        cfg.update({
            "add_bos_token": info.add_bos_token,
            "add_eos_token": False,
            "legacy": True,
            "sp_model_kwargs": {},
            "spaces_between_special_tokens": False,
            "unk_token": info.unk_token,
            "use_default_system_prompt": False,
        })
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    special = {"additional_special_tokens": additional, "bos_token": info.bos_token, "eos_token": info.eos_token,
               "pad_token": PAD_TOKEN}
    if info.unk_token is not None:
        special["unk_token"] = info.unk_token
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")


def image_processor_config(preprocessor: dict, where: str) -> dict:
    """LlavaImageProcessor settings: the vision model's CLIP preprocessing plus ``do_pad`` (pad to square with the
    mean colour first), which is the original's ``image_aspect_ratio: pad``."""
    size = preprocessor.get("size")
    if isinstance(size, int):
        size = {"shortest_edge": size}
    crop = preprocessor.get("crop_size")
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    if not isinstance(size, dict) or "shortest_edge" not in size or not isinstance(crop, dict):
        raise ConversionError(f"{where}: expected CLIP preprocessing (size.shortest_edge and crop_size), found size={size!r} crop_size={crop!r}")
    return {
        "crop_size": {"height": crop["height"], "width": crop["width"]},
        "do_center_crop": preprocessor.get("do_center_crop", True),
        "do_convert_rgb": preprocessor.get("do_convert_rgb", True),
        "do_normalize": preprocessor.get("do_normalize", True),
        "do_pad": True,
        "do_rescale": preprocessor.get("do_rescale", True),
        "do_resize": preprocessor.get("do_resize", True),
        "image_mean": preprocessor.get("image_mean", [0.48145466, 0.4578275, 0.40821073]),
        "image_processor_type": "LlavaImageProcessor",
        "image_std": preprocessor.get("image_std", [0.26862954, 0.26130258, 0.27577711]),
        "processor_class": "LlavaProcessor",
        "resample": preprocessor.get("resample", 3),
        "rescale_factor": preprocessor.get("rescale_factor", 1 / 255),
        "size": {"shortest_edge": size["shortest_edge"]},
    }


def processor_config(patch_size: int) -> dict:
    return {
        "image_token": IMAGE_TOKEN,
        "num_additional_image_tokens": 1,
        "patch_size": patch_size,
        "processor_class": "LlavaProcessor",
        "vision_feature_select_strategy": "default",
    }


def write_processor_files(out: Path, preprocessor: dict, patch_size: int, where: str, backbone: Backbone = VICUNA) -> None:
    dump = lambda obj: json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"  # noqa: E731
    (out / "preprocessor_config.json").write_text(dump(image_processor_config(preprocessor, where)))
    (out / "processor_config.json").write_text(dump(processor_config(patch_size)))
    (out / "chat_template.json").write_text(dump({"chat_template": backbone.chat_template}))
