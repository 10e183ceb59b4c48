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
from verify.compute import blocks
from verify.context import Context, vision_modules
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


def test_a_new_split_pages_out_what_leaves_the_head_and_keeps_what_joins_it(tmp_path):
    model = _mapped_model(tmp_path)
    x = torch.randn(3, SIDE)
    want = model(x)
    weights = [lin.weight for lin in model]
    full = SIDE * SIDE * 4 // PAGE
    size = SIDE * SIDE * 4
    with WeightStream(model, budget=2 * size) as ws:
        model(x)
        assert [_resident_pages(w) >= full - 2 for w in weights] == [True, True, False, False]
        ws.set_budget(4 * size)  # the head grows: the tail is read at its next use and stays
        assert torch.equal(model(x), want)
        assert all(_resident_pages(w) >= full - 2 for w in weights)
        pageouts = ws.pageouts
        ws.set_budget(size)  # the head shrinks: what left it leaves the page cache at once
        assert [_resident_pages(w) >= full - 2 for w in weights] == [True, False, False, False]
        assert all(_resident_pages(w) < full // 3 for w in weights[1:])
        assert ws.pageouts == pageouts  # paged out by the split, not by a forward
    b = [ws._sizes[id(lin)] for lin in model]  # whole pages of each weight
    assert [(s["budget"], s["resident_bytes"], s["streamed_bytes"]) for s in ws.splits] == [
        (2 * size, b[0] + b[1], b[2] + b[3]),
        (4 * size, sum(b), 0),
        (size, b[0], sum(b[1:])),
    ]
    assert ws.summary()["resident_bytes"] == b[0] + b[1]  # the report's counters are the first split's


def test_skipped_modules_leave_the_head_to_the_blocks_that_follow(tmp_path):
    model = _mapped_model(tmp_path)
    x = torch.randn(3, SIDE)
    weights = [lin.weight for lin in model]
    full = SIDE * SIDE * 4 // PAGE
    size = SIDE * SIDE * 4
    model(x)
    with WeightStream(model, budget=2 * size) as ws:
        ws.set_budget(2 * size, skip=(model[0],))  # the first layer will not run: layers 1 and 2 are the head
        assert _resident_pages(weights[0]) < full // 3
        model[1:](x)
        assert [_resident_pages(w) >= full - 2 for w in weights] == [False, True, True, False]
        ws.set_budget(ws.budget)  # back: layers 0 and 1, and layer 2 leaves
        assert _resident_pages(weights[2]) < full // 3
    assert ws.splits[-1]["resident_bytes"] == ws._sizes[id(model[0])] + ws._sizes[id(model[1])]


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


def test_greedy_steps_split_again_without_the_vision_weights(converted, monkeypatch):
    """While a batch's greedy steps run, each side's stream splits for the memory the steps add (the batch's caches
    stacked and grown), with the vision tower and projector out of the head; then back for the next forwards."""
    asked: list[int] = []

    def budget(needed: int, **_kw) -> int:
        asked.append(needed)
        return 1 << 40  # everything fits: only what is skipped streams

    monkeypatch.setattr(residency, "page_cache_budget", budget)
    ctx = Context(converted, images=sample_images(), max_new_tokens=4)
    ctx.reference_runs, ctx.converted_runs  # noqa: B018 (run both sides)
    batches = ctx.decode_batches
    lengths = [[len(ctx.parity_inputs[i]["expanded"]) for _, m in b for i in m] for b in batches]
    growth = [ctx.decode_growth(x) for x in lengths]
    assert asked == [ctx.memory["total"], *growth, ctx.memory["total"], *growth]
    mappings = file_mappings()
    vision = {
        "reference": (ctx.reference.vision,),
        "converted": vision_modules(ctx.model),
    }
    for side, modules in vision.items():
        skipped = sum(n for m in modules for b in blocks(m) for _, n in block_ranges(b, mappings))
        assert skipped > 0
        splits = ctx.page_cache[side]["splits"]
        assert len(splits) == 1 + 2 * len(batches)
        forward = splits[0]
        assert forward["streamed_bytes"] == 0
        for decode, back in zip(splits[1::2], splits[2::2], strict=True):
            assert decode["streamed_bytes"] == skipped
            assert decode["resident_bytes"] == forward["resident_bytes"] - skipped
            assert back == forward
