"""The data checks' one pass over the bytes: ``files`` (sha256 of every output), ``mapping`` (every original tensor
bit-identical to its converted counterpart) and ``resize`` (the original rows of the two resized matrices, the new
rows' distance from the original embedding's mean) read each byte of the converted repo and of the original once,
at disk speed, in bounded memory.

- The converted shards are read whole, in order, by the converter's :class:`~convert.stream.InputStream` (buffer
  pool on a thread; sha256 per file on a second thread). Their pages stay in the page cache: the model load that
  follows reads them again.
- The original tensors that have a converted counterpart are read by a second stream, as byte ranges, in the
  order their counterparts lie in the converted shards, and dropped from the page cache behind it.
- Each pair is compared chunk by chunk as it streams (the original cast to the converted dtype first when they
  differ, as ``a.to(b.dtype)`` would); the original embedding's mean and covariance trace are accumulated from
  the same chunks (float64, shifted sums); the resized matrices' new rows are kept (a few hundred KB).

What is compared with what is the checks' decision (``pairs``: converted name -> original key, from verify's own
prefix rules); where the bytes lie is found here, by verify's own readers of the two formats (a safetensors
header; a ``torch.save`` zip's pickle, read with a restricted unpickler that builds nothing, and its records),
never by the converter's. Each located original tensor's first and last bytes are compared with the tensor
``torch.load`` gives for the same key, so a wrong location cannot pass unnoticed. Tensors that cannot be located
(non-contiguous, another byte order, an unknown pickle) are compared from ``torch.load``/``safe_open`` instead.
"""

from __future__ import annotations

import collections
import hashlib
import json
import pickle
import struct
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
GUARD = 64  # bytes compared at each end of a located original tensor with what torch.load gives


@dataclass(frozen=True)
class Located:
    """A contiguous, native-byte-order tensor's bytes in a file."""

    path: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


# ------------------------------------------------------------------------------------------------------------
# where tensors lie
# ------------------------------------------------------------------------------------------------------------
def safetensors_locations(path: Path) -> dict[str, Located]:
    """name -> location, from a safetensors header (8-byte little-endian length, JSON). Entries whose dtype or
    extent is not understood are left out (their tensors are then read another way)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return {}
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):  # the safetensors library's own header limit is 100 MB
            return {}
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return {}
    if not isinstance(header, dict):
        return {}
    out = {}
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, dict):
            continue
        dtype_name = entry.get("dtype")
        dtype = ST_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError):
            continue
        if dtype is None:
            continue
        loc = Located(path, 8 + n + begin, dtype, shape)
        if end - begin == loc.nbytes and loc.offset + loc.nbytes <= size:
            out[name] = loc
    return out


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


class _MetaUnpickler(pickle.Unpickler):
    """Reads a ``torch.save`` state dict's pickle without building tensors: only plain containers, the storage
    types and ``_rebuild_tensor_v2`` are allowed, and the latter records where each tensor lies."""

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"{module}.{name} is not read here")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"persistent id {pid!r}")
        return _StorageRef(str(key), dtype, int(numel))


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    want = 1
    for d, s in zip(reversed(shape), reversed(stride), strict=False):
        if d != 1 and s != want:
            return False
        want *= d
    return True


def torch_zip_locations(path: Path) -> dict[str, Located]:
    """name -> location in a ``torch.save`` zip (stored records, little-endian); {} for anything else."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            pkl = next((n for n in names if n.endswith("/data.pkl")), None)
            if pkl is None:
                return {}
            prefix = pkl[: -len("data.pkl")]
            if f"{prefix}byteorder" in names and z.read(f"{prefix}byteorder").strip() != b"little":
                return {}
            state = _MetaUnpickler(z.open(pkl)).load()
            if not isinstance(state, dict):
                return {}
            records = {}
            with open(path, "rb") as raw:
                for info in z.infolist():
                    if not info.filename.startswith(f"{prefix}data/") or info.compress_type != zipfile.ZIP_STORED:
                        continue
                    raw.seek(info.header_offset)
                    local = raw.read(30)
                    if local[:4] != b"PK\x03\x04":
                        return {}
                    name_len, extra_len = struct.unpack("<HH", local[26:30])
                    records[info.filename[len(prefix) + 5 :]] = (
                        info.header_offset + 30 + name_len + extra_len,
                        info.file_size,
                    )
    except (zipfile.BadZipFile, pickle.UnpicklingError, OSError, ValueError, TypeError, EOFError, AttributeError):
        return {}
    out = {}
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef) or ref.storage.key not in records or not _contiguous(ref.shape, ref.stride):
            continue
        start, record_bytes = records[ref.storage.key]
        item = ref.storage.dtype.itemsize
        loc = Located(path, start + ref.offset * item, ref.storage.dtype, ref.shape)
        if ref.offset * item + loc.nbytes <= min(record_bytes, ref.storage.numel * item):
            out[str(name)] = loc
    return out


def locate(path: Path) -> dict[str, Located]:
    return safetensors_locations(path) if path.suffix == ".safetensors" else torch_zip_locations(path)


