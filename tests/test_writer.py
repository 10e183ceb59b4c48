"""The streamed safetensors writer writes exactly the tensors ``safetensors.torch.save_file`` writes for the same
dict: same names, dtypes, shapes, bytes and metadata, in a valid layout (grouped by dtype as save_file does, then in
input order instead of by name). Given the tensors in save_file's order it writes save_file's file, byte for byte."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from convert.format import _DTYPE_NAMES, _SAFETENSORS_ORDER, OutTensor
from convert.writer import write_shard


def _ours(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    write_shard(path, [OutTensor(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in sd.items()])
    return path


def _layout(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    return header, len(raw) - 8 - n


def _check_layout(path: Path) -> list[str]:
    """Valid safetensors: header padded with spaces to 8 bytes, offsets tiling the data with no hole or overlap,
    each tensor aligned to its element size, dtype groups in safetensors' order. Returns the names in file order."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0 and raw[8 : 8 + n].rstrip(b" ").endswith(b"}")
    header, data = _layout(path)
    entries = sorted(((v["data_offsets"], k, v["dtype"]) for k, v in header.items() if k != "__metadata__"))
    pos = 0
    for (a, b), name, dtype in entries:
        assert a == pos, name
        size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(dtype, 1)
        assert a % size == 0, name
        pos = b
    assert pos == data
    ranks = [_SAFETENSORS_ORDER.index(d) for _, _, d in entries]
    assert ranks == sorted(ranks, reverse=True)
    return [k for _, k, _ in entries]


def test_converted_shards_hold_what_save_file_writes_for_the_same_dict(converted, tmp_path):
    shards = sorted(converted.glob("*.safetensors"))
    assert shards
    for shard in shards:
        _check_layout(shard)
        sd = load_file(str(shard))
        ref = tmp_path / shard.name
        save_file(sd, str(ref), metadata={"format": "pt"})
        ours, _ = _layout(shard)
        theirs, _ = _layout(ref)
        assert {k: (v["dtype"], v["shape"]) for k, v in ours.items() if k != "__metadata__"} == {
            k: (v["dtype"], v["shape"]) for k, v in theirs.items() if k != "__metadata__"
        }
        with safe_open(str(shard), "pt") as a, safe_open(str(ref), "pt") as b:
            assert a.metadata() == b.metadata() == {"format": "pt"}
            assert sorted(a.keys()) == sorted(b.keys())
            for k in a.keys():
                x, y = a.get_tensor(k), b.get_tensor(k)
                assert x.dtype == y.dtype and x.shape == y.shape
                assert x.reshape(-1).view(torch.uint8).equal(y.reshape(-1).view(torch.uint8)), k


def _edge_dict(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "z.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "a.f32": torch.randn(7, generator=g),
        "m.i64": torch.arange(4),
        "b.f16": torch.randn(2, 2, generator=g).to(torch.float16),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "flag": torch.tensor([True, False]),
        "bytes": torch.arange(3, dtype=torch.uint8),
        "c.bf16": torch.randn(1, generator=g).to(torch.bfloat16),
    }


@pytest.mark.parametrize("seed", [0, 1])
def test_mixed_dtypes_and_edge_shapes_round_trip_in_a_valid_layout(tmp_path, seed):
    sd = _edge_dict(seed)
    ours = _ours(tmp_path / "ours.safetensors", sd)
    order = _check_layout(ours)
    bf16 = [k for k in order if k.endswith(".bf16")]
    assert bf16 == ["z.bf16", "c.bf16"]  # within a dtype: the order given, not by name
    back = load_file(str(ours))
    assert set(back) == set(sd) and all(back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("seed", [0, 1])
def test_in_save_file_order_the_file_is_save_files_byte_for_byte(tmp_path, seed):
    sd = _edge_dict(seed)
    ordered = dict(sorted(sd.items(), key=lambda kv: (-_SAFETENSORS_ORDER.index(_DTYPE_NAMES[kv[1].dtype]), kv[0])))
    ours = _ours(tmp_path / "ours.safetensors", ordered)
    save_file(sd, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert ours.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
