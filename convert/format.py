"""The safetensors format of the output: what a tensor to write is, how tensors are grouped into shards, each
shard's header, where each tensor lies in its shard, and the index of a sharded repo.

The files hold exactly the tensors ``safetensors.torch.save_file`` writes for the same dict (same names, dtypes,
shapes, bytes and metadata). Inside a shard the tensors are grouped by dtype in safetensors' order (so every tensor
stays aligned to its element size, as save_file guarantees) and, within a dtype, lie in input order; save_file
orders by name instead, so the two files differ only in where each tensor lies, which the format leaves free.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .sources import TensorInfo

_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
# safetensors lays tensors out by dtype (its Dtype enum order, descending: the widest elements first, so each
# tensor is aligned to its element size), then by name; we keep its dtype grouping, then input order.
_SAFETENSORS_ORDER = ("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64")


@dataclass(frozen=True)
class OutTensor:
    """One tensor to write: its name, output dtype and shape, and how to get its values (called once).

    ``source`` is where its values lie in the input, as (start, end) positions in the concatenation of the
    input weight files (see :class:`InputStream`); None where unknown."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]
    source: tuple[int, int] | None = None
    late: bool = False  # computed while the others are written (the resized matrices): planned after them
    verbatim: bool = False  # its output bytes are exactly the input bytes at ``source`` (same dtype, contiguous)

    @property
    def nbytes(self) -> int:
        return TensorInfo(self.dtype, self.shape).nbytes


def plan_shards(tensors: list[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    """Filled greedily in input order (by name where any input position is unknown), ``late`` tensors last; a
    tensor larger than the limit gets a shard of its own. Input order keeps each shard's sources in one window of
    the input; ``late`` ones last let their computation overlap the writing of every shard before theirs."""
    if all(t.source is not None for t in tensors):
        order = sorted(tensors, key=lambda t: (t.late, t.source, t.name))
    else:
        order = sorted(tensors, key=lambda t: (t.late, t.name))
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in order:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def shard_header(tensors: list[OutTensor]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        entries[t.name] = {
            "dtype": _DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)  # data starts 8-byte aligned, padded with spaces as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return t.reshape(-1).view(torch.uint8).numpy().data  # reshape first: a 0-dim tensor cannot be viewed


def shard_order(tensors: list[OutTensor]) -> list[OutTensor]:
    """Where each tensor lies in its shard: by dtype as safetensors does (widest first), then in plan order."""
    return sorted(tensors, key=lambda t: -_SAFETENSORS_ORDER.index(_DTYPE_NAMES[t.dtype]))


def index_json(shards: list[list[OutTensor]], names: list[str]) -> dict:
    weight_map = {t.name: name for shard, name in zip(shards, names, strict=True) for t in shard}
    total = sum(t.nbytes for shard in shards for t in shard)
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
