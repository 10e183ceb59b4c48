"""Output: streamed safetensors shards, a sorted index, JSON files, and an output folder that appears atomically.

A shard is written tensor by tensor: the header first (from known names, dtypes and shapes), then each tensor's
bytes, hashing as it goes. The files hold exactly the tensors ``safetensors.torch.save_file`` writes for the same
dict (same names, dtypes, shapes, bytes and metadata). Inside a shard the tensors are grouped by dtype in
safetensors' order (so every tensor stays aligned to its element size, as save_file guarantees) and, within a
dtype, lie in input order; save_file orders by name instead, so the two files differ only in where each tensor
lies, which the format leaves free.

Each input byte is read from disk once, into memory once, and is never mapped: :class:`InputStream` reads the
weight files sequentially on a thread into a small fixed pool of buffers, hashing them for the manifest; the writer
takes each verbatim tensor's bytes from those same buffers (output order within a dtype = input order, so the
stream only moves forward), writes them and hashes them for the output. Pages are dropped from the page cache
behind both (input right after it is read, output once it is on disk): on this class of machine reclaiming a full
page cache cost more CPU than the copy itself.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import json
import mmap
import os
import re
import shutil
import signal
import struct
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConversionError
from .preflight import TMP_PREFIX, check_output, current_umask, parse_size  # noqa: F401 (re-exported)
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


def _header(tensors: list[OutTensor]) -> bytes:
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


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return t.reshape(-1).view(torch.uint8).numpy().data  # reshape first: a 0-dim tensor cannot be viewed


def shard_order(tensors: list[OutTensor]) -> list[OutTensor]:
    """Where each tensor lies in its shard: by dtype as safetensors does (widest first), then in plan order."""
    return sorted(tensors, key=lambda t: -_SAFETENSORS_ORDER.index(_DTYPE_NAMES[t.dtype]))


_GUARD = 64  # bytes compared at each end of a verbatim tensor against what torch loads from the same input


def write_shard(
    path: Path,
    tensors: list[OutTensor],
    on_bytes: Callable[[int], None] | None = None,
    stream: "InputStream | None" = None,
    flusher: "DropBehind | None" = None,
) -> str:
    """Write one safetensors file; returns its sha256. Hashing runs on a second thread, overlapping the writes
    (hashlib and file writes release the GIL), in the order the bytes are written.

    A verbatim tensor whose input bytes are still ahead of ``stream`` is copied from the stream's buffers (its
    first and last bytes are checked against the tensor torch loads, so a wrong offset cannot pass silently);
    any other tensor is produced (``OutTensor.produce``) and written from memory. The file is written around the
    page cache (``O_DIRECT``) where the file system allows; elsewhere through it, with ``flusher`` told how far it
    is written, to push it to disk and out of the cache behind the writer."""
    tensors = shard_order(tensors)
    h = hashlib.sha256()
    sink = open_sink(path, flusher)
    ok = False
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256-out") as hasher:
            pending: Future | None = None

            def emit(buf: memoryview) -> Future:
                fault("tensor_write")
                sink.write(buf)
                return hasher.submit(h.update, buf)

            head = _header(tensors)
            emit(memoryview(head)).result()
            for spec in tensors:
                if stream is not None and spec.verbatim and spec.source is not None and stream.can_take(spec.source[0]):
                    first, last = bytearray(), b""
                    for view in stream.take(*spec.source):
                        if len(first) < _GUARD:
                            first += view[: _GUARD - len(first)]
                        last = (last + bytes(view[-_GUARD:]))[-_GUARD:]
                        stream.used_by(emit(view))
                    want = _tensor_bytes(spec.produce())
                    if (
                        len(want) != spec.nbytes
                        or bytes(want[:_GUARD]) != bytes(first)
                        or bytes(want[-_GUARD:] if len(want) else b"") != last
                    ):
                        raise ConversionError(
                            f"{spec.name}: the input bytes at stream positions {spec.source[0]}..{spec.source[1]} are "
                            "not the "
                            "tensor torch loads from there; this is a converter bug (please report it), nothing was "
                            "written"
                        )
                else:
                    value = spec.produce()
                    if value.dtype != spec.dtype:
                        value = value.to(spec.dtype)
                    if tuple(value.shape) != spec.shape:
                        raise ConversionError(f"{spec.name}: produced shape {tuple(value.shape)}, planned {spec.shape}")
                    buf = _tensor_bytes(value)
                    if pending is not None:
                        pending.result()  # at most one produced tensor in flight: bounded memory, ordered hashing
                    pending = emit(buf)
                if on_bytes:
                    on_bytes(spec.nbytes)
            hasher.shutdown(wait=True)
        sink.close()
        ok = True
    finally:
        if not ok:
            sink.abort()
    return h.hexdigest()  # no fsync here: the caller flushes finished shards in the background (DropBehind.close)


class _BufferedSink:
    """Plain writes through the page cache; ``flusher`` pushes them to disk and out of the cache behind us."""

    def __init__(self, path: Path, flusher: "DropBehind | None"):
        self.path, self.flusher = path, flusher
        self.f = open(path, "wb", buffering=0)
        self.size = 0

    def write(self, buf: memoryview) -> None:
        view = memoryview(buf)
        while view:  # a raw file may write less than asked
            view = view[self.f.write(view) :]
        self.size += len(buf)
        if self.flusher is not None:
            self.flusher.advance(self.path, self.size)

    def close(self) -> None:
        self.f.close()

    def abort(self) -> None:
        self.f.close()


class _DirectSink:
    """Writes that bypass the page cache (``O_DIRECT``): bytes gather in one of two page-aligned staging buffers,
    a full one goes to the disk on a thread while the other fills, the last one is padded to a block and the file
    truncated to its true size. Measured here: the kernel's part of writing a 9 GB shard falls from ~0.6 s to
    ~0.1 s of CPU per GB, because no page is allocated, charged, written back and reclaimed."""

    BLOCK = 4096
    STAGE = 1 << 24

    def __init__(self, path: Path):
        self.fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o666
        )  # then the umask, like open()
        self.bufs = [mmap.mmap(-1, self.STAGE), mmap.mmap(-1, self.STAGE)]
        self.views = [memoryview(b) for b in self.bufs]
        self.turn = 0
        self.fill = 0
        self.size = 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write")
        self.pending: Future | None = None

    def write(self, buf: memoryview) -> None:
        view = memoryview(buf)
        self.size += len(view)
        while view:
            n = min(len(view), self.STAGE - self.fill)
            self.views[self.turn][self.fill : self.fill + n] = view[:n]
            self.fill += n
            view = view[n:]
            if self.fill == self.STAGE:
                self._submit(self.STAGE)

    def _submit(self, length: int) -> None:
        if self.pending is not None:
            self.pending.result()  # the other buffer is on disk: it may be refilled
        self.pending = self.pool.submit(self._write_all, self.views[self.turn][:length])
        self.turn ^= 1
        self.fill = 0

    def _write_all(self, view: memoryview) -> None:
        while view:
            n = os.write(self.fd, view)
            if n % self.BLOCK and n < len(view):
                raise OSError(errno.EIO, f"short unaligned direct write ({n} of {len(view)} bytes)", str(self.fd))
            view = view[n:]

    def close(self) -> None:
        tail = self.fill
        if tail:
            padded = -(-tail // self.BLOCK) * self.BLOCK
            self.views[self.turn][tail:padded] = bytes(padded - tail)
            self._submit(padded)
        if self.pending is not None:
            self.pending.result()
        os.ftruncate(self.fd, self.size)
        self._release()

    def abort(self) -> None:
        if self.pending is not None:
            wait_futures([self.pending])
        self._release()

    def _release(self) -> None:
        self.pool.shutdown(wait=True)
        os.close(self.fd)
        for v in self.views:
            v.release()
        for b in self.bufs:
            b.close()


DIRECT_IO = hasattr(os, "O_DIRECT")  # tests switch it off to cover the page-cache path


def open_sink(path: Path, flusher: "DropBehind | None"):
    """A direct (page-cache-free) writer where the file system takes ``O_DIRECT``, else a buffered one."""
    if DIRECT_IO:
        try:
            return _DirectSink(path)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
    return _BufferedSink(path, flusher)


_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4


def _libc_sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()


def _sync_range(fd: int, start: int, length: int, wait: bool) -> None:
    """Start writing [start, start + length) of a file to disk, and wait until it is there when ``wait`` (Linux
    ``sync_file_range``; where that is missing, ``fdatasync`` does the waiting)."""
    flags = _SFR_WRITE | (_SFR_WAIT_BEFORE | _SFR_WAIT_AFTER if wait else 0)
    if _SYNC_FILE_RANGE is not None and _SYNC_FILE_RANGE(fd, start, length, flags) == 0:
        return
    if wait:
        os.fdatasync(fd)


def drop_cached(fd: int, start: int = 0, length: int = 0) -> None:
    """Tell the kernel a file range will not be read again (clean pages leave the page cache at once)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)


