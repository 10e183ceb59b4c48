"""Which of a model's memory-mapped weights stay in the page cache from one forward to the next.

verify reads both models' weights from their files (memory-mapped, as stored), and runs every forward over all of
them. When a model's files are larger than the page cache can hold (13B in bf16 is 26.7 GB; this machine has 24 GB),
the kernel's least-recently-used eviction meets a cyclic scan: by the time a forward comes back to a weight, it has
been evicted, and every forward reads nearly every byte from disk again.

:class:`WeightStream` splits the model's blocks (:func:`verify.compute.blocks`) in their order of registration into
a resident head, as many bytes as ``budget`` allows, and a streamed tail. A streamed block's pages are handed back
to the kernel right after its forward (``madvise(MADV_PAGEOUT)``), so the tail never evicts the head: each forward
then reads only the tail from disk. :meth:`WeightStream.set_budget` splits again (verify's greedy steps hold less
anonymous memory than its prompt forwards, and use no vision weights, so the head grows while they run).

Reading is left to the kernel: a page fault on a file mapping reads ahead in the device's readahead windows. Asking
for a block's pages ahead of its forward (``MADV_WILLNEED`` from a thread, as an earlier version did) made streaming
slower, measured on a 7B-shaped text model with 10.2 GB streamed per pass: 11.9 s against 6.1 s per greedy step
(9 rows), 31.7 s against 28.8 s per 256-row float32 forward (24.9 s with nothing streamed).

The page-out advice is about clean file-backed pages: it changes what the kernel keeps, never a value the model
computes (an evicted page is read back from the file the next time it is touched). Only ranges inside file
mappings (``/proc/self/maps``) are advised; parameters in anonymous memory are left alone.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from bisect import bisect_right
from typing import Any

import torch

from .compute import blocks

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
    registration) are streamed: paged out after each forward. ``release``: on exit, page out every weight (the run
    is done with the models).

    Counters (for the report): ``resident_bytes`` and ``streamed_bytes`` of the first split, ``pageouts``,
    ``failed``; ``splits``: every split (:meth:`set_budget`) with its budget and bytes."""

    def __init__(
        self,
        *models: torch.nn.Module,
        budget: int,
        release: bool = False,
        enabled: bool | None = None,
    ):
        self.models = models
        self.budget = budget
        self.release = release
        self.released_bytes = 0
        self.enabled = (os.name == "posix" and os.path.exists("/proc/self/maps")) if enabled is None else enabled
        self.resident_bytes = self.streamed_bytes = 0
        self.pageouts = self.failed = 0
        self.splits: list[dict[str, int]] = []
        self._order: list[int] = []  # block ids in order of registration
        self._ranges: dict[int, list[tuple[int, int]]] = {}
        self._sizes: dict[int, int] = {}
        self._streamed: set[int] = set()
        self._handles: list[Any] = []

    def __enter__(self) -> "WeightStream":
        if not self.enabled:
            return self
        mappings = file_mappings()
        for model in self.models:
            for b in blocks(model):
                ranges = block_ranges(b, mappings)
                size = sum(n for _, n in ranges)
                if not size:
                    continue
                self._order.append(id(b))
                self._ranges[id(b)] = ranges
                self._sizes[id(b)] = size
                self._handles.append(b.register_forward_hook(self._after, always_call=True))
        self._split(self.budget, set(), page_out=False)
        self.resident_bytes, self.streamed_bytes = self.splits[0]["resident_bytes"], self.splits[0]["streamed_bytes"]
        return self

    def _split(self, budget: int, skipped: set[int], page_out: bool) -> None:
        held = streamed = 0
        was = self._streamed
        self._streamed = set()
        for key in self._order:
            size = self._sizes[key]
            if key not in skipped and held + size <= budget:
                held += size
            else:
                self._streamed.add(key)
                streamed += size
        if page_out:  # blocks that left the head leave the page cache now, so the new head has the room
            left = self._streamed - was
            self.failed += _madvise([r for k in self._order if k in left for r in self._ranges[k]], MADV_PAGEOUT)
        self.splits.append({"budget": budget, "resident_bytes": held, "streamed_bytes": streamed})

    def set_budget(self, budget: int, skip: tuple[torch.nn.Module, ...] = ()) -> None:
        """Split the blocks again for ``budget`` bytes; the blocks of the modules in ``skip`` (weights the coming
        forwards do not use) are left out of the head and paged out now. A block that leaves the head is paged out
        now; one that joins it is read at its next use and then stays."""
        if not self.enabled or not self._order:
            return
        skipped = {id(b) for m in skip for b in blocks(m)}
        self._split(budget, skipped, page_out=True)

    def _after(self, block: torch.nn.Module, _args: Any, _out: Any) -> None:
        key = id(block)
        if key in self._streamed:
            self.failed += _madvise(self._ranges[key], MADV_PAGEOUT)
            self.pageouts += 1

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.release:
            # done with these weights: their pages must not crowd the next model's out of the page cache (mapped
            # pages are the last the kernel evicts, and the model object may live on)
            for ranges in self._ranges.values():
                self.failed += _madvise(ranges, MADV_PAGEOUT)
            self.released_bytes = self.resident_bytes + self.streamed_bytes

    def summary(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "resident_bytes": self.resident_bytes,
            "streamed_bytes": self.streamed_bytes,
            "pageouts": self.pageouts,
            "released_bytes": self.released_bytes,
            "failed_advice": self.failed,
            "splits": self.splits,
        }
