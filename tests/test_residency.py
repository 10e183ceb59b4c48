"""verify.residency: which memory-mapped weights stay in the page cache between forwards. The tail beyond the budget
must leave the page cache after each of its blocks runs (measured with mincore), the head must stay, and nothing a
model computes may change."""

from __future__ import annotations

import ctypes
import os
import sys

import pytest
import torch

import verify.residency as residency
from fixtures.build import sample_images
from verify.context import Context
from verify.residency import PAGE, WeightStream, block_ranges, file_mappings

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux page-cache advice")

LAYERS, SIDE = 4, 1448  # four 8 MiB float32 weights (large folios of the page cache lie inside)


def _resident_pages(t: torch.Tensor) -> int:
    """How many whole pages of ``t``'s bytes are in memory (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    lo = t.data_ptr()
    hi = lo + t.numel() * t.element_size()
    a, b = -(-lo // PAGE) * PAGE, hi // PAGE * PAGE
    n = (b - a) // PAGE
    vec = ctypes.create_string_buffer(n)
    assert libc.mincore(ctypes.c_void_p(a), ctypes.c_size_t(b - a), vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec.raw)


def _mapped_model(tmp_path) -> torch.nn.Sequential:
    """Linear layers whose weights are views of one memory-mapped file (as verify's models read theirs)."""
    path = tmp_path / "weights.bin"
    torch.randn(LAYERS * SIDE * SIDE, generator=torch.Generator().manual_seed(0)).numpy().tofile(path)
    with open(path, "rb+") as f:  # clean pages, as a downloaded checkpoint's are: the kernel may drop them
        os.fsync(f.fileno())
    flat = torch.from_file(str(path), shared=False, size=LAYERS * SIDE * SIDE, dtype=torch.float32)
    layers = []
    for i in range(LAYERS):
        lin = torch.nn.Linear(SIDE, SIDE, bias=False)
        lin.weight = torch.nn.Parameter(flat[i * SIDE * SIDE : (i + 1) * SIDE * SIDE].view(SIDE, SIDE), False)
        layers.append(lin)
    return torch.nn.Sequential(*layers)


def test_the_tail_leaves_the_page_cache_after_each_forward_and_the_head_stays(tmp_path):
    model = _mapped_model(tmp_path)
    x = torch.randn(3, SIDE)
    want = model(x)
    weights = [lin.weight for lin in model]
    full = SIDE * SIDE * 4 // PAGE
    assert all(_resident_pages(w) >= full - 2 for w in weights)  # read once: all in memory
    with WeightStream(model, budget=2 * SIDE * SIDE * 4) as ws:
        got = model(x)
    assert torch.equal(got, want)
    assert ws.resident_bytes > 0 and ws.streamed_bytes > 0 and ws.pageouts == 2 and ws.failed == 0
    # the head stays whole; of the tail at most the large folios of the page cache that straddle a neighbour stay
    assert [_resident_pages(w) >= full - 2 for w in weights] == [True, True, False, False]
    assert all(_resident_pages(w) < full // 3 for w in weights[2:])
    # the hooks are gone: another forward reads the tail back and leaves it
    model(x)
    assert all(_resident_pages(w) >= full - 2 for w in weights)


def test_without_the_advice_the_tail_stays_and_the_measurement_says_so(tmp_path, monkeypatch):
    """The measurement above can fail: with the page-out advice replaced by MADV_NORMAL, the tail stays resident."""
    monkeypatch.setattr(residency, "MADV_PAGEOUT", 0)
    model = _mapped_model(tmp_path)
    x = torch.randn(3, SIDE)
    model(x)
    with WeightStream(model, budget=2 * SIDE * SIDE * 4):
        model(x)
    assert _resident_pages(model[3].weight) >= SIDE * SIDE * 4 // PAGE - 1


def test_read_ahead_follows_the_order_blocks_ran_in(tmp_path):
    model = _mapped_model(tmp_path)
    x = torch.randn(3, SIDE)
    with WeightStream(model, budget=0, ahead=2) as ws:
        model(x)  # learns the order
        assert ws.readaheads == 0
        model(x)
    # second pass: each block asks for the two that followed it (the last ones for the first: the next pass), each
    # block once until it has run
    assert ws._next == {id(model[i]): id(model[(i + 1) % LAYERS]) for i in range(LAYERS)}
    assert ws.readaheads == LAYERS + 1 and ws.pageouts == 2 * LAYERS and ws.failed == 0


def test_anonymous_parameters_are_never_advised():
    model = torch.nn.Linear(SIDE, SIDE)
    assert block_ranges(model, file_mappings()) == []
    with WeightStream(model, budget=0) as ws:
        model(torch.randn(1, SIDE))
    assert ws.streamed_bytes == 0 and ws.pageouts == 0


def test_streaming_everything_changes_no_logit_and_no_token(converted, monkeypatch):
    def run() -> Context:
        ctx = Context(converted, images=sample_images(), max_new_tokens=4)
        ctx.reference_runs, ctx.converted_runs  # noqa: B018 (run both sides)
        return ctx

    kept = run()
    monkeypatch.setattr(residency, "page_cache_budget", lambda *a, **k: 0)
    streamed = run()
    for side in ("reference", "converted"):
        assert streamed.page_cache[side]["resident_bytes"] == 0
        assert streamed.page_cache[side]["streamed_bytes"] > 0 and streamed.page_cache[side]["pageouts"] > 0
        assert kept.page_cache[side]["resident_bytes"] > 0
    for a, b in zip(kept.reference_runs, streamed.reference_runs, strict=True):
        assert a[1] == b[1] and torch.equal(a[0].logits, b[0].logits)
    for a, b in zip(kept.converted_runs, streamed.converted_runs, strict=True):
        assert a[1] == b[1] and torch.equal(a[0], b[0])


def test_release_hands_every_weight_back_when_the_run_is_done(tmp_path):
    """verify is done with a model after its side ran: its pages (mapped, so the last the kernel would evict) must
    not crowd the other model out of the page cache."""
    model = _mapped_model(tmp_path)
    x = torch.randn(3, SIDE)
    full = SIDE * SIDE * 4 // PAGE
    with WeightStream(model, budget=10 * SIDE * SIDE * 4, release=True) as ws:
        model(x)
        assert all(_resident_pages(lin.weight) >= full - 2 for lin in model)  # all of it fits: nothing streamed
    assert ws.streamed_bytes == 0 and ws.released_bytes == ws.resident_bytes > 0
    assert all(_resident_pages(lin.weight) < full // 3 for lin in model)
