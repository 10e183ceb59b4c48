"""The streamed safetensors writer writes exactly what ``safetensors.torch.save_file`` writes for the same dict:
same names, dtypes, shapes, bytes and metadata, and here even the same file, byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from convert.writer import OutTensor, write_shard


def _ours(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    write_shard(path, [OutTensor(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in sd.items()])
    return path


def test_converted_shards_equal_save_file_of_the_same_dict(converted, tmp_path):
    shards = sorted(converted.glob("*.safetensors"))
    assert shards
    for shard in shards:
        sd = load_file(str(shard))
        ref = tmp_path / shard.name
        save_file(sd, str(ref), metadata={"format": "pt"})
        assert shard.read_bytes() == ref.read_bytes(), shard.name
        with safe_open(str(shard), "pt") as a, safe_open(str(ref), "pt") as b:
            assert a.metadata() == b.metadata() == {"format": "pt"}
            assert list(a.keys()) == list(b.keys())


@pytest.mark.parametrize("seed", [0, 1])
def test_mixed_dtypes_and_edge_shapes_byte_identical(tmp_path, seed):
    g = torch.Generator().manual_seed(seed)
    sd = {
        "z.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "a.f32": torch.randn(7, generator=g),
        "m.i64": torch.arange(4),
        "b.f16": torch.randn(2, 2, generator=g).to(torch.float16),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "flag": torch.tensor([True, False]),
        "bytes": torch.arange(3, dtype=torch.uint8),
    }
    ours = _ours(tmp_path / "ours.safetensors", sd)
    save_file(sd, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert ours.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    back = load_file(str(ours))
    assert set(back) == set(sd) and all(back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]) for k in sd)