class DropBehind:
    """Pushes output files to disk as they are written and drops them from the page cache behind the writer, on a
    thread of its own: every ``STEP`` bytes, writeback of the new range starts and the range before it is waited
    for and dropped. :meth:`close` makes a finished file durable (fsync) and drops the rest; a write error that
    surfaces only then (EIO, ENOSPC) comes out of the future it returns."""

    STEP = 1 << 28

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flush")
        self._marks: dict[Path, int] = {}  # how far each open file has been handed to the flusher
        self._fds: dict[Path, int] = {}

    def advance(self, path: Path, written: int) -> None:
        mark = self._marks.setdefault(path, 0)
        if written - mark >= self.STEP:
            self._marks[path] = written
            self._pool.submit(self._step, path, mark, written)

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def _step(self, path: Path, start: int, end: int) -> None:
        fd = self._fd(path)
        _sync_range(fd, start, end - start, wait=False)
        if start >= self.STEP:  # the previous range: on disk by now (or soon), so it can leave the cache
            _sync_range(fd, 0, start, wait=True)
            drop_cached(fd, 0, start)

    def _close(self, path: Path) -> None:
        fd = self._fd(path)
        try:
            os.fsync(fd)
            drop_cached(fd)
        finally:
            os.close(self._fds.pop(path))
            self._marks.pop(path, None)

    def close(self, path: Path) -> Future:
        return self._pool.submit(self._close, path)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class _Cancelled(Exception):
    pass


