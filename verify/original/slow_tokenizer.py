"""transformers' slow sentencepiece ``LlamaTokenizer`` (``use_fast=False``), restated for the Vicuna backbone.

``llava/model/builder.py`` loaded Vicuna's tokenizer with ``use_fast=False``: the slow ``LlamaTokenizer`` of
transformers 4.37.2 -- the pin of the original code's HEAD -- restated in :class:`LlamaSlowTokenizer`
(``tokenization_llama.py``: ``legacy`` and non-legacy ``tokenize`` / ``_tokenize``, the latter with sentencepiece's
dummy prefix disabled and the unk-prefix trick; ``PreTrainedTokenizer.tokenize`` and ``tokenization_utils.py``
``Trie.split``: cutting around added tokens, AddedToken ``lstrip`` / ``rstrip`` / ``single_word``).  The 4.31.0 era
(the Vicuna 7B/13B release pin) is kept as ``era="4.31.0"``: it differs in non-legacy mode after a special token,
and plain-string special tokens strip both sides there.

Cross-checked against the real libraries on the real Llama-2 vocabulary (``tests/test_reference.py``, in each
release's own Python, see ``tests/era.py``; CI makes both environments before pytest): each era's slow
tokenizer gives transformers' ids on 2012 of 2012 random prompts for eight configs (Vicuna v1.5's, legacy true /
absent / null, plain-string special tokens, lstrip/rstrip flags, an ``added_tokens_decoder``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import sentencepiece as spm

from .errors import OriginalLoadError
from .image_token import tokenizer_image_token
from .tokenizer_files import read_json, token_content

SPIECE_UNDERLINE = "\u2581"

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
        cfg = read_json(cfg_path)
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
        for key, value in read_json(text_model / "special_tokens_map.json").items():
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
            for key, value in read_json(text_model / "special_tokens_map.json").items():
                if key == "additional_special_tokens" and isinstance(value, list):
                    for v in value:
                        if all(token_content(v) != token_content(w) for w in values[key]):
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
