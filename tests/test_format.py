"""Shard planning (convert/format.py): the shards a conversion writes before the tokenizer is read are the shards
``plan_shards`` gives once every size is known, whatever the late (resized) tensors turn out to be."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from convert import format as fmt
from convert.format import OutTensor, ShardPlan, plan_shards


def _tensor(name: str, n: int, source: tuple[int, int] | None, late: bool = False) -> OutTensor:
    return OutTensor(name, torch.uint8, (n,), lambda: torch.zeros(n, dtype=torch.uint8), source, late=late)


@st.composite
def _plans(draw):
    """Early tensors with input positions (some unknown at times), two late ones whose sizes change once known."""
    sizes = draw(st.lists(st.integers(0, 120), min_size=0, max_size=12))
    known = draw(st.booleans())
    early, pos = [], 0
    for i, n in enumerate(sizes):
        source = (pos, pos + n) if known or draw(st.booleans()) else None
        early.append(_tensor(f"t{draw(st.integers(0, 99)):02d}_{i}", n, source))
        pos += n + draw(st.integers(0, 8))
    late_sources = [(pos, pos + 1), (pos + 10, pos + 11)] if draw(st.booleans()) else [None, None]
    before = [draw(st.integers(0, 200)) for _ in range(2)]
    after = [draw(st.integers(0, 200)) for _ in range(2)]
    names = ["embed", "head"]
    provisional = [_tensor(nm, n, s, late=True) for nm, n, s in zip(names, before, late_sources, strict=True)]
    final = [_tensor(nm, n, s, late=True) for nm, n, s in zip(names, after, late_sources, strict=True)]
    return early, provisional, final, draw(st.integers(1, 300))


@given(_plans())
def test_early_shards_are_the_final_ones(case):
    early, provisional, final, max_bytes = case
    plan = ShardPlan(early + provisional, max_bytes, lambda: final)
    got = list(plan)
    assert got == plan.shards
    want = plan_shards(early + final, max_bytes)
    assert [[t.name for t in s] for s in got] == [[t.name for t in s] for s in want]
    assert plan.total == sum(t.nbytes for t in early + final)


def test_shards_before_the_last_early_one_come_before_the_late_tensors_are_known():
    early = [_tensor(f"t{i}", 40, (40 * i, 40 * (i + 1))) for i in range(5)]  # shards of 2, 2, 1 (+ late)
    known = threading.Event()
    plan = ShardPlan(early + [_tensor("embed", 1, (500, 501), late=True)], 100, lambda: _late_after(known))
    it = iter(plan)
    assert [t.name for t in next(it)] == ["t0", "t1"]
    assert [t.name for t in next(it)] == ["t2", "t3"]
    assert not known.is_set()  # two shards out, the late tensors not asked for yet
    assert [t.name for t in next(it)] == ["t4", "embed"]
    assert known.is_set()
    assert plan.total == 5 * 40 + 60


def _late_after(known: threading.Event) -> list[OutTensor]:
    known.set()
    return [_tensor("embed", 60, (500, 501), late=True)]


def test_a_look_ahead_packer_would_be_caught(monkeypatch):
    """The equivalence rests on the packer never looking ahead; one that fills shards from the end (so the first
    shards depend on what comes last) breaks it, and the comparison above sees it (planted)."""

    def from_the_end(order, max_bytes):
        shards, size = [[]], 0
        for t in reversed(order):
            if shards[-1] and size + t.nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].insert(0, t)
            size += t.nbytes
        return shards[::-1]

    monkeypatch.setattr(fmt, "pack_shards", from_the_end)
    early = [_tensor(f"t{i}", 40, (40 * i, 40 * (i + 1))) for i in range(5)]
    final = [_tensor("embed", 30, (500, 501), late=True)]
    plan = ShardPlan(early + [_tensor("embed", 1, (500, 501), late=True)], 100, lambda: final)
    got = [[t.name for t in s] for s in plan]
    want = [[t.name for t in s] for s in fmt.plan_shards(early + final, 100)]
    assert want == [["t0", "t1"], ["t2", "t3"], ["t4", "embed"]]
    assert got != want


def test_late_tensors_that_reorder_the_early_ones_are_refused():
    early = [_tensor("b", 10, (0, 10)), _tensor("a", 10, (10, 20))]
    plan = ShardPlan(early + [_tensor("embed", 1, (30, 31), late=True)], 100, lambda: [_tensor("embed", 5, None, True)])
    with pytest.raises(AssertionError, match="converter bug"):
        list(plan)
