"""Tokenizer, processor, chat template and their files, written so that every transformers release reads them.

The converted tokenizer must give the ORIGINAL's ids. The original (transformers 4.37.2 + tokenizers 0.15.1,
``llava/mm_utils.py tokenizer_image_token``) split the prompt on ``<image>`` and tokenized every chunk on its own:

- Vicuna: the slow sentencepiece ``LlamaTokenizer`` with the base config's ``legacy`` flag. ``legacy: false``
  (Vicuna v1.5 ships it): ``▁`` is prefixed once at the start of each chunk (so also right after ``<image>``), NOT
  after other special tokens inside a chunk (``</s>`` in multi-turn prompts), and dropped when the chunk begins with
  a special token. ``legacy`` true/absent: every segment between special tokens gets sentencepiece's dummy prefix.
- Phi-3: the FAST tokenizer that 4.37.2 built from ``tokenizer.model`` (builder.py ``use_fast=True``): a
  ``Prepend("▁")`` normalizer on every segment between special tokens (4.37.2's fast ignores ``legacy``), with the
  added tokens' ``rstrip``.
- Llama-3: the base ``tokenizer.json`` as it is (it must add ``<|begin_of_text|>``, see :func:`build_tokenizer`).

For sentencepiece backbones the tokenizer.json is built here from ``tokenizer.model``: BPE merges ranked by the
sentencepiece SCORE of the merged piece (as sentencepiece applies them; ranking by piece id, as transformers 5.x's
own conversion does, merges the whitespace pieces first: " What" -> [259, 5618] instead of [29871, 1724]). One
``tokenizer.json`` then holds both prefix rules, with ``<image>`` an added token that is split off BEFORE
normalization (``normalized: false``), so each chunk between images is normalized on its own:

- per-segment prefix (legacy / Phi-3): ``Prepend("▁")`` + ``Replace(" ", "▁")``, every added token
  ``normalized: false``, so every segment between added tokens gets the prefix;
- chunk-start prefix (non-legacy): ``Replace(Regex("\\A(?!<s>|</s>|<unk>)"), "▁")`` + ``Replace(" ", "▁")``, the
  base's added tokens ``normalized: true`` (matched AFTER normalization, inside the normalized chunk), so the prefix
  lands once per chunk and not before a leading special token.

The file is declared ``PreTrainedTokenizerFast``: transformers 5.x's ``LlamaTokenizer`` class would discard the
normalizer and rebuild a Metaspace(prepend_scheme="first") pipeline (no prefix after ``<image>``); as
``PreTrainedTokenizerFast`` every release from 4.37.2 uses the file as written (``use_fast=False`` too).

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
from .writer import json_text, write_json

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"


@dataclass(frozen=True)
class TokenizerInfo:
    ids: TokenIds
    bos_token: str | None
    eos_token: str | None
    unk_token: str | None
    add_bos_token: bool
    prefix_rule: str = "segment"  # see prefix_rule()


def _added_entry(added) -> dict:
    return {
        "content": added.content,
        "lstrip": added.lstrip,
        "normalized": added.normalized,
        "rstrip": added.rstrip,
        "single_word": added.single_word,
        "special": added.special,
    }


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
        raise ConversionError(
            f"{text_dir}: no tokenizer.model or tokenizer.json; pass --text-model with the base tokenizer"
        )
    try:
        return AutoTokenizer.from_pretrained(str(text_dir), legacy=True)
    except Exception as e:  # transformers raises many types here; the message is what the user needs
        raise ConversionError(
            f"{text_dir}: tokenizer does not load ({e.__class__.__name__}: {str(e).splitlines()[0]})"
        ) from None


def _base_config(text_dir: Path) -> dict:
    p = text_dir / "tokenizer_config.json"
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConversionError(f"{p}: not valid JSON; re-download the text model") from None


def prefix_rule(text_dir: Path, backbone: Backbone) -> str:
    """How the original prefixed ``▁``: "segment" (every segment between special tokens) or "chunk" (once per
    ``<image>`` chunk; 4.37.2's slow tokenizer with ``legacy: false``). Only a backbone the original ran with the
    slow tokenizer honours ``legacy``; 4.37.2 treats a missing or null ``legacy`` as true."""
    if backbone.tokenizer_kind != "sentencepiece":
        return "none"
    if backbone.original_tokenizer == "slow" and _base_config(text_dir).get("legacy", True) is False:
        return "chunk"
    return "segment"


def spm_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """The BPE merges of a sentencepiece BPE model, ranked as sentencepiece applies them: every split of a normal
    piece into two pieces that merge (normal or user-defined), highest score of the merged piece first; ties by the
    ids of the halves. ``pieces``: (piece, score, type) in id order (types: sentencepiece's enum, 1 = normal)."""
    vocab = {p: i for i, (p, _, t) in enumerate(pieces) if t in (1, 4)}
    found = []
    for piece, pid in vocab.items():
        if pieces[pid][2] != 1:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                found.append((-pieces[pid][1], pid, vocab[left], vocab[right], left, right))
    found.sort()
    return [(f[4], f[5]) for f in found]


def _read_sentencepiece(path: Path) -> list[tuple[str, float, int]]:
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    try:
        m.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError and friends
        raise ConversionError(
            f"{path}: not a sentencepiece model ({e.__class__.__name__}); re-download the text model"
        ) from None
    if m.trainer_spec.model_type != pb.TrainerSpec.BPE or not m.trainer_spec.byte_fallback:
        raise ConversionError(
            f"{path}: expected a byte-fallback BPE sentencepiece model (Llama-2 / Phi-3), found model_type "
            f"{m.trainer_spec.model_type} byte_fallback {m.trainer_spec.byte_fallback}; pass the base text model"
        )
    return [(p.piece, p.score, p.type) for p in m.pieces]


def _sentencepiece_backend(tok, text_dir: Path, rule: str):
    """A ``tokenizers.Tokenizer`` giving the original's ids for a sentencepiece backbone (see the module docstring):
    BPE from ``tokenizer.model`` with merges by score (or the base tokenizer.json's model when there is no
    tokenizer.model), the prefix rule's normalizer, the base's added tokens, BOS by the base's ``add_bos_token``."""
    import re

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

    model_file = text_dir / "tokenizer.model"
    if model_file.is_file():
        pieces = _read_sentencepiece(model_file)
        unk = next((p for p, _, t in pieces if t == 2), None)
        bpe = models.BPE(
            vocab={p: i for i, (p, _, _) in enumerate(pieces)},
            merges=spm_merges(pieces),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
        backend = Tokenizer(bpe)
    else:  # a base with only tokenizer.json: its BPE model as written (transformers' own object may be rebuilt)
        path = text_dir / "tokenizer.json"
        backend = (
            Tokenizer.from_file(str(path)) if path.is_file() else Tokenizer.from_str(tok.backend_tokenizer.to_str())
        )
        backend.post_processor = None
    added = [a for _, a in sorted(tok.added_tokens_decoder.items())]
    specials = [a.content for a in added if a.special]
    stripping = [a.content for a in added if a.lstrip or a.rstrip]
    if rule == "chunk" and stripping:  # matched after normalization, where spaces are already "▁": not the same strip
        raise ConversionError(
            f"{text_dir / 'tokenizer_config.json'}: legacy is false and {stripping[0]} strips the "
            "whitespace next to it (lstrip/rstrip), a combination the converter cannot reproduce; "
            "pass the base text model the checkpoint was trained with (Vicuna v1.5's tokens strip nothing)"
        )
    first: normalizers.Normalizer
    if rule == "chunk":
        lookahead = "|".join(re.escape(c) for c in sorted(specials, key=len, reverse=True))
        first = normalizers.Replace(Regex(r"\A(?!" + lookahead + ")" if lookahead else r"\A"), "\u2581")
    else:
        first = normalizers.Prepend("\u2581")
    backend.normalizer = normalizers.Sequence([first, normalizers.Replace(" ", "\u2581")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens(
        [
            AddedToken(
                a.content,
                single_word=a.single_word,
                lstrip=a.lstrip,
                rstrip=a.rstrip,
                normalized=rule == "chunk",
                special=True,
            )
            for a in added
            if a.special
        ]
    )
    backend.add_tokens(
        [
            AddedToken(
                a.content,
                single_word=a.single_word,
                lstrip=a.lstrip,
                rstrip=a.rstrip,
                normalized=rule == "chunk",
                special=False,
            )
            for a in added
            if not a.special
        ]
    )
    if _base_config(text_dir).get("add_bos_token", True) and tok.bos_token is not None:
        bos = tok.bos_token
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, backend.token_to_id(bos))]
        )
    return backend


def _check_adds_bos(tok, text_dir: Path) -> None:
    """Llama-3: the original's ``tokenizer_image_token`` keeps the first chunk's BOS and drops the first id of every
    later chunk, which is right only when the tokenizer adds ``<|begin_of_text|>`` itself. A base tokenizer.json
    whose post-processor adds none (the early Llama-3 release: ByteLevel only) made the original drop a real token
    after every image, which no tokenizer.json can reproduce: refuse."""
    bos = tok.bos_token_id
    got = tok.backend_tokenizer.encode("a").ids
    if bos is not None and (not got or got[0] != bos):
        p = text_dir / "tokenizer.json"
        kind = (json.loads(tok.backend_tokenizer.to_str()).get("post_processor") or {}).get("type")
        raise ConversionError(
            f"{p}: its post-processor ({kind}) adds no {tok.bos_token}, so the original dropped the first token after "
            f"every <image> and no converted tokenizer can match it; pass --text-model with the Llama-3 tokenizer.json "
            f"that adds {tok.bos_token} (Meta's current meta-llama/Meta-Llama-3-8B-Instruct, TemplateProcessing)"
        )


def build_tokenizer(tok, text_dir: Path, vocab: int, backbone: Backbone = VICUNA):
    """The base tokenizer ``tok`` rebuilt to give the original's ids (see the module docstring), with ``<image>``
    and ``<pad>`` appended after its last token (see :class:`TokenIds`). Returns (tokenizer, TokenizerInfo)."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tokens = len(tok)
    if tokens > vocab or (tokens != vocab and not backbone.rows_padded):
        raise ConversionError(
            f"{text_dir}: tokenizer has {tokens} tokens but the original embedding has {vocab} rows; "
            "pass the text model this checkpoint was trained with"
        )
    existing = tok.get_vocab()
    for t in (IMAGE_TOKEN, PAD_TOKEN):
        if t in existing:
            raise ConversionError(
                f"{text_dir}: tokenizer already has {t} (id {existing[t]}); expected a base text tokenizer"
            )
    missing = [t for t in backbone.stop_tokens if t not in existing]
    if missing:
        raise ConversionError(
            f"{text_dir}: tokenizer lacks {missing[0]}, the end-of-turn token of {backbone.title}; pass its base text "
            "model"
        )
    rule = prefix_rule(text_dir, backbone)
    if rule == "none":
        _check_adds_bos(tok, text_dir)
    else:
        backend = _sentencepiece_backend(tok, text_dir, rule)
        if backend.get_vocab_size(with_added_tokens=True) != tokens or backend.get_vocab() != existing:
            raise ConversionError(
                f"{text_dir}: tokenizer.model and the tokenizer files disagree on the vocabulary "
                f"({backend.get_vocab_size(with_added_tokens=True)} vs {tokens} tokens); re-download the text model"
            )
        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token=tok.bos_token,
            eos_token=tok.eos_token,
            unk_token=tok.unk_token,
            clean_up_tokenization_spaces=False,
        )
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False)})
    got = (tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.convert_tokens_to_ids(PAD_TOKEN))
    if got != (tokens, tokens + 1):
        raise ConversionError(f"{text_dir}: <image>/<pad> landed at ids {got}, expected ({tokens}, {tokens + 1})")
    eos = [existing[t] for t in backbone.stop_tokens]
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    info = TokenizerInfo(
        ids=TokenIds(
            vocab=vocab,
            bos=tok.bos_token_id,
            eos=eos[0] if len(eos) == 1 else eos,
            tokens=None if tokens == vocab else tokens,
        ),
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
        unk_token=tok.unk_token,
        add_bos_token=_base_add_bos(text_dir),
        prefix_rule=rule,
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
    if (
        model.get("type") == "BPE"
        and isinstance(merges, list)
        and all(isinstance(m, list) and len(m) == 2 and " " not in m[0] + m[1] for m in merges)
    ):
        model["merges"] = [f"{a} {b}" for a, b in merges]
    return json_text(data, sort_keys=False)  # tokenizer.json: the order of its keys is transformers' own


def write_tokenizer_files(
    out: Path, tok, info: TokenizerInfo, text_dir: Path, model_max_length: int, backbone: Backbone = VICUNA
) -> None:
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
    additional = [IMAGE_TOKEN] + [
        a.content for _, a in sorted(tok.added_tokens_decoder.items()) if a.special and a.content not in named
    ]
    cfg = {
        "additional_special_tokens": additional,
        "added_tokens_decoder": decoder,
        "bos_token": info.bos_token,
        "chat_template": backbone.chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": info.eos_token,
        # PreTrainedTokenizerFast in 4.x would also return token_type_ids, which generate() refuses
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "pad_token": PAD_TOKEN,
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "tokenizer_class": backbone.tokenizer_class,
    }
    if sentencepiece:  # the slow-tokenizer settings (transformers 4.x, use_fast=False)
        cfg.update(
            {
                "add_bos_token": info.add_bos_token,
                "add_eos_token": False,
                "legacy": info.prefix_rule != "chunk",  # the converted tokenizer.json's rule, for the record
                "sp_model_kwargs": {},
                "spaces_between_special_tokens": False,
                "unk_token": info.unk_token,
                "use_default_system_prompt": False,
            }
        )
    write_json(out / "tokenizer_config.json", cfg)
    special = {
        "additional_special_tokens": additional,
        "bos_token": info.bos_token,
        "eos_token": info.eos_token,
        "pad_token": PAD_TOKEN,
    }
    if info.unk_token is not None:
        special["unk_token"] = info.unk_token
    write_json(out / "special_tokens_map.json", special, ensure_ascii=True)


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
        raise ConversionError(
            f"{where}: expected CLIP preprocessing (size.shortest_edge and crop_size), found size={size!r} "
            f"crop_size={crop!r}"
        )
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


def write_processor_files(
    out: Path, preprocessor: dict, patch_size: int, where: str, backbone: Backbone = VICUNA
) -> None:
    write_json(out / "preprocessor_config.json", image_processor_config(preprocessor, where))
    write_json(out / "processor_config.json", processor_config(patch_size))
    write_json(out / "chat_template.json", {"chat_template": backbone.chat_template})
