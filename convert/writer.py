"""Output: one safetensors shard written as a stream, and the JSON files.

A shard is written tensor by tensor: the header first (from known names, dtypes and shapes, :mod:`convert.format`),
then each tensor's bytes, hashing as it goes. A verbatim tensor's bytes come straight from the input's read buffers
(:mod:`convert.stream`); they go to a sink (:mod:`convert.sinks`) in a folder that appears atomically
(:mod:`convert.atomic`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .errors import ConversionError
from .faults import Fault, no_fault
from .format import OutTensor, shard_header, shard_order, tensor_bytes
from .sinks import DropBehind, open_sink
from .stream import InputStream

_GUARD = 64  # bytes compared at each end of a verbatim tensor against what torch loads from the same input


def write_shard(
    path: Path,
    tensors: list[OutTensor],
    on_bytes: Callable[[int], None] | None = None,
    stream: InputStream | None = None,
    flusher: DropBehind | None = None,
    *,
    direct: bool = True,
    fault: Fault = no_fault,
) -> str:
    """Write one safetensors file; returns its sha256. Hashing runs on a second thread, overlapping the writes
    (hashlib and file writes release the GIL), in the order the bytes are written.

    A verbatim tensor whose input bytes are still ahead of ``stream`` is copied from the stream's buffers (its
    first and last bytes are checked against the tensor torch loads, so a wrong offset cannot pass silently);
    any other tensor is produced (``OutTensor.produce``) and written from memory. The file is written around the
    page cache (``O_DIRECT``) where the file system allows; elsewhere through it, with ``flusher`` told how far it
    is written, to push it to disk and out of the cache behind the writer. ``direct=False`` always takes the
    page-cache path; ``fault`` is called at each buffer handed to the sink (:mod:`convert.faults`)."""
    tensors = shard_order(tensors)
    h = hashlib.sha256()
    sink = open_sink(path, flusher, direct=direct)
    ok = False
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256-out") as hasher:
            pending: Future | None = None

            def emit(buf: memoryview) -> Future:
                fault("tensor_write")
                sink.write(buf)
                return hasher.submit(h.update, buf)

            head = shard_header(tensors)
            emit(memoryview(head)).result()
            for spec in tensors:
                if stream is not None and spec.verbatim and spec.source is not None and stream.can_take(spec.source[0]):
                    first, last = bytearray(), b""
                    for view in stream.take(*spec.source):
                        if len(first) < _GUARD:
                            first += view[: _GUARD - len(first)]
                        last = (last + bytes(view[-_GUARD:]))[-_GUARD:]
                        stream.used_by(emit(view))
                    want = tensor_bytes(spec.produce())
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
                    buf = tensor_bytes(value)
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


def json_text(obj: object, *, sort_keys: bool = True, ensure_ascii: bool = False) -> str:
    """Every JSON file the converter writes: indented by 2, keys sorted (unless an order is part of the format, as in
    tokenizer.json), one newline at the end."""
    return json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + "\n"


def write_json(path: Path, obj: object, *, sort_keys: bool = True, ensure_ascii: bool = False) -> None:
    """:func:`json_text` written as UTF-8, whatever the locale."""
    path.write_bytes(json_text(obj, sort_keys=sort_keys, ensure_ascii=ensure_ascii).encode("utf-8"))
