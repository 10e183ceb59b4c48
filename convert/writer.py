"""Output: streamed safetensors shards, a sorted index, JSON files, and an output folder that appears atomically.

A shard is written tensor by tensor: the header first (from known names, dtypes and shapes), then each tensor's
bytes straight from its (possibly memory-mapped) source, hashing as it goes. The files hold exactly what
``safetensors.torch.save_file`` writes for the same dict (same names, dtypes, shapes, bytes and metadata); the
tensors are laid out in safetensors' order (dtype, then name).

Each input byte is read from disk once: :class:`InputReader` reads the weight files sequentially on a thread,
hashing them for the manifest, and tensors are assigned to output shards in input order, so each output shard
is drawn from one window of the input no larger than the shard. The reader runs at most that window ahead of
the writer, which copies each tensor once the reader has passed it (a page-cache hit), in whatever order the
safetensors layout needs inside the shard.
"""

from __future__ import annotations

import ctypes
import errno
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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConversionError
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
# safetensors lays tensors out by dtype (its Dtype enum order, descending), then by name; so do we, so that a
# shard is byte-identical to what safetensors.torch.save_file writes for the same dict.
_SAFETENSORS_ORDER = ("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5 * 10**9 (decimal units as transformers uses them; KiB/MiB/GiB are binary)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m or m.group(2) not in _UNITS:
        raise ConversionError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB")
    size = int(float(m.group(1)) * _UNITS[m.group(2)])
    if size <= 0:
        raise ConversionError(f"--max-shard-size {text!r}: must be positive")
    return size


@dataclass(frozen=True)
class OutTensor:
    """One tensor to write: its name, output dtype and shape, and how to get its values (called once).

    ``source`` is where its values lie in the input, as (start, end) positions in the concatenation of the
    input weight files (see :class:`InputReader`); None where unknown."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]
    source: tuple[int, int] | None = None
    late: bool = False  # computed while the others are written (the resized matrices): planned after them

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
        entries[t.name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)  # data starts 8-byte aligned, padded with spaces as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # reshape first: a 0-dim tensor cannot be viewed


def write_shard(
    path: Path,
    tensors: list[OutTensor],
    on_bytes: Callable[[int], None] | None = None,
    before: Callable[[OutTensor], None] | None = None,
) -> str:
    """Write one safetensors file; returns its sha256. The hash runs on a second thread, overlapping the writes
    (hashlib and file writes release the GIL), in the order the bytes are written. ``before(t)`` is called before
    each tensor's values are taken (the pipeline waits there for the input reader)."""
    tensors = sorted(tensors, key=lambda t: (-_SAFETENSORS_ORDER.index(_DTYPE_NAMES[t.dtype]), t.name))
    h = hashlib.sha256()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as hasher, open(path, "wb") as f:
        pending = None
        head = _header(tensors)
        f.write(head)
        h.update(head)
        for spec in tensors:
            if before is not None:
                before(spec)
            value = spec.produce()
            if value.dtype != spec.dtype:
                value = value.to(spec.dtype)
            if tuple(value.shape) != spec.shape:
                raise ConversionError(f"{spec.name}: produced shape {tuple(value.shape)}, planned {spec.shape}")
            buf = _tensor_bytes(value)
            fault("tensor_write")
            if pending is not None:
                pending.result()  # at most one buffer in flight: bounded memory, ordered hashing
            pending = hasher.submit(h.update, buf)
            f.write(buf)
            if on_bytes:
                on_bytes(spec.nbytes)
        if pending is not None:
            pending.result()
    return h.hexdigest()  # no fsync here: the caller flushes finished shards in the background (see fsync_file)


def fsync_file(path: Path) -> None:
    """Force a finished file to disk (run on a thread while the next shard is written, so the disk keeps
    reading and writing instead of stopping at every shard boundary)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class InputReader:
    """Reads the input weight files once, in order, on a thread: hashes them (sha256 per file) and leaves their
    pages in the page cache just before the writer copies from them.

    Positions are offsets in the concatenation of the files. The reader stops at the limit the writer grants
    (:meth:`allow`), so it never runs more than one output window ahead and the window stays cached; the writer
    waits (:meth:`wait_for`) until the reader has passed a tensor's bytes, so the disk sees one sequential read.
    An error on the thread is re-raised in the writer; :meth:`cancel` stops the thread at once."""

    CHUNK = 1 << 24

    def __init__(self, files: list[Path]):
        self.files = list(files)
        self.starts: dict[Path, int] = {}
        self.sizes: dict[Path, int] = {}
        total = 0
        for f in self.files:
            self.starts[f] = total
            self.sizes[f] = f.stat().st_size
            total += self.sizes[f]
        self.total = total
        self.digests: dict[Path, str] = {}
        self._pos = 0
        self._limit = 0
        self._done = False
        self._cancelled = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="inputs-sha256", daemon=True)

    def position(self, path: Path, offset: int) -> int:
        return self.starts[path] + offset

    def start(self, limit: int) -> "InputReader":
        self._limit = limit
        self._thread.start()
        return self

    def allow(self, limit: int) -> None:
        with self._cond:
            if limit > self._limit:
                self._limit = limit
                self._cond.notify_all()

    def wait_for(self, end: int) -> None:
        with self._cond:
            self._limit = max(self._limit, end)  # never wait for bytes the reader may not read
            self._cond.notify_all()
            while self._pos < end and not self._done and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise self._error

    def finish(self) -> dict[Path, str]:
        """Read whatever is left; the sha256 of every file."""
        self.allow(self.total)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return dict(self.digests)

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            for path in self.files:
                self.digests[path] = self._hash_file(path)
                if self._cancelled:
                    return
        except BaseException as e:  # handed to the writer
            with self._cond:
                self._error = e
                self._cond.notify_all()
            return
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def _hash_file(self, path: Path) -> str:
        """sha256 of one file. Reading and hashing overlap: chunk k+1 is read (into the page cache, where the
        writer copies from) while chunk k is hashed on a second thread, in order, from one of two buffers."""
        h = hashlib.sha256()
        size = self.sizes[path]
        bufs = (bytearray(self.CHUNK), bytearray(self.CHUNK))
        with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256-in") as pool:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            pending = None
            offset = 0
            turn = 0
            while offset < size:
                with self._cond:
                    while self._pos >= self._limit and not self._cancelled:
                        self._cond.wait()
                    if self._cancelled:
                        break
                buf = bufs[turn]
                if pending is not None and turn == pending[1]:
                    pending[0].result()  # the buffer about to be refilled is still being hashed
                n = f.readinto(memoryview(buf)[: min(self.CHUNK, size - offset)])
                if not n:
                    raise ConversionError(f"{path}: shrank while being read ({offset} of {size} bytes); is another program writing it?")
                if pending is not None:
                    pending[0].result()  # hashes stay in file order
                pending = (pool.submit(h.update, memoryview(buf)[:n]), turn)
                turn ^= 1
                offset += n
                with self._cond:
                    self._pos += n
                    self._cond.notify_all()
            if pending is not None:
                pending[0].result()
        return h.hexdigest()


def index_json(shards: list[list[OutTensor]], names: list[str]) -> dict:
    weight_map = {t.name: name for shard, name in zip(shards, names) for t in shard}
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


TMP_PREFIX = ".vipllava-tmp-"
FAULT_ENV = "VIPLLAVA_FAULT"  # test hook: "<point>" SIGKILLs the process there, "<point>:enospc" raises ENOSPC


def fault(point: str) -> None:
    """A named point where the kill and out-of-space tests inject faults (a no-op unless FAULT_ENV names it)."""
    want = os.environ.get(FAULT_ENV)
    if not want or want.split(":")[0] != point:
        return
    if want.endswith(":enospc"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), point)
    os.kill(os.getpid(), signal.SIGKILL)


def check_output(output: Path, force: bool) -> None:
    """Refuse an output that is a file or a non-empty folder (unless ``force``), or whose parent is unwritable."""
    if output.exists() and not output.is_dir():
        raise ConversionError(f"{output}: exists and is a file; pass a folder path for --output")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise ConversionError(f"{output}: exists and is not empty; pass --force to replace it")
    parent = output.parent
    if not parent.is_dir():
        raise ConversionError(f"{parent}: the parent folder of --output does not exist; create it first")
    try:  # a real probe: os.access says yes to root even on a read-only mount
        os.rmdir(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}probe-", dir=parent))
    except OSError as e:
        raise ConversionError(f"{parent}: not writable ({e.strerror}); choose another --output") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(output: Path) -> list[Path]:
    """Delete temporary folders that earlier, killed runs left beside ``output`` (their process is gone)."""
    removed = []
    for p in sorted(output.parent.glob(f"{TMP_PREFIX}{output.name}-*")):
        m = re.fullmatch(re.escape(f"{TMP_PREFIX}{output.name}-") + r"(\d+)-.*", p.name)
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
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{output.name}-{os.getpid()}-", dir=output.parent))
    try:
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
