"""Which of a model's memory-mapped weights stay in the page cache from one forward to the next.

verify reads both models' weights from their files (memory-mapped, as stored), and runs every forward over all of
them. When a model's files are larger than the page cache can hold (13B in bf16 is 26.7 GB; this machine has 24 GB),
the kernel's least-recently-used eviction meets a cyclic scan: by the time a forward comes back to a weight, it has
been evicted, and every forward reads nearly every byte from disk again.

:class:`WeightStream` splits the model's blocks (:func:`verify.compute.blocks`) in their order of registration into
a resident head, as many bytes as ``budget`` allows, and a streamed tail. A streamed block's pages are handed back
to the kernel right after its forward (``madvise(MADV_PAGEOUT)``), so the tail never evicts the head: each forward
then reads only the tail from disk. Before a block runs, the pages of the blocks that ran after it last time are
requested ahead (``madvise(MADV_WILLNEED)``, issued from a thread), so reading overlaps computing.

Both calls are advice about clean file-backed pages: they change what the kernel keeps and when it reads, never a
value the model computes (an evicted page is read back from the file the next time it is touched). Only ranges
inside file mappings (``/proc/self/maps``) are advised; parameters in anonymous memory are left alone.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from bisect import bisect_right
from typing import Any

import torch

from .compute import blocks

MADV_WILLNEED = 3
MADV_PAGEOUT = 21  # Linux 5.4+
PAGE = mmap.PAGESIZE


def file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of regular files, sorted."""
    out = []
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) < 6:
                continue
            path = parts[5].strip()
            if not path.startswith("/") or path.startswith("/dev/") or path.endswith("(deleted)"):
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi))
    return sorted(out)


def _inside(mappings: list[tuple[int, int]], starts: list[int], lo: int, hi: int) -> bool:
    k = bisect_right(starts, lo) - 1
    return k >= 0 and mappings[k][0] <= lo and hi <= mappings[k][1]


def block_ranges(block: torch.nn.Module, mappings: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Page-aligned (address, length) of the block's parameters that lie in file mappings: whole pages only, so the
    advice never reaches a neighbour's bytes."""
    starts = [m[0] for m in mappings]
    out = []
    for p in block.parameters():
        if p.device.type != "cpu" or p.numel() == 0:
            continue
        lo = p.data_ptr()
        hi = lo + p.numel() * p.element_size()
        a, b = -(-lo // PAGE) * PAGE, hi // PAGE * PAGE
        if b > a and _inside(mappings, starts, lo, hi):
            out.append((a, b - a))
    return out


_libc: Any = None


def _madvise(ranges: list[tuple[int, int]], advice: int) -> int:
    """madvise each range; returns how many calls failed (advice is best effort: a kernel without MADV_PAGEOUT says
    EINVAL, and nothing else changes)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    failed = 0
    for addr, length in ranges:
        if _libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), ctypes.c_int(advice)) != 0:
            failed += 1
    return failed


def page_cache_budget(anonymous_needed: int, margin: int = 1 << 30) -> int:
    """Bytes of weights that may stay in the page cache: the kernel's MemAvailable less what the run will hold in
    anonymous memory and a margin; 0 when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return max(0, int(line.split()[1]) * 1024 - anonymous_needed - margin)
    except OSError:
        pass
    return 0


class WeightStream:
    """Context manager: while active, the models' blocks beyond ``budget`` bytes of file-backed weights (in order of
    registration) are streamed: paged out after each forward, read ahead before it. ``ahead``: how many of the
    blocks that followed a block last time are requested when it starts. ``release``: on exit, page out every
    weight (the run is done with the models).

    Counters (for the report): ``resident_bytes``, ``streamed_bytes``, ``pageouts``, ``readaheads``, ``failed``."""

    def __init__(
        self,
        *models: torch.nn.Module,
        budget: int,
        ahead: int = 2,
        release: bool = False,
        enabled: bool | None = None,
    ):
        self.models = models
        self.budget = budget
        self.ahead = ahead
        self.release = release
        self.released_bytes = 0
        self.enabled = (os.name == "posix" and os.path.exists("/proc/self/maps")) if enabled is None else enabled
        self.resident_bytes = self.streamed_bytes = 0
        self.pageouts = self.readaheads = self.failed = 0
        self._ranges: dict[int, list[tuple[int, int]]] = {}
        self._streamed: set[int] = set()
        self._next: dict[int, int] = {}
        self._last: int | None = None
        self._requested: set[int] = set()
        self._handles: list[Any] = []
        self._reader: Any = None  # one thread issues the read-ahead, so the model never waits on a full disk queue

    def __enter__(self) -> "WeightStream":
        if not self.enabled:
            return self
        from concurrent.futures import ThreadPoolExecutor

        self._reader = ThreadPoolExecutor(1, thread_name_prefix="verify-readahead")
        mappings = file_mappings()
        held = 0
        for model in self.models:
            for b in blocks(model):
                ranges = block_ranges(b, mappings)
                size = sum(n for _, n in ranges)
                if not size:
                    continue
                self._ranges[id(b)] = ranges
                if held + size <= self.budget:
                    held += size
                    self.resident_bytes += size
                else:
                    self._streamed.add(id(b))
                    self.streamed_bytes += size
                self._handles.append(b.register_forward_pre_hook(self._before))
                self._handles.append(b.register_forward_hook(self._after, always_call=True))
        return self

    def _before(self, block: torch.nn.Module, _args: Any) -> None:
        key = id(block)
        if self._last is not None and self._last != key:
            self._next[self._last] = key
        self._last = key
        nxt = self._next.get(key)
        for _ in range(self.ahead):
            if nxt is None:
                break
            if nxt in self._streamed and nxt not in self._requested:
                self._requested.add(nxt)
                self._reader.submit(self._read_ahead, self._ranges[nxt])
                self.readaheads += 1
            nxt = self._next.get(nxt)

    def _read_ahead(self, ranges: list[tuple[int, int]]) -> None:
        self.failed += _madvise(ranges, MADV_WILLNEED)

    def _after(self, block: torch.nn.Module, _args: Any, _out: Any) -> None:
        key = id(block)
        self._requested.discard(key)
        if key in self._streamed:
            self.failed += _madvise(self._ranges[key], MADV_PAGEOUT)
            self.pageouts += 1

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._reader = None
        if self.release:
            # done with these weights: their pages must not crowd the next model's out of the page cache (mapped
            # pages are the last the kernel evicts, and the model object may live on)
            for ranges in self._ranges.values():
                self.failed += _madvise(ranges, MADV_PAGEOUT)
            self.released_bytes = self.resident_bytes + self.streamed_bytes

    def summary(self) -> dict[str, int]:
        return {
            "budget": self.budget,
            "resident_bytes": self.resident_bytes,
            "streamed_bytes": self.streamed_bytes,
            "pageouts": self.pageouts,
            "readaheads": self.readaheads,
            "released_bytes": self.released_bytes,
            "failed_advice": self.failed,
        }
