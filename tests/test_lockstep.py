"""Lock-step greedy decoding: verify continues the prompts of a batch together, one model call per step for all of
them, so that a model read from disk reads its weights once per step instead of once per prompt and step. On both
sides the batched continuation must give each prompt exactly the ids it gets alone: the reference's against its
full recomputation per token, the converted model's against ``model.generate`` of the prompt alone (how a user runs
it). The batches are left-padded; a padding bug in either side's stacking must make these comparisons fail."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from transformers import DynamicCache

import verify.context as vctx
import verify.original.model as refmodel
from fixtures.build import sample_images
from verify.compute import reserved_cache
from verify.context import Context, pack_decode_batches

BACKBONES = ("vicuna", "llama3", "phi3")
N = 6


def _ctx(repo, dtype: str = "float32", n: int = N, **kw) -> Context:
    return Context(repo, images=sample_images(), dtype=dtype, max_new_tokens=n, **kw)


def _alone_reference(ctx: Context) -> list[list[int]]:
    ref = ctx.reference
    return [
        ref.generate_greedy(x["ids"], x["images"] or None, max_new_tokens=N, incremental=False)
        for x in ctx.parity_inputs
    ]


def _alone_converted(ctx: Context) -> list[list[int]]:
    out = []
    for x in ctx.parity_inputs:
        ids = torch.tensor([x["expanded"]])
        kw = {"pixel_values": x["pixels"]} if x["pixels"] is not None else {}
        with torch.no_grad():
            gen = ctx.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False, **kw
            )
        out.append(gen[0, ids.shape[1] :].tolist())
    return out


@pytest.mark.parametrize("backbone", BACKBONES)
def test_reference_lock_step_gives_each_prompt_its_own_ids(backbone_pair, backbone):
    _, repo = backbone_pair(backbone)
    ctx = _ctx(repo)
    ref = ctx.reference
    outs = [ref.forward(x["ids"], x["images"] or None, keep_cache=True) for x in ctx.parity_inputs]
    assert len({len(o.input_positions) for o in outs}) > 2  # prompts of several lengths: the padding is exercised
    got = ref.continue_greedy_batch(outs, N)
    want = _alone_reference(ctx)
    assert got == want
    assert all(o.cache is None for o in outs)  # consumed
    # as verify runs it: the steps write into buffers with room for them (verify.compute.reserved_cache)
    outs = [ref.forward(x["ids"], x["images"] or None, keep_cache=True) for x in ctx.parity_inputs]
    assert ref.continue_greedy_batch(outs, N, reserved=reserved_cache) == want


def test_reference_lock_step_with_its_pad_visible_fails(converted, monkeypatch):
    """Planted: the batched steps run without the attention mask, so the shorter prompts attend to their zero pad."""
    ctx = _ctx(converted)
    ref = ctx.reference
    want = _alone_reference(ctx)
    real = ref.llm.forward

    @functools.wraps(real)
    def unmasked(*args, attention_mask=None, **kw):
        return real(*args, **kw)

    monkeypatch.setattr(ref.llm, "forward", unmasked)
    outs = [ref.forward(x["ids"], x["images"] or None, keep_cache=True) for x in ctx.parity_inputs]
    assert ref.continue_greedy_batch(outs, N) != want


def test_reference_lock_step_with_misplaced_caches_fails(converted, monkeypatch):
    """Planted: the stacked caches put each prompt's positions at the start (pad on the right) while the mask and the
    positions expect them at the end."""
    ctx = _ctx(converted)
    ref = ctx.reference
    want = _alone_reference(ctx)
    real = refmodel._cache_from_layers

    def right_aligned(pairs):
        moved = []
        for pair in pairs:
            ts = []
            for t in pair:
                t = t.clone()
                for row in range(t.shape[0]):
                    pad = int((t[row].abs().sum(dim=(0, 2)) == 0).sum())
                    t[row] = t[row].roll(-pad, dims=-2)
                ts.append(t)
            moved.append(tuple(ts))
        return real(moved)

    monkeypatch.setattr(refmodel, "_cache_from_layers", right_aligned)
    outs = [ref.forward(x["ids"], x["images"] or None, keep_cache=True) for x in ctx.parity_inputs]
    assert ref.continue_greedy_batch(outs, N) != want


@pytest.mark.parametrize("backbone", BACKBONES)
def test_converted_lock_step_gives_what_generate_gives_each_prompt(backbone_pair, backbone):
    _, repo = backbone_pair(backbone)
    ctx = _ctx(repo)
    assert len(ctx.decode_batches) == 1 and sum(len(m) for _, m in ctx.decode_batches[0]) == len(ctx.parity_inputs)
    assert ctx.converted_generations == _alone_converted(ctx)


def test_converted_lock_step_with_right_padded_caches_fails(converted, monkeypatch):
    ctx = _ctx(converted)
    want = _alone_converted(ctx)

    def right_padded(caches, lengths, room=0):
        longest = max(lengths)
        stacked = []
        for j in range(len(caches[0].layers)):
            ks = [F.pad(c.layers[j].keys, (0, 0, 0, longest - n)) for c, n in zip(caches, lengths, strict=True)]
            vs = [F.pad(c.layers[j].values, (0, 0, 0, longest - n)) for c, n in zip(caches, lengths, strict=True)]
            stacked.append((torch.cat(ks), torch.cat(vs)))
        return DynamicCache(ddp_cache_data=stacked)

    monkeypatch.setattr(vctx, "_left_padded_cache", right_padded)
    assert ctx.converted_generations != want


@pytest.mark.parametrize("backbone", BACKBONES)
def test_one_batch_per_group_gives_the_same_logits_and_ids(backbone_pair, backbone, monkeypatch):
    """The default run (float32 blocks, bf16 steps) with every group a batch of its own, against all in one batch:
    the same logits and the same ids on both sides."""
    _, repo = backbone_pair(backbone)
    together = _ctx(repo, "float32-blocks")
    assert len(together.decode_batches) == 1
    monkeypatch.setattr(vctx, "DECODE_BATCH_BYTES", 1)
    apart = _ctx(repo, "float32-blocks")
    assert len(apart.decode_batches) == len(apart.shared_prefixes) > 1
    for a, b in zip(together.reference_runs, apart.reference_runs, strict=True):
        assert a[1] == b[1] and torch.equal(a[0].logits, b[0].logits)
    for a, b in zip(together.converted_runs, apart.converted_runs, strict=True):
        assert a[1] == b[1] and torch.equal(a[0], b[0])


@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=8).flatmap(
        lambda sizes: st.tuples(
            st.just(sizes),
            st.lists(st.integers(1, 100), min_size=sum(sizes), max_size=sum(sizes)),
            st.integers(1, 300),
        )
    )
)
def test_batches_take_whole_groups_in_order_within_the_limit(case):
    sizes, cache_bytes, limit = case
    groups, i = [], 0
    for k, size in enumerate(sizes):
        groups.append((k % 2, list(range(i, i + size))))
        i += size
    batches = pack_decode_batches(groups, cache_bytes, limit)
    assert [g for b in batches for g in b] == groups  # every group once, whole, in order

    def held(batch):
        return sum(cache_bytes[j] for _, members in batch for j in members)

    for b in batches:
        assert b and (held(b) <= limit or len(b) == 1)
    for a, b in zip(batches, batches[1:], strict=False):
        assert held(a) + held(b[:1]) > limit  # the next group did not fit: the packing is greedy


def test_the_estimate_holds_the_largest_batch_of_caches_and_refuses_when_it_does_not_fit(converted, monkeypatch):
    ctx = _ctx(converted, "float32-blocks")
    w = 2  # bf16
    shape = ctx.model_shape
    held = [shape.cache_bytes(len(x["expanded"]) + N, w) for x in ctx.parity_inputs]
    assert ctx.memory["parts"]["decode_caches"] == sum(held)  # one batch: every prompt's cache
    monkeypatch.setattr(vctx, "DECODE_BATCH_BYTES", max(held) * 2)
    smaller = _ctx(converted, "float32-blocks")
    largest = max(sum(held[i] for _, m in b for i in m) for b in smaller.decode_batches)
    assert len(smaller.decode_batches) > 1 and smaller.memory["parts"]["decode_caches"] == largest
    assert _ctx(converted, "float32-blocks", n=0).memory["parts"]["decode_caches"] == 0
    limit = smaller.memory["total"] - largest // 2
    with pytest.raises(vctx.VerifyUsageError, match="GiB of memory"):
        _ctx(converted, "float32-blocks", memory_limit=limit)
