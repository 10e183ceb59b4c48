"""The input is read once: tensor locations are right, the reader's hashes are the files' sha256, output shards
follow input order, and the reader never runs more than one output window ahead of the writer."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
import torch

from convert import pipeline
from convert.sources import open_checkpoint
from convert.writer import InputReader, OutTensor, plan_shards
from fixtures.build import build


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_locations_point_at_the_tensor_bytes(tmp_path, fmt):
    paths = build(tmp_path / "fx", fmt=fmt, shards=2)
    ckpt = open_checkpoint(paths.original)
    data = {f: f.read_bytes() for f in ckpt.files}
    assert len(ckpt.files) == 2
    for key in ckpt.keys():
        loc = ckpt.location(key)
        assert loc is not None, key
        path, offset = loc
        t = ckpt.get(key)
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert data[path][offset : offset + len(raw)] == raw, key


def test_reader_digests_are_the_files_sha256(tmp_path):
    files = []
    for i, size in enumerate([0, 1, InputReader.CHUNK + 3, 1000]):
        p = tmp_path / f"f{i}"
        p.write_bytes(bytes((j * 7 + i) % 251 for j in range(size)))
        files.append(p)
    r = InputReader(files).start(limit=0)
    r.wait_for(5)  # raises the limit itself: no deadlock
    assert r.finish() == {p: _sha(p) for p in files}


def test_reader_error_reaches_the_writer(tmp_path):
    p = tmp_path / "gone"
    p.write_bytes(b"x" * 10)
    r = InputReader([p])
    p.unlink()
    r.start(limit=10**9)
    with pytest.raises(FileNotFoundError):
        r.wait_for(10)


def test_shards_are_planned_in_input_order():
    def t(name, start, n):
        return OutTensor(name, torch.uint8, (n,), lambda: torch.zeros(n, dtype=torch.uint8), (start, start + n))

    tensors = [t("z", 0, 40), t("a", 40, 40), t("m", 80, 40), t("b", 120, 40)]
    shards = plan_shards(tensors, 100)
    assert [[x.name for x in s] for s in shards] == [["z", "a"], ["m", "b"]]
    unknown = [OutTensor(x.name, x.dtype, x.shape, x.produce) for x in tensors]
    assert [[x.name for x in s] for s in plan_shards(unknown, 100)] == [["a", "b"], ["m", "z"]]


def test_conversion_reads_the_input_in_one_window(tmp_path, monkeypatch):
    """Small shards and no read-ahead: at every tensor the writer copies, the reader is past that tensor's bytes
    and at most one output window (the largest shard's span) ahead; the manifest's hashes are the files' sha256."""
    paths = build(tmp_path / "fx", shards=3)
    monkeypatch.setattr(pipeline, "_READ_AHEAD", 0)
    monkeypatch.setattr(InputReader, "CHUNK", 4096)
    seen: list[tuple[int, int, int]] = []  # (reader position, tensor start, tensor end)
    real_wait = InputReader.wait_for

    def spy(self, end):
        real_wait(self, end)
        seen.append((self._pos, end))

    monkeypatch.setattr(InputReader, "wait_for", spy)
    out = tmp_path / "out"
    pipeline.convert(pipeline.Options(original=str(paths.original), output=out, text_model=str(paths.text_model),
                                      vision_model=str(paths.vision_model), max_shard_size="200KB", progress=False))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert seen and all(pos >= end for pos, end in seen)
    total = sum(p.stat().st_size for p in paths.original.glob("*.bin"))
    ckpt = open_checkpoint(paths.original)
    biggest = max(ckpt.info(k).nbytes for k in ckpt.keys())
    window = max(200_000, biggest) + 64_000 + 4096  # a shard's span (with the pickle headers and dropped buffers
    lead = max(pos - end for pos, end in seen)      # between), plus the chunk the reader was in when it stopped
    assert lead <= window < total / 2, (lead, window, total)
    m = json.loads((out / "conversion.json").read_text())
    files = m["inputs"]["original"]["files"]
    for name, digest in files.items():
        assert digest == _sha(paths.original / name), name
    assert any(name.endswith(".bin") for name in files)