# ------------------------------------------------------------------------------------------------------------
# the pass
# ------------------------------------------------------------------------------------------------------------
@dataclass
class EmbeddingStats:
    """Streaming mean and covariance trace of a matrix's rows, in float64, with sums shifted by its first row."""

    hidden: int
    rows: int = 0
    shift: torch.Tensor | None = None
    col_sum: torch.Tensor | None = None
    sq_sum: float = 0.0
    _partial: torch.Tensor | None = None  # elements of a row split between two chunks

    def add(self, flat: torch.Tensor) -> None:
        x = flat.to(torch.float64)
        if self._partial is not None:
            x = torch.cat([self._partial, x])
            self._partial = None
        full = x.numel() // self.hidden * self.hidden
        if full < x.numel():
            self._partial = x[full:].clone()
        if not full:
            return
        m = x[:full].view(-1, self.hidden)
        if self.shift is None:
            self.shift = m[0].clone()
            self.col_sum = torch.zeros(self.hidden, dtype=torch.float64)
        assert self.col_sum is not None
        d = m - self.shift
        self.col_sum += d.sum(0)
        self.sq_sum += float((d * d).sum())
        self.rows += m.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        assert self.shift is not None and self.col_sum is not None, "mean of no rows"
        return self.shift + self.col_sum / self.rows

    @property
    def trace(self) -> float:
        """tr(Sigma) with the population covariance = mean squared distance of the rows from their mean."""
        assert self.col_sum is not None, "trace of no rows"
        c = self.col_sum / self.rows
        return self.sq_sum / self.rows - float((c * c).sum())


@dataclass
class PassResult:
    digests: dict[str, str] = field(default_factory=dict)  # output file name -> sha256
    equal: dict[str, bool] = field(default_factory=dict)  # converted name -> bytes equal to the original's
    new_rows: dict[str, torch.Tensor] = field(default_factory=dict)  # converted name -> rows past the original's
    stats: EmbeddingStats | None = None  # of the original embedding, when it was streamed
    problems: list[str] = field(default_factory=list)  # the pass's own findings (a located tensor that is not torch's)
    bytes_converted: int = 0
    bytes_original: int = 0
    seconds: float = 0.0

    def describe(self) -> dict:
        """What the pass read, for the report: bytes of each side and seconds."""
        return {
            "converted_bytes": self.bytes_converted,
            "original_bytes": self.bytes_original,
            "seconds": round(self.seconds, 2),
            "tensors_compared": len(self.equal),
        }


@dataclass(frozen=True)
class Pair:
    """A converted tensor and its original: the first ``original.numel`` elements of ``converted`` are compared."""

    name: str
    key: str
    converted: Located
    original: Located | None  # None: read with ``original_tensor`` instead of streamed
    original_dtype: torch.dtype
    original_shape: tuple[int, ...]
    keep_rest: bool = False  # keep the converted rows past the original's (the resized matrices)
    stats: bool = False  # accumulate the original's row statistics


def _same(a_views: Iterable[memoryview], b_views: Iterable[memoryview]) -> bool:
    """Whether two byte streams are equal (both are read to their ends)."""
    equal = True
    ia, ib = iter(a_views), iter(b_views)
    a: memoryview | None
    b: memoryview | None
    a_left = b_left = memoryview(b"")
    while True:
        a = a_left if len(a_left) else next(ia, None)
        b = b_left if len(b_left) else next(ib, None)
        if a is None or b is None:
            if a is not None and len(a) or b is not None and len(b):
                equal = False
            for _ in ia:
                equal = False
            for _ in ib:
                equal = False
            return equal
        n = min(len(a), len(b))
        if n and equal:
            equal = _equal_bytes(a[:n], b[:n])
        a_left, b_left = a[n:], b[n:]


def _equal_bytes(a: memoryview, b: memoryview) -> bool:
    """Byte equality of two equal-length views, 8 bytes at a time, in numpy (single-threaded: torch.equal spends
    ~10x the CPU, on uint8 or spinning its second thread on a busy machine)."""
    k = len(a) // 8 * 8
    if k and not np.array_equal(np.frombuffer(a[:k], dtype=np.int64), np.frombuffer(b[:k], dtype=np.int64)):
        return False
    return bytes(a[k:]) == bytes(b[k:])


def _tensor_views(t: torch.Tensor, chunk: int = 1 << 22) -> Iterator[memoryview]:
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    for i in range(0, flat.numel(), chunk):
        yield flat[i : i + chunk].numpy().data


def run_pass(
    shards: list[Path],
    other_outputs: list[Path],
    pairs: list[Pair],
    hash_files: bool,
    original_tensor: Callable[[str], torch.Tensor],
) -> PassResult:
    """Stream the shards (hashing them when ``hash_files``), compare every pair, hash the other outputs."""
    t0 = time.perf_counter()
    res = PassResult()
    if not hash_files and not pairs:
        return res
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # chunk-sized casts and sums: a second thread only spins (measured), the models come later
    try:
        _stream_pairs(res, shards, pairs, hash_files, original_tensor)
    finally:
        torch.set_num_threads(threads)
    if hash_files:
        for p in other_outputs:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while b := f.read(1 << 24):
                    h.update(b)
            res.digests[p.name] = h.hexdigest()
    res.seconds = time.perf_counter() - t0
    return res


