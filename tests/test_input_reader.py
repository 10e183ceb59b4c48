"""The input is read once: tensor locations are right, the stream's hashes are the files' sha256, it hands out
exactly the asked bytes across chunk and file boundaries, it holds a bounded number of buffers, and a conversion
copies every verbatim tensor from it (all but the two resized matrices), and a wrong offset cannot pass."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import torch

from convert import pipeline
from convert.errors import ConversionError
from convert.format import OutTensor, plan_shards
from convert.sources import Checkpoint, open_checkpoint
from convert.stream import InputStream
from fixtures.build import build


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _files(tmp_path: Path, sizes: list[int]) -> list[Path]:
    files = []
    for i, size in enumerate(sizes):
        p = tmp_path / f"f{i}"
        p.write_bytes(bytes((j * 7 + i) % 251 for j in range(size)))
        files.append(p)
    return files


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_locations_point_at_the_tensor_bytes(tmp_path, fmt):
    paths = build(tmp_path / "fx", fmt=fmt, shards=2)  # its own: each format, two shards (not the session's)
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


def test_a_non_contiguous_tensor_has_no_location(tmp_path):
    torch.save({"plain": torch.arange(6.0), "transposed": torch.arange(12.0).reshape(3, 4).t()}, tmp_path / "x.bin")
    ckpt = open_checkpoint(tmp_path / "x.bin")
    assert ckpt.location("plain") is not None
    assert ckpt.location("transposed") is None  # its file bytes are not its row-major values


def test_stream_digests_are_the_files_sha256(tmp_path, monkeypatch):
    monkeypatch.setattr(InputStream, "CHUNK", 4096)
    monkeypatch.setattr(InputStream, "BUFFERS", 2)
    files = _files(tmp_path, [0, 1, 4096 * 3 + 3, 1000])
    s = InputStream(files).start()
    assert s.finish() == {p: _sha(p) for p in files}
    assert s.bytes_read == sum(p.stat().st_size for p in files)


def test_take_returns_exactly_the_asked_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(InputStream, "CHUNK", 4096)
    monkeypatch.setattr(InputStream, "BUFFERS", 3)
    files = _files(tmp_path, [5000, 0, 9000, 7])
    whole = b"".join(p.read_bytes() for p in files)
    s = InputStream(files).start()
    for a, b in [(0, 10), (10, 10), (100, 4095), (4096, 4097), (4990, 5010), (6000, 14000), (14000, 14007)]:
        assert s.can_take(a)
        assert b"".join(bytes(v) for v in s.take(a, b)) == whole[a:b], (a, b)
    assert not s.can_take(13999)
    with pytest.raises(ValueError):
        next(s.take(0, 1))
    assert s.finish() == {p: _sha(p) for p in files}


def test_stream_holds_a_bounded_number_of_buffers(tmp_path, monkeypatch):
    monkeypatch.setattr(InputStream, "CHUNK", 4096)
    monkeypatch.setattr(InputStream, "BUFFERS", 3)
    files = _files(tmp_path, [4096 * 20])
    s = InputStream(files).start()
    time.sleep(0.5)  # nobody takes anything: the reader must stop once its buffers are full
    assert s.bytes_read == 3 * 4096
    assert s._hash_pos == 4096 * 20  # the hash went on alone (reading the file itself): the converter is starting
    assert s.finish() == {files[0]: _sha(files[0])}
    assert s.bytes_read == 4096 * 20


def test_the_hash_goes_ahead_alone_only_within_the_budget(tmp_path, monkeypatch):
    """The hash goes ahead alone only while the reader is stuck, and no further than the budget past it; then it
    hashes the reader's buffers, and the digests are the files' sha256."""
    monkeypatch.setattr(InputStream, "CHUNK", 4096)
    monkeypatch.setattr(InputStream, "BUFFERS", 2)
    monkeypatch.setattr(InputStream, "WARM_BYTES", 3 * 4096)
    files = _files(tmp_path, [4096 * 10 + 5, 4096 * 2])
    s = InputStream(files).start()
    time.sleep(0.5)
    assert s.bytes_read == 2 * 4096 and s._hash_pos == 3 * 4096 + 2 * 4096  # budget ahead of the reader, no more
    whole = b"".join(p.read_bytes() for p in files)
    assert b"".join(bytes(v) for v in s.take(0, len(whole))) == whole
    assert s.finish() == {p: _sha(p) for p in files}


def test_stream_error_reaches_the_writer(tmp_path):
    p = tmp_path / "gone"
    p.write_bytes(b"x" * 10)
    s = InputStream([p])
    p.unlink()
    s.start()
    with pytest.raises(ConversionError, match=r"gone: reading failed \(No such file"):
        next(s.take(0, 10))


def test_shards_are_planned_in_input_order():
    def t(name, start, n):
        return OutTensor(name, torch.uint8, (n,), lambda: torch.zeros(n, dtype=torch.uint8), (start, start + n))

    tensors = [t("z", 0, 40), t("a", 40, 40), t("m", 80, 40), t("b", 120, 40)]
    shards = plan_shards(tensors, 100)
    assert [[x.name for x in s] for s in shards] == [["z", "a"], ["m", "b"]]
    unknown = [OutTensor(x.name, x.dtype, x.shape, x.produce) for x in tensors]
    assert [[x.name for x in s] for s in plan_shards(unknown, 100)] == [["a", "b"], ["m", "z"]]


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_conversion_copies_from_the_stream_and_reads_the_input_once(tmp_path, monkeypatch, fmt):
    """Every input byte passes through the stream exactly once, every tensor but the two resized ones is copied
    from it, in input order; the manifest's hashes are the files'."""
    paths = build(tmp_path / "fx", shards=3, fmt=fmt)  # its own: three shards of each format
    monkeypatch.setattr(InputStream, "CHUNK", 4096)
    monkeypatch.setattr(InputStream, "BUFFERS", 4)
    streams: list[InputStream] = []
    real_start = InputStream.start

    def spy_start(self):
        streams.append(self)
        return real_start(self)

    monkeypatch.setattr(InputStream, "start", spy_start)
    taken: list[tuple[int, int]] = []
    real_take = InputStream.take

    def spy_take(self, a, b):
        taken.append((a, b))
        return real_take(self, a, b)

    monkeypatch.setattr(InputStream, "take", spy_take)
    out = tmp_path / "out"
    pipeline.convert(
        pipeline.Options(
            original=str(paths.original),
            output=out,
            text_model=str(paths.text_model),
            vision_model=str(paths.vision_model),
            max_shard_size="200KB",
            progress=False,
        )
    )
    (s,) = streams
    total = sum(f.stat().st_size for f in s.files)
    assert s.bytes_read == total  # read once, whole
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    *copies, drain = taken
    assert drain[1] == total  # finish() reads what no tensor needed (pickle records, dropped keys)
    assert len([1 for a, b in copies if b > a]) == len(index["weight_map"]) - 2  # every tensor but the 2 resized
    assert taken == sorted(taken)  # the stream only moves forward
    m = json.loads((out / "conversion.json").read_text())
    for name, digest in m["inputs"]["original"]["files"].items():
        assert digest == _sha(paths.original / name), name


def test_a_wrong_offset_is_caught_and_nothing_is_written(tiny, tmp_path, monkeypatch):
    paths = tiny
    real = Checkpoint.location

    def shifted(self, key):
        loc = real(self, key)
        return None if loc is None else (loc[0], loc[1] + 2)

    monkeypatch.setattr(Checkpoint, "location", shifted)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="converter bug"):
        pipeline.convert(
            pipeline.Options(
                original=str(paths.original),
                output=out,
                text_model=str(paths.text_model),
                vision_model=str(paths.vision_model),
                progress=False,
            )
        )
    assert not out.exists() and not list(tmp_path.glob(".vipllava-tmp-*"))


def test_output_is_flushed_and_dropped_behind_the_writer(tmp_path, monkeypatch):
    """Every STEP bytes the flusher starts writeback of the new range and waits for and drops the one before;
    closing fsyncs and drops the rest; the file is intact."""
    from convert import sinks, writer

    monkeypatch.setattr(sinks.DropBehind, "STEP", 4096)
    calls: list[tuple] = []
    real_sync, real_drop = sinks._sync_range, sinks.drop_cached
    monkeypatch.setattr(
        sinks, "_sync_range", lambda fd, a, n, wait: (calls.append(("sync", a, n, wait)), real_sync(fd, a, n, wait))
    )
    monkeypatch.setattr(sinks, "drop_cached", lambda fd, a=0, n=0: (calls.append(("drop", a, n)), real_drop(fd, a, n)))
    sd = {f"t{i}": torch.full((1000,), float(i)) for i in range(10)}  # 40 kB of float32
    flusher = sinks.DropBehind()
    path = tmp_path / "x.safetensors"
    writer.write_shard(
        path,
        [OutTensor(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in sd.items()],
        flusher=flusher,
        direct=False,  # the page-cache path (file systems without O_DIRECT)
    )
    flusher.close(path).result()
    flusher.shutdown()
    starts = [c for c in calls if c[0] == "sync" and not c[3]]
    assert len(starts) >= 4 and all(n >= 4096 for _, _, n, _ in starts)  # one per >= 4 kB written
    assert [a for _, a, _, _ in starts] == sorted(a for _, a, _, _ in starts)
    waited = [c for c in calls if c[0] == "sync" and c[3]]
    drops = [c for c in calls if c[0] == "drop"]
    assert waited and all(w[1] == 0 for w in waited) and drops[-1] == ("drop", 0, 0)  # the whole file at close
    from safetensors.torch import load_file

    back = load_file(str(path))
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_an_error_at_fsync_fails_the_run_and_leaves_nothing(tiny, tmp_path, monkeypatch):
    import errno
    import os

    paths = tiny

    def broken_fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", broken_fsync)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="writing failed"):
        pipeline.convert(
            pipeline.Options(
                original=str(paths.original),
                output=out,
                text_model=str(paths.text_model),
                vision_model=str(paths.vision_model),
                progress=False,
            )
        )
    assert not out.exists() and not list(tmp_path.glob(".vipllava-tmp-*"))


@pytest.mark.parametrize("stage", [4096, 8192, 1 << 23])
def test_direct_and_buffered_writes_give_the_same_file(tmp_path, monkeypatch, stage):
    """Across staging-buffer boundaries, with a tail shorter than a block: the O_DIRECT file is the page-cache
    file, byte for byte, and its size is the true size (the padding is cut)."""
    from convert import sinks, writer

    monkeypatch.setattr(sinks._DirectSink, "STAGE", stage)
    probe = sinks.open_sink(tmp_path / "probe", None)
    probe.abort()
    if not isinstance(probe, sinks._DirectSink):
        pytest.skip(f"{tmp_path}: this file system refuses O_DIRECT")
    g = torch.Generator().manual_seed(stage)
    sd = {f"t{i}": torch.randn(n, generator=g) for i, n in enumerate([1, 1023, 1024, 3000, 7, 5000, 2049])}
    tensors = [OutTensor(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in sd.items()]
    direct = tmp_path / "direct.safetensors"
    writer.write_shard(direct, tensors)
    buffered = tmp_path / "buffered.safetensors"
    writer.write_shard(buffered, tensors, direct=False)
    assert direct.read_bytes() == buffered.read_bytes()
    assert direct.stat().st_size % 4096 != 0  # a padded tail was cut back


def test_a_file_system_without_o_direct_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    import errno

    from convert import sinks, writer

    def refuse(path):
        raise OSError(errno.EINVAL, "O_DIRECT not supported")

    monkeypatch.setattr(sinks, "_DirectSink", refuse)
    t = torch.arange(10.0)
    path = tmp_path / "x.safetensors"
    writer.write_shard(path, [OutTensor("t", t.dtype, (10,), lambda: t)])
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(path))["t"], t)


def test_an_input_changed_under_the_converter_fails_cleanly(tmp_path, monkeypatch):
    """A weight file truncated after the checkpoint was opened: one error naming it, nothing left behind."""
    paths = build(tmp_path / "fx", shards=2)  # its own: the shards are changed below

    class Truncating(InputStream):
        def start(self):
            with open(self.files[0], "r+b") as f:
                f.truncate(self.sizes[self.files[0]] // 2)
            return super().start()

    monkeypatch.setattr(pipeline, "InputStream", Truncating)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"pytorch_model-00001-of-00002\.bin: changed size since it was opened"):
        pipeline.convert(
            pipeline.Options(
                original=str(paths.original),
                output=out,
                text_model=str(paths.text_model),
                vision_model=str(paths.vision_model),
                progress=False,
            )
        )
    assert not out.exists() and not list(tmp_path.glob(".vipllava-tmp-*"))


def test_kept_ranges_stay_cached_and_the_rest_is_dropped(tmp_path, monkeypatch):
    """The resize reads the two matrices again through torch: the reader drops every page it has read except
    theirs (ranges across chunk and file boundaries)."""
    from convert import stream as stream_mod

    monkeypatch.setattr(InputStream, "CHUNK", 4096)
    files = _files(tmp_path, [3 * 4096 + 100, 2 * 4096])
    total = sum(f.stat().st_size for f in files)
    keep = [(1000, 5000), (3 * 4096 + 50, 3 * 4096 + 100 + 4096 + 10)]  # the second spans both files
    dropped: list[tuple[int, int]] = []
    starts = {files[0]: 0, files[1]: files[0].stat().st_size}

    def record(fd, start=0, length=0):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        dropped.append((starts[path] + start, starts[path] + start + length))

    monkeypatch.setattr(stream_mod, "drop_cached", record)
    s = InputStream(files)
    s.keep(keep).start()
    s.finish()
    covered = [False] * total
    for a, b in dropped:
        for i in range(a, b):
            assert not any(ka <= i < kb for ka, kb in keep), f"byte {i} of a kept range was dropped"
            covered[i] = True
    assert all(covered[i] or any(ka <= i < kb for ka, kb in keep) for i in range(total))
