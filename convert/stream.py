"""Input: the weight files read once from disk, in order, on a thread, into a small fixed pool of buffers.

Each input byte is read from disk once, into memory once, and is never mapped: :class:`InputStream` reads the
weight files sequentially on a thread into a small fixed pool of buffers, hashing them for the manifest; the writer
takes each verbatim tensor's bytes from those same buffers (output order within a dtype = input order, so the
stream only moves forward). Pages are dropped from the page cache right after they are read: on this class of
machine reclaiming a full page cache cost more CPU than the copy itself. ``verify`` reads both sides of its data
pass through the same class (:meth:`InputStream.ranges`).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path

from .errors import ConversionError
from .sinks import drop_cached


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
    sha256 and the dropping of read pages off. :meth:`keep` names ranges whose pages stay cached (the converter's
    resize reads the two matrices again later, through torch)."""

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
        self._keep: list[tuple[int, int]] = []  # stream positions whose pages are not dropped

    @classmethod
    def ranges(cls, spans: list[tuple[Path, int, int]], *, drop: bool = True) -> "InputStream":
        """A stream of the byte ranges ``(file, offset, length)``, in this order (positions = their
        concatenation); nothing is hashed."""
        return cls(sorted({p for p, _, _ in spans}), hashing=False, drop=drop, _spans=spans)

    def position(self, path: Path, offset: int) -> int:
        return self.starts[path] + offset

    def keep(self, ranges: list[tuple[int, int]]) -> "InputStream":
        """Leave the pages of these stream ranges in the page cache when they are read (call before start)."""
        self._keep = sorted(ranges)
        return self

    def _drop(self, fd: int, file_offset: int, n: int, pos: int) -> None:
        """Drop the pages of the n bytes just read at ``file_offset`` (stream position ``pos``), but the kept ones."""
        start, end = pos, pos + n
        for a, b in self._keep:
            if b <= start or a >= end:
                continue
            if a > start:
                drop_cached(fd, file_offset + (start - pos), a - start)
            start = max(start, b)
        if start < end:
            drop_cached(fd, file_offset + (start - pos), end - start)

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
                    self._drop(fd, first + offset, n, base + offset)  # the bytes are in our buffer now
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
