"""The plan: for every output tensor, its input tensor, output dtype and shape, where its stored bytes lie in the
input stream, and how it is made (copied as stored, loaded through torch and cast, or produced by the resize).

Pure: it reads no file and starts no thread. The pipeline builds it from the key mapping, the checkpoint's tensor
records and the stream positions, then attaches to each entry the code that produces its values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import ConversionError
from .mapping import EMBED_KEY, LM_HEAD_KEY, KeyMapping
from .sources import TensorInfo

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_NAME = {v: k for k, v in DTYPES.items()}
ORIGINAL_EMBED = "model.embed_tokens.weight"
ORIGINAL_LM_HEAD = "lm_head.weight"

How = Literal["verbatim", "load", "resized"]


@dataclass(frozen=True)
class DtypeChoice:
    """The output dtypes ``--dtype`` asks for: ``auto`` keeps every tensor's own dtype (the lm_head's too, which may
    differ from the embedding's); a named dtype applies to every floating-point tensor."""

    requested: str
    embed: torch.dtype
    head: torch.dtype

    def for_stored(self, stored: torch.dtype) -> torch.dtype:
        return stored if self.requested == "auto" or not stored.is_floating_point else self.embed


def choose_dtypes(requested: str, embed: TensorInfo, head: TensorInfo) -> DtypeChoice:
    """``requested`` is "auto" or a key of :data:`DTYPES` (checked before)."""
    out = embed.dtype if requested == "auto" else DTYPES[requested]
    head_dtype = head.dtype if requested == "auto" else out
    for key, info, dtype in ((ORIGINAL_EMBED, embed, out), (ORIGINAL_LM_HEAD, head, head_dtype)):
        if dtype not in DTYPE_NAME:
            raise ConversionError(
                f"{key}: stored as {info.dtype}; expected a floating-point matrix, pass --dtype bfloat16, float16 or "
                "float32"
            )
    return DtypeChoice(requested, out, head_dtype)


@dataclass(frozen=True)
class TensorPlan:
    target: str  # name in the converted repo
    source: str  # name in the original checkpoint
    dtype: torch.dtype  # as written
    shape: tuple[int, ...]  # as written
    span: tuple[int, int] | None  # stream positions of the stored bytes (None: not stored as plain bytes)
    how: How  # "verbatim": the stored bytes; "load": through torch, cast to ``dtype``; "resized": by the resize


def plan(
    mapping: KeyMapping,
    infos: Mapping[str, TensorInfo],
    spans: Mapping[str, tuple[int, int] | None],
    dtypes: DtypeChoice,
    rows: int,
) -> list[TensorPlan]:
    """One entry per mapped tensor, in the mapping's order. The embedding and the lm_head get ``rows`` rows."""
    out = []
    for src, tgt in mapping.mapped.items():
        info, span = infos[src], spans.get(src)
        if tgt in (EMBED_KEY, LM_HEAD_KEY):
            dtype = dtypes.embed if tgt == EMBED_KEY else dtypes.head
            out.append(TensorPlan(tgt, src, dtype, (rows, *tuple(info.shape)[1:]), span, "resized"))
        else:
            dtype = dtypes.for_stored(info.dtype)
            how: How = "verbatim" if span is not None and dtype == info.dtype else "load"
            out.append(TensorPlan(tgt, src, dtype, tuple(info.shape), span, how))
    return out
