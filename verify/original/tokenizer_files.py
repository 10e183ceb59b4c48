"""The base text model's tokenizer files, read as transformers' ``from_pretrained`` read them.

``tokenizer_config.json``, ``special_tokens_map.json`` and ``added_tokens.json`` are JSON objects (a missing file
counts as empty); a special-token entry is a plain string or an ``AddedToken`` object (``{"content": ...}``).
:func:`base_tokenizer_tokens` lists every token the files name, which is how :func:`verify.original.detect_backbone`
tells the backbones that share one original ``model_type`` apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sentencepiece as spm

from .errors import OriginalLoadError


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; a missing file is ``{}``, anything but an object is an error."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except json.JSONDecodeError as e:
        raise OriginalLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise OriginalLoadError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def token_content(value: Any) -> str | None:
    """The text of a special-token entry: a plain string, an ``AddedToken`` object's ``content``, or None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:
        return str(value["content"])
    raise OriginalLoadError(f"unsupported special-token entry: {value!r}")


def base_tokenizer_tokens(text_model: Path) -> set[str]:
    """Every token string the base tokenizer files name (vocabulary, added and special tokens)."""
    text_model = Path(text_model)
    found: set[str] = set()
    tj = text_model / "tokenizer.json"
    if tj.is_file():
        data = read_json(tj)
        vocab = (data.get("model") or {}).get("vocab") or {}
        found.update(vocab if isinstance(vocab, dict) else (v[0] for v in vocab if isinstance(v, list) and v))
        found.update(str(a.get("content")) for a in data.get("added_tokens") or [] if isinstance(a, dict))
    cfg = read_json(text_model / "tokenizer_config.json")
    for entry in (cfg.get("added_tokens_decoder") or {}).values():
        found.add(token_content(entry) or "")
    found.update(read_json(text_model / "added_tokens.json"))
    model = text_model / "tokenizer.model"
    if model.is_file():
        sp = spm.SentencePieceProcessor(model_file=str(model))
        found.update(sp.id_to_piece(i) for i in range(sp.get_piece_size()))
    return found