@dataclass
class _Chunk:
    start: int  # stream position of its first byte
    n: int
    buf: bytearray
    hashed: threading.Event | None = None  # set once the input hash has read this buffer (None: hashed before)
    used: Future | None = None  # the last output hash job submitted before the writer let go of it

    def settle(self, cancelled: Callable[[], bool]) -> None:
        while self.hashed is not None and not self.hashed.wait(0.1):
            if cancelled():
                raise _Cancelled
        if self.used is not None:
            wait_futures([self.used])


def _read_full(f, view: memoryview) -> int:
    """readinto until ``view`` is full or the file ends (both readers keep chunk boundaries at CHUNK multiples)."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


class InputStream:
    """The input weight files, read once from disk, in order, on a thread, into a fixed pool of buffers, and handed
    to the writer, which takes the bytes of each tensor it copies verbatim; hashed (sha256 per file) by a second
    thread that reads each file just ahead of them.

    Positions are offsets in the concatenation of the files. The stream only moves forward: :meth:`take` skips
    whatever lies before the asked start (pickle records, dropped keys, tensors written another way). A buffer goes
    back to the reader once the writer has moved past it and the output hash has read it, so at most
    ``BUFFERS * CHUNK`` bytes are held whatever the checkpoint's size.

    The hash runs on a thread of its own and reads the reader's buffers as they fill. While the reader is stuck
    (every buffer read and not yet taken: the converter is still starting) the hash goes on alone, reading the
    files into a buffer of its own, up to ``WARM_BYTES`` ahead of the reader, which later reads those chunks from
    the page cache without hashing them again. With the input already cached (right after a download) much of
    the hash is so done before the first shard is written. A third thread asks the disk for the input ahead of
    the reader (``POSIX_FADV_WILLNEED``), within the same budget. An error on any of them reaches the writer.

    :meth:`ranges` streams chosen byte ranges of files instead of whole files, in a given order (``verify`` reads
    an original's tensors in the order the converted repo holds them); ``hashing`` and ``drop`` turn the per-file
    sha256 and the dropping of read pages off."""

    CHUNK = 1 << 22
    BUFFERS = 16
    WARM_BYTES = 6 << 30  # page cache, not our memory; capped at a third of what the machine has available
    WARM_STEP = 1 << 28

    def __init__(
        self,
        files: list[Path],
        *,
        hashing: bool = True,
        drop: bool = True,
        _spans: list[tuple[Path, int, int]] | None = None,
    ):
        self.files = list(files)
        self.starts: dict[Path, int] = {}
        self.sizes: dict[Path, int] = {}
        self.hashing, self.drop = hashing, drop
        total = 0
        if _spans is None:  # whole files
            spans = []
            for f in self.files:
                self.starts[f] = total
                self.sizes[f] = f.stat().st_size
                spans.append((f, 0, self.sizes[f]))
                total += self.sizes[f]
        else:
            spans = list(_spans)
        self._spans: list[tuple[Path, int, int, int]] = []  # (file, offset, length, stream position)
        pos = 0
        for path, offset, length in spans:
            self._spans.append((path, offset, length, pos))
            pos += length
        self.total = pos
        self.bytes_read = 0
        self._digests: dict[Path, str] = {}
        self._ready: deque[_Chunk] = deque()  # read, not yet passed by the writer
        self._retired: deque[_Chunk] = deque()  # passed by the writer; reusable once settled
        self._allocated = 0
        self._consumed = 0  # stream position the writer has taken or skipped up to
        self._last_use: Future | None = None
        self._done = False
        self._cancelled = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._hasher = threading.Thread(target=self._hash_files, name="sha256-in", daemon=True)
        self._hash_pos = 0  # stream position the hash has covered (contiguously, from the start)
        self._handoff: deque[_Chunk] = deque()  # read by the reader, to be hashed from its buffer, in order
        self._reader_stuck = False  # the reader waits for a free buffer: the hash may read ahead alone
        self._ahead: int | None = None  # stream position of the chunk the hash is reading ahead alone
        # page cache read ahead of the reader, at most (never less than two chunks: the reader waits for the hash)
        self._budget = max(min(self.WARM_BYTES, _available_memory() // 3), 2 * self.CHUNK)
        self._thread = threading.Thread(target=self._run, name="input-reader", daemon=True)
        self._warmer = threading.Thread(target=self._warm, name="input-warm", daemon=True)
        self._read_pos = 0  # stream position the reader has read up to

    @classmethod
    def ranges(cls, spans: list[tuple[Path, int, int]], *, drop: bool = True) -> "InputStream":
        """A stream of the byte ranges ``(file, offset, length)``, in this order (positions = their
        concatenation); nothing is hashed."""
        return cls(sorted({p for p, _, _ in spans}), hashing=False, drop=drop, _spans=spans)

    def position(self, path: Path, offset: int) -> int:
        return self.starts[path] + offset

    def start(self) -> "InputStream":
        if self.hashing:
            self._hasher.start()
        self._thread.start()
        if hasattr(os, "posix_fadvise") and self.WARM_BYTES > 0:
            self._warmer.start()
        return self

    # -- writer side --------------------------------------------------------------------------------------------
    def can_take(self, start: int) -> bool:
        return start >= self._consumed

    def take(self, start: int, end: int) -> Iterator[memoryview]:
        """The bytes at stream positions [start, end) as views of the read buffers, in order, skipping everything
        before ``start``. A view is valid until the generator resumes; whatever read it must be submitted by then
        (and named with :meth:`used_by` if it runs on another thread)."""
        if start < self._consumed:
            raise ValueError(f"stream position {start} was already passed (at {self._consumed})")
        pos = start
        while pos < end:
            chunk = self._head()
            if chunk is None:
                raise ConversionError(f"stream position {end}: past the end of the input ({self.total} bytes)")
            chunk_end = chunk.start + chunk.n
            if chunk_end <= pos:
                self._retire_head()
                continue
            a, b = pos - chunk.start, min(end, chunk_end) - chunk.start
            yield memoryview(chunk.buf)[a:b]
            pos = chunk.start + b
            self._consumed = pos
            if pos >= chunk_end:
                self._retire_head()
        self._consumed = max(self._consumed, end)

    def used_by(self, job: Future) -> None:
        """The latest job reading a view from :meth:`take`: the view's buffer is not reused before it is done."""
        self._last_use = job

    def finish(self) -> dict[Path, str]:
        """Read (and hash) whatever is left; the sha256 of every file (none when not hashing)."""
        for _ in self.take(self._consumed, self.total):
            pass
        self._thread.join()
        if self.hashing:
            self._hasher.join()
        if self._error is not None:
            raise self._error
        return {path: self._digests[path] for path in self.files} if self.hashing else {}

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def _head(self) -> _Chunk | None:
        with self._cond:
            while not self._ready and not self._done and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            return self._ready[0] if self._ready else None

    def _retire_head(self) -> None:
        with self._cond:
            chunk = self._ready.popleft()
            chunk.used = self._last_use
            self._retired.append(chunk)
            self._cond.notify_all()

    # -- reader side --------------------------------------------------------------------------------------------
    def _buffer(self) -> bytearray:
        with self._cond:
            while True:
                if self._cancelled:
                    raise _Cancelled
                if self._retired:
                    chunk = self._retired.popleft()
                    break
                if self._allocated < self.BUFFERS:
                    self._allocated += 1
                    return bytearray(self.CHUNK)
                self._reader_stuck = True
                self._cond.notify_all()
                self._cond.wait()
                self._reader_stuck = False
        chunk.settle(lambda: self._cancelled)  # both hashes are done with it
        return chunk.buf

    def _run(self) -> None:
        path = None
        try:
            for path, offset, length, pos in self._spans:
                self._read_span(path, offset, length, pos)
        except _Cancelled:
            return
        except BaseException as e:  # handed to the writer
            self._fail(e, path)
            return
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def _fail(self, e: BaseException, path) -> None:
        if isinstance(e, OSError):  # an input problem, not an output one: say which file
            e = ConversionError(
                f"{e.filename or path}: reading failed ({e.strerror or e}); check that the input file is intact and "
                "readable"
            )
        with self._cond:
            if self._error is None:
                self._error = e
            self._cond.notify_all()

    def _hash_files(self) -> None:
        """sha256 of every file, chunk by chunk in the reader's chunking: from the reader's buffer when it has read
        the chunk, else (the reader stuck, within the budget) read here into a buffer of its own."""
        path = None
        own = bytearray(self.CHUNK)
        try:
            for path, _, size, base in self._spans:
                h = hashlib.sha256()
                with open(path, "rb", buffering=0) as f:
                    if os.fstat(f.fileno()).st_size != size:
                        raise ConversionError(
                            f"{path}: changed size since it was opened ({size} bytes then); is another program writing "
                            "it?"
                        )
                    offset = 0
                    while offset < size:
                        pos = base + offset
                        chunk: _Chunk | None
                        with self._cond:
                            while True:
                                if self._cancelled or self._error is not None:
                                    return
                                if self._handoff and self._handoff[0].start == pos:
                                    chunk = self._handoff.popleft()
                                    break
                                if self._reader_stuck and not self._handoff and pos - self._read_pos < self._budget:
                                    chunk = None
                                    self._ahead = pos
                                    break
                                self._cond.wait()
                        if chunk is not None:
                            n = chunk.n
                            h.update(memoryview(chunk.buf)[:n])
                            assert chunk.hashed is not None  # the reader hands off only chunks still to be hashed
                            chunk.hashed.set()
                        else:
                            f.seek(offset)
                            n = _read_full(f, memoryview(own)[: min(self.CHUNK, size - offset)])
                            if not n:
                                raise ConversionError(
                                    f"{path}: shrank while being read ({offset} of {size} bytes); is another program "
                                    "writing it?"
                                )
                            h.update(memoryview(own)[:n])
                        offset += n
                        with self._cond:
                            self._hash_pos = base + offset
                            self._ahead = None
                            self._cond.notify_all()
                self._digests[path] = h.hexdigest()
        except BaseException as e:  # handed to the writer
            self._fail(e, path)

    def _warm(self) -> None:
        """Ask the disk for the input ahead of the reader, ``WARM_STEP`` at a time, never more than the budget ahead
        of it (best effort: any error here only loses the read-ahead)."""
        budget = self._budget
        try:
            for path, first, size, base in self._spans:
                fd = os.open(path, os.O_RDONLY)
                try:
                    offset = 0
                    while offset < size and not self._cancelled:
                        offset = max(offset, self._read_pos - base)  # never warm what the reader has passed
                        if base + offset >= self._read_pos + budget:
                            return
                        n = min(self.WARM_STEP, size - offset)
                        if n > 0:
                            os.posix_fadvise(fd, first + offset, n, os.POSIX_FADV_WILLNEED)
                        offset += max(n, 0)
                finally:
                    os.close(fd)
        except OSError:
            return

    def _read_span(self, path: Path, first: int, size: int, base: int) -> None:
        whole = path in self.sizes
        with open(path, "rb", buffering=0) as f:
            fd = f.fileno()
            have = os.fstat(fd).st_size
            if whole and have != size:
                raise ConversionError(
                    f"{path}: changed size since it was opened ({size} bytes then); is another program writing it?"
                )
            if not whole and have < first + size:
                raise ConversionError(
                    f"{path}: {have} bytes, but bytes up to {first + size} were to be read; is the file truncated?"
                )
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, first, size, os.POSIX_FADV_SEQUENTIAL)
            if first:
                f.seek(first)
            offset = 0
            while offset < size:
                buf = self._buffer()
                want = min(self.CHUNK, size - offset)
                hashed_before = True
                if self.hashing:
                    with self._cond:
                        while self._ahead == base + offset and self._error is None and not self._cancelled:
                            self._cond.wait()  # the hash is reading this very chunk alone: then it is hashed
                        if self._error is not None or self._cancelled:
                            raise _Cancelled
                        hashed_before = self._hash_pos >= base + offset + want
                n = _read_full(f, memoryview(buf)[:want])
                if n < want:
                    raise ConversionError(
                        f"{path}: shrank while being read ({first + offset + n} of {first + size} bytes); is another "
                        "program writing it?"
                    )
                if self.drop:
                    drop_cached(fd, first + offset, n)  # the bytes are in our buffer now
                chunk = _Chunk(base + offset, n, buf, None if hashed_before else threading.Event())
                offset += n
                self.bytes_read += n
                with self._cond:
                    self._read_pos = base + offset
                    self._ready.append(chunk)
                    if not hashed_before:
                        self._handoff.append(chunk)
                    self._cond.notify_all()


