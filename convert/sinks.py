"""Where output bytes go: a file written around the page cache (``O_DIRECT``) where the file system allows it,
else through the page cache with :class:`DropBehind` pushing it to disk and out of the cache behind the writer;
and the page-cache controls both the reader and the writers use (``sync_file_range``, ``POSIX_FADV_DONTNEED``).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path


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
    """Writes that bypass the page cache (``O_DIRECT``): bytes gather in page-aligned staging buffers; a full one
    is queued for the disk on a thread (in order, one write at a time) while the next fills, so a hiccup of the
    producer (``DEPTH - 1`` buffers' worth) does not leave the disk idle. The last one is padded to a block and the
    file truncated to its true size. Measured here: the kernel's part of writing a 9 GB shard falls from ~0.6 s to
    ~0.1 s of CPU per GB, because no page is allocated, charged, written back and reclaimed."""

    BLOCK = 4096
    STAGE = 1 << 24
    DEPTH = 6

    def __init__(self, path: Path):
        self.fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o666
        )  # then the umask, like open()
        self.bufs = [mmap.mmap(-1, self.STAGE) for _ in range(max(2, self.DEPTH))]
        self.views = [memoryview(b) for b in self.bufs]
        self.pending: list[Future | None] = [None] * len(self.bufs)  # each buffer's write, while queued
        self.turn = 0
        self.fill = 0
        self.size = 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write")

    def write(self, buf: memoryview) -> None:
        view = memoryview(buf)
        self.size += len(view)
        while view:
            if self.fill == 0:
                self._wait(self.turn)  # this buffer's last write is on disk: it may be refilled
            n = min(len(view), self.STAGE - self.fill)
            self.views[self.turn][self.fill : self.fill + n] = view[:n]
            self.fill += n
            view = view[n:]
            if self.fill == self.STAGE:
                self._submit(self.STAGE)

    def _wait(self, i: int) -> None:
        job = self.pending[i]
        if job is not None:
            job.result()
            self.pending[i] = None

    def _submit(self, length: int) -> None:
        self.pending[self.turn] = self.pool.submit(self._write_all, self.views[self.turn][:length])
        self.turn = (self.turn + 1) % len(self.bufs)
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
        for job in self.pending:
            if job is not None:
                job.result()  # in order: the first write error surfaces
        os.ftruncate(self.fd, self.size)
        self._release()

    def abort(self) -> None:
        wait_futures([job for job in self.pending if job is not None])
        self._release()

    def _release(self) -> None:
        self.pool.shutdown(wait=True)
        os.close(self.fd)
        for v in self.views:
            v.release()
        for b in self.bufs:
            b.close()


def open_sink(path: Path, flusher: DropBehind | None, *, direct: bool = True) -> _DirectSink | _BufferedSink:
    """A direct (page-cache-free) writer where the file system takes ``O_DIRECT`` (and ``direct``), else a
    buffered one."""
    if direct and hasattr(os, "O_DIRECT"):
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
