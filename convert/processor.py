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

from .config import TokenIds
from .errors import ConversionError

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
SYSTEM_V1 = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# The original llava_v1 conversation format (sep " " after a user turn, "</s>" after an assistant turn), for
# messages in the processor's format (content: a string, or a list of {"type": "image"} / {"type": "text"}).
CHAT_TEMPLATE_V1 = (
    "{%- set ns = namespace(system='" + SYSTEM_V1.replace("'", "\\'") + "', start=0) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set ns.system = messages[0]['content'] -%}"
    "{%- else -%}{%- set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') -%}{%- endif -%}"
    "{%- set ns.start = 1 -%}"
    "{%- endif -%}"
    "{{- ns.system + ' ' -}}"
    "{%- for message in messages[ns.start:] -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' -}}"
    "{%- else -%}{{- raise_exception('llava_v1 has only user and assistant turns after the system message') -}}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{- ' ' -}}{%- else -%}{{- eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class TokenizerInfo:
    ids: TokenIds
    bos_token: str
    eos_token: str
    unk_token: str | None


def _added_entry(content: str, special: bool = True, normalized: bool = False) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False, "special": special}


def build_tokenizer(text_dir: Path, vocab: int, where: str):
    """The text model's tokenizer with ``<image>`` at ``vocab`` and ``<pad>`` at ``vocab + 1``, every chunk
    between special tokens getting the dummy prefix. Returns (tokenizer, TokenizerInfo)."""
    from tokenizers import AddedToken, normalizers
    from transformers import AutoTokenizer

    if not ((text_dir / "tokenizer.model").is_file() or (text_dir / "tokenizer.json").is_file()):
        raise ConversionError(f"{text_dir}: no tokenizer.model or tokenizer.json; pass --text-model with the base tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(str(text_dir), legacy=True)
    except Exception as e:  # transformers raises many types here; the message is what the user needs
        raise ConversionError(f"{text_dir}: tokenizer does not load ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    if len(tok) != vocab:
        raise ConversionError(
            f"{text_dir}: tokenizer has {len(tok)} tokens but the original embedding has {vocab} rows; "
            "pass the text model this checkpoint was trained with"
        )
    existing = tok.get_vocab()
    for t in (IMAGE_TOKEN, PAD_TOKEN):
        if t in existing:
            raise ConversionError(f"{text_dir}: tokenizer already has {t} (id {existing[t]}); expected a base text tokenizer")
    # Every segment between special tokens gets the dummy prefix, unconditionally, as sentencepiece gives each
    # chunk (" What" -> "▁▁What"). Metaspace(prepend_scheme="always") is NOT the same: it skips the prefix when
    # the segment already starts with a space.
    backend = tok.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.pre_tokenizer = None
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False)})
    got = (tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.convert_tokens_to_ids(PAD_TOKEN))
    if got != (vocab, vocab + 1):
        raise ConversionError(f"{text_dir}: <image>/<pad> landed at ids {got}, expected ({vocab}, {vocab + 1})")
    eos = tok.eos_token_id
    info = TokenizerInfo(
        ids=TokenIds(vocab=vocab, bos=tok.bos_token_id, eos=eos),
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
        unk_token=tok.unk_token,
    )
    return tok, info


def write_tokenizer_files(out: Path, tok, info: TokenizerInfo, text_dir: Path, model_max_length: int) -> None:
    """tokenizer.json, tokenizer.model (when the base has one), tokenizer_config.json, special_tokens_map.json."""
    tok.backend_tokenizer.save(str(out / "tokenizer.json"), pretty=True)
    if (text_dir / "tokenizer.model").is_file():
        shutil.copyfile(text_dir / "tokenizer.model", out / "tokenizer.model")
    decoder = {}
    for idx, added in sorted(tok.added_tokens_decoder.items()):
        decoder[str(idx)] = _added_entry(added.content, special=added.special, normalized=added.normalized)
    # <image> is listed as an additional special token too: transformers 4.x's slow LlamaTokenizer
    # (use_fast=False) skips only the tokens listed in the special-tokens map when decoding with
    # skip_special_tokens=True; without the entry it printed "<image>" back (measured on 4.51.3 and 4.57.6).
    cfg = {
        "add_bos_token": True,
        "additional_special_tokens": [IMAGE_TOKEN],
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": info.bos_token,
        "chat_template": CHAT_TEMPLATE_V1,
        "clean_up_tokenization_spaces": False,
        "eos_token": info.eos_token,
        "legacy": True,
        "model_max_length": model_max_length,
        "pad_token": PAD_TOKEN,
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": info.unk_token,
        "use_default_system_prompt": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    special = {"additional_special_tokens": [IMAGE_TOKEN], "bos_token": info.bos_token, "eos_token": info.eos_token,
               "pad_token": PAD_TOKEN, "unk_token": info.unk_token}
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


def write_processor_files(out: Path, preprocessor: dict, patch_size: int, where: str) -> None:
    dump = lambda obj: json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"  # noqa: E731
    (out / "preprocessor_config.json").write_text(dump(image_processor_config(preprocessor, where)))
    (out / "processor_config.json").write_text(dump(processor_config(patch_size)))
    (out / "chat_template.json").write_text(dump({"chat_template": CHAT_TEMPLATE_V1}))
