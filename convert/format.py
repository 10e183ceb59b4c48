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
from collections.abc import Callable, Iterator
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
    return pack_shards(shard_plan_order(tensors), max_bytes)


def shard_plan_order(tensors: list[OutTensor]) -> list[OutTensor]:
    """The order :func:`plan_shards` fills shards in. It depends on no tensor's size, so the order of tensors whose
    shapes are still unknown (the resized matrices, before the tokenizer is read) is already final."""
    if all(t.source is not None for t in tensors):
        return sorted(tensors, key=lambda t: (t.late, t.source, t.name))
    return sorted(tensors, key=lambda t: (t.late, t.name))


def pack_shards(order: list[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    """Greedy: each tensor joins the open shard unless it would pass ``max_bytes``. Nothing looks ahead, so the
    shards closed before a prefix's last one are the same whatever follows the prefix."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in order:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


class ShardPlan:
    """The shards of :func:`plan_shards`, in write order, for a plan whose ``late`` tensors are not known at first
    (the resized matrices need the tokenizer's row count). ``provisional`` holds every tensor, the late ones as
    placeholders of any size; ``late`` blocks until the real late tensors are known and returns them (or, when
    ``provisional`` is empty, every tensor).

    Iterating yields each shard as soon as it is fixed: the shards that close before the last one holding only
    known tensors come at once (:func:`pack_shards` never looks ahead, and :func:`shard_plan_order` depends on no
    size), the rest after ``late`` returns. The result is exactly ``plan_shards`` of the final tensors, then held in
    :attr:`shards`; :attr:`total` is the byte count, provisional until then."""

    def __init__(self, provisional: list[OutTensor], max_bytes: int, late: Callable[[], list[OutTensor]]):
        self._early = [t for t in shard_plan_order(provisional) if not t.late]
        self._late = late
        self._max_bytes = max_bytes
        self.total = sum(t.nbytes for t in provisional)
        self.shards: list[list[OutTensor]] = []

    def __iter__(self) -> Iterator[list[OutTensor]]:
        head = pack_shards(self._early, self._max_bytes) if self._early else [[]]
        yield from head[:-1]
        order = shard_plan_order(self._early + self._late())
        kept = order[: len(self._early)]
        if len(kept) != len(self._early) or any(a is not b for a, b in zip(kept, self._early, strict=True)):
            raise AssertionError("the late tensors changed the order of the early ones; this is a converter bug")
        self.shards = head[:-1] + pack_shards(head[-1] + order[len(self._early) :], self._max_bytes)
        self.total = sum(t.nbytes for shard in self.shards for t in shard)
        yield from self.shards[len(head) - 1 :]


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
