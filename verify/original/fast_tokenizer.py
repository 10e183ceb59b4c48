"""transformers' fast tokenizer (``use_fast=True``) as ``llava/model/builder.py`` loaded it, for Llama-3 and Phi-3.

Llama-3 and Phi-3 ran with the FAST tokenizer (Llama-3 has no slow class), i.e. the base model's
``tokenizer.json`` run by ``tokenizers`` itself (:class:`FastTokenizer`): Llama-3's ``PreTrainedTokenizerFast``
keeps the file's post-processor (which adds ``<|begin_of_text|>``), Phi-3's ``LlamaTokenizerFast`` replaces it by
BOS/EOS according to ``add_bos_token`` / ``add_eos_token`` (``tokenization_llama_fast.py``
``update_post_processor``).  A Phi-3 folder with only ``tokenizer.model`` (LLaVA's ``train.py`` saved
``use_fast=False``) gets the fast tokenizer transformers 4.37.2 converted from it
(:func:`llama_fast_from_sentencepiece`: ``convert_slow_tokenizer.py`` ``LlamaConverter`` +
``SentencePieceExtractor`` restated with ``tokenizers`` building blocks); measured equal to 4.37.2's on the real
Phi-3 vocabulary (446 of 446 prompts in ``tests/test_reference.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import OriginalLoadError
from .image_token import tokenizer_image_token
from .tokenizer_files import read_json, token_content


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
        content = token_content(value)
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
        cfg = read_json(cfg_path)
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
        specials = {k: token_content(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        for k, v in read_json(text_model / "special_tokens_map.json").items():
            if k in specials:
                specials[k] = token_content(v)
        self.add_bos_token = bool(cfg.get("add_bos_token", True))
        self.add_eos_token = bool(cfg.get("add_eos_token", False))
        self.bos_token, self.eos_token = specials["bos_token"], specials["eos_token"]
        self.bos_id = self._required(self.bos_token, "bos_token", cfg_path)
        self.eos_id = self._required(self.eos_token, "eos_token", cfg_path)
        for sid, entry in (cfg.get("added_tokens_decoder") or {}).items():
            content = token_content(entry)
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