def _stream_pairs(
    res: PassResult,
    shards: list[Path],
    pairs: list[Pair],
    hash_files: bool,
    original_tensor: Callable[[str], torch.Tensor],
) -> None:
    from convert.stream import InputStream

    conv = (
        InputStream(shards, drop=False)
        if hash_files
        else InputStream.ranges(
            [
                (p.converted.path, p.converted.offset, p.converted.nbytes)
                for p in sorted(pairs, key=_conv_order(shards))
            ],
            drop=False,
        )
    )
    conv_pos = (lambda loc: conv.position(loc.path, loc.offset)) if hash_files else None
    pairs = sorted(pairs, key=_conv_order(shards))
    streamed = [p for p in pairs if p.original is not None]
    orig = InputStream.ranges([(o.path, o.offset, o.nbytes) for p in streamed if (o := p.original) is not None])
    conv.start()
    orig.start()
    guards: list[tuple[Pair, bytes, bytes]] = []
    try:
        cpos, opos = 0, 0
        first: bytearray | None
        last: bytearray | None
        for p in pairs:
            start = conv_pos(p.converted) if conv_pos else cpos
            n_cmp = (
                p.original.numel * p.converted.dtype.itemsize
                if p.original
                else _numel(p.original_shape) * p.converted.dtype.itemsize
            )
            if p.original is not None:
                source = orig.take(opos, opos + p.original.nbytes)
                opos += p.original.nbytes
                head, tail = bytearray(), bytearray()
                source = _guarded(source, head, tail)
                first, last = head, tail
            else:
                source = _tensor_views(original_tensor(p.key))
                first = last = None
            if p.stats:
                res.stats = EmbeddingStats(hidden=p.original_shape[-1])
                source = _observed(source, p.original_dtype, res.stats)
            if p.converted.dtype != p.original_dtype:
                source = _cast(source, p.original_dtype, p.converted.dtype)
            res.equal[p.name] = _same(conv.take(start, start + n_cmp), source)
            if p.keep_rest:
                rest = b"".join(bytes(v) for v in conv.take(start + n_cmp, start + p.converted.nbytes))
                rows = p.converted.shape[0] - p.original_shape[0]
                res.new_rows[p.name] = (
                    torch.frombuffer(bytearray(rest), dtype=p.converted.dtype).reshape(rows, *p.converted.shape[1:])
                    if rows
                    else torch.empty((0, *p.converted.shape[1:]), dtype=p.converted.dtype)
                )
            cpos += p.converted.nbytes
            if first is not None and last is not None:
                guards.append((p, bytes(first), bytes(last)))
        digests = conv.finish()
        orig.finish()
        res.bytes_converted, res.bytes_original = conv.bytes_read, orig.bytes_read
    finally:
        conv.cancel()
        orig.cancel()
    res.digests = {p.name: d for p, d in digests.items()}
    for p, seen_first, seen_last in guards:
        assert p.original is not None  # guards are kept for streamed pairs only
        t = original_tensor(p.key).detach().contiguous().reshape(-1).view(torch.uint8)
        if bytes(t[:GUARD].numpy()) != seen_first or bytes(t[max(0, t.numel() - GUARD) :].numpy()) != seen_last:
            res.problems.append(
                f"{p.key}: the bytes verify located at {p.original.path.name}:{p.original.offset} are not the "
                "tensor torch.load gives; this is a verifier bug (please report it)"
            )
            res.equal[p.name] = False


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _conv_order(shards: list[Path]):
    rank = {p: i for i, p in enumerate(shards)}
    return lambda p: (rank.get(p.converted.path, len(rank)), str(p.converted.path), p.converted.offset)


def _guarded(views: Iterable[memoryview], first: bytearray, last: bytearray) -> Iterator[memoryview]:
    for v in views:
        if len(first) < GUARD:
            first += v[: GUARD - len(first)]
        last[:] = (bytes(last) + bytes(v[-GUARD:]))[-GUARD:]
        yield v


def _observed(views: Iterable[memoryview], dtype: torch.dtype, stats: EmbeddingStats) -> Iterator[memoryview]:
    """Pass the views on, feeding their elements to ``stats`` (views hold whole elements: every range starts at a
    tensor's first byte and chunks are multiples of 8 bytes)."""
    for v in views:
        if len(v):
            stats.add(torch.frombuffer(v, dtype=dtype))
        yield v


def _cast(views: Iterable[memoryview], src: torch.dtype, dst: torch.dtype) -> Iterator[memoryview]:
    for v in views:
        if len(v):
            yield torch.frombuffer(v, dtype=src).to(dst).view(torch.uint8).numpy().data