def _available_memory() -> int:
    """MemAvailable in bytes (Linux); elsewhere a modest guess."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def index_json(shards: list[list[OutTensor]], names: list[str]) -> dict:
    weight_map = {t.name: name for shard, name in zip(shards, names, strict=True) for t in shard}
    total = sum(t.nbytes for shard in shards for t in shard)
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


FAULT_ENV = "VIPLLAVA_FAULT"  # test hook: "<point>" SIGKILLs the process there, "<point>:enospc" raises ENOSPC


def fault(point: str) -> None:
    """A named point where the kill and out-of-space tests inject faults (a no-op unless FAULT_ENV names it)."""
    want = os.environ.get(FAULT_ENV)
    if not want or want.split(":")[0] != point:
        return
    if want.endswith(":enospc"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), point)
    os.kill(os.getpid(), signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tmp_stem(output: Path) -> str:
    """The temporary folders' common prefix for ``output``: its name when short, else a digest of it, so that a
    temporary name (prefix, pid, random part, "-old") fits whenever the output's own name fits."""
    name = output.name
    if len(os.fsencode(name)) > 100:
        name = "h" + hashlib.sha256(os.fsencode(name)).hexdigest()[:24]
    return f"{TMP_PREFIX}{name}-"


def remove_stale_temporaries(output: Path) -> list[Path]:
    """Delete temporary folders that earlier, killed runs left beside ``output`` (their process is gone)."""
    removed = []
    stem = _tmp_stem(output)
    for p in sorted(output.parent.glob(f"{glob.escape(stem)}*")):
        m = re.fullmatch(re.escape(stem) + r"(\d+)-.*", p.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        if p.name.endswith("-old") and not output.exists():
            os.rename(p, output)  # killed between the two renames of the fallback: put the old output back
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def atomic_directory(output: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it takes ``output``'s place in one atomic step.

    New output: one rename. Replacing (``force``): the new folder and the old output are swapped atomically
    (``renameat2(RENAME_EXCHANGE)``), then the old one, now at the temporary name, is deleted. A run killed at any
    moment leaves either no output or the previous complete output at ``output``; its temporary folder carries
    its pid and is deleted by the next run. On an error the temporary folder is removed and ``output`` untouched.
    """
    check_output(output, force)
    remove_stale_temporaries(output)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_stem(output)}{os.getpid()}-", dir=output.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700; the output folder follows the umask
        yield tmp
        fault("before_fsync")
        for p in tmp.iterdir():
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        fault("before_rename")
        if output.exists():
            if any(output.iterdir()) and not force:  # appeared while we were writing
                raise ConversionError(f"{output}: appeared while converting; pass --force to replace it")
            if not _exchange(tmp, output):  # no atomic swap here: move the old one aside, then the new one in
                aside = output.parent / f"{tmp.name}-old"
                os.rename(output, aside)
                try:
                    os.rename(tmp, output)
                except BaseException:
                    os.rename(aside, output)
                    raise
                tmp = aside
            fault("after_exchange")
            _fsync_dir(output.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # the old output
        else:
            os.rename(tmp, output)
            _fsync_dir(output.parent)
    except BaseException:
        if tmp.exists() and tmp != output:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
