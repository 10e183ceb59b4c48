"""verify.compute: float32 arithmetic over bf16-stored weights, one block at a time (verify's default
``--dtype float32-blocks``). Under it both models must compute exactly what the same models loaded in float32 compute,
through every entry point verify uses (a plain forward, ``generate``, the reference's own calls), and leave the stored
weights untouched."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.build import sample_images, sample_prompts
from verify.compute import Float32Blocks, blocks, cast_cache, reserved_cache
from verify.context import Context

BACKBONES = ("vicuna", "llama3", "phi3")


def _ctx(repo, dtype: str, prompts=None) -> Context:
    return Context(repo, prompts=prompts, images=sample_images(), dtype=dtype, max_new_tokens=3)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_float32_blocks_compute_what_a_float32_model_computes(backbone_pair, backbone):
    """Both sides, every default prompt, through verify's own runs (generate for the converted model: its vision tower
    runs before the model's first forward): the logits of the bf16-stored models under float32 blocks equal those of
    the same models loaded in float32 up to the summation order of float32 products (the prompt tails after a shared
    prefix multiply by slabs: float32 sums in another order, far below verify's 1e-4); the bf16 runs do not (the
    comparison can fail)."""
    _, repo = backbone_pair(backbone)
    blocks32, full32, bf16 = _ctx(repo, "float32-blocks"), _ctx(repo, "float32"), _ctx(repo, "bfloat16")
    assert blocks32.dtype == torch.bfloat16 and blocks32.arithmetic == torch.float32
    for side in ("reference", "converted"):
        got = [r[0].logits if side == "reference" else r[0] for r in getattr(blocks32, f"{side}_runs")]
        want = [r[0].logits if side == "reference" else r[0] for r in getattr(full32, f"{side}_runs")]
        low = [r[0].logits if side == "reference" else r[0] for r in getattr(bf16, f"{side}_runs")]
        worst = max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))
        assert worst <= 2e-5, (side, worst)
        assert max((a - b).abs().max().item() for a, b in zip(low, want, strict=True)) > 1e-3, side
    # the weights were never copied: both models still hold their bf16 parameters
    for model in (blocks32.model, blocks32.reference.llm, blocks32.reference.vision):
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_default_verify_of_each_backbone_passes_in_float32_blocks(backbone_pair):
    from verify.api import verify_repo

    for backbone in BACKBONES:
        _, repo = backbone_pair(backbone)
        report = verify_repo(
            repo, images=sample_images(), max_new_tokens=4, progress=False, only=["logits", "generation"]
        )
        assert report.passed, report.table()
        assert report.settings["dtype"] == "float32-blocks"
        assert report.get("logits").numbers["max_abs_diff"] <= 1e-4


def test_stored_weights_come_back_and_float32_buffers_are_one_per_shape(converted, monkeypatch):
    """Many rows: every block's low-precision parameters are copied into one float32 buffer per shape, reused across
    blocks. A few rows (up to FEW_ROWS): linear layers multiply by slabs (``slab_linear``, the float32 product of
    the same weight) and copy nothing whole. Weights, forwards and hooks are all restored on exit."""
    import verify.compute as compute

    ctx = _ctx(converted, "bfloat16", prompts=[p for p in sample_prompts() if p["name"] == "wide_colour"])
    model, x = ctx.model, ctx.parity_inputs[0]
    ids = torch.tensor([x["expanded"]])
    monkeypatch.setattr(compute, "FEW_ROWS", 4)  # the tiny prompts are short
    assert ids.shape[1] > compute.FEW_ROWS and min(x["expanded"][:4]) >= 0
    linear = [b for b in blocks(model) if type(b) is torch.nn.Linear]
    calls = []
    real = compute.slab_linear

    def counting(a, *rest):
        calls.append(a.shape[:-1].numel())
        return real(a, *rest)

    monkeypatch.setattr(compute, "slab_linear", counting)
    before = {n: (p.data_ptr(), p.dtype) for n, p in model.named_parameters()}
    with torch.no_grad(), Float32Blocks(model) as f32:
        few = model(input_ids=ids[:, :4]).logits
        # the embedding and the norms were copied; no linear weight was (the head shares the embedding's shape)
        others = {tuple(p.shape) for b in blocks(model) if type(b) is not torch.nn.Linear for p in b.parameters()}
        assert tuple(model.get_input_embeddings().weight.shape) in f32._pool and set(f32._pool) <= others
        assert all(len(f32._pool[s]) == 1 for s in f32._pool)
        text_linear = [b for b in linear if "vision" not in n_of(model, b) and "projector" not in n_of(model, b)]
        assert len(calls) == len(text_linear) and set(calls) == {4}
        model(input_ids=ids, pixel_values=x["pixels"])
        assert len(calls) == len(text_linear)  # many rows: the whole-weight path
        shapes = {tuple(p.shape) for b in blocks(model) for p in b.parameters()}
        assert len(f32._pool) == len(shapes)  # reused across blocks, never one buffer per parameter
        assert f32.pool_bytes < sum(p.numel() * 4 for p in model.parameters())
    assert {n: (p.data_ptr(), p.dtype) for n, p in model.named_parameters()} == before
    ours = [
        h
        for m in model.modules()
        for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())
        if getattr(h, "__self__", None) is f32
    ]
    assert ours == [] and f32._pool == {} and not any("forward" in vars(m) for m in model.modules())
    # the few-row logits are those of the float32 model (summation order aside), and far from the bf16 ones
    with torch.no_grad():
        low = model(input_ids=ids[:, :4]).logits.float()
        model.float()
        want = model(input_ids=ids[:, :4]).logits
    assert (few - want).abs().max().item() <= 2e-5 < (low - want).abs().max().item()


def n_of(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def test_blocks_cover_every_parameter_once_and_keep_clip_embeddings_whole(converted):
    ctx = _ctx(converted, "bfloat16")
    model = ctx.model
    seen = [id(p) for b in blocks(model) for p in b.parameters()]
    assert len(seen) == len(set(seen)) == len({id(p) for p in model.parameters()})
    names = {type(b).__name__ for b in blocks(model)}
    assert "CLIPVisionEmbeddings" in names and "Conv2d" not in names  # it casts its input to its patch weights' dtype


def test_a_block_entered_inside_another_is_an_error():
    inner = torch.nn.Linear(4, 4).to(torch.bfloat16)

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))

        def forward(self, x):
            return inner(x * self.w)

    outer = Outer()
    with Float32Blocks(outer, inner), pytest.raises(RuntimeError, match="entered inside"):
        outer(torch.ones(1, 4))
    assert outer.w.dtype == inner.weight.dtype == torch.bfloat16


def test_cast_cache_lets_bf16_steps_follow_a_float32_prompt(converted):
    ctx = _ctx(converted, "bfloat16", prompts=[p for p in sample_prompts() if p["name"] == "text_only"])
    model, x = ctx.model, ctx.parity_inputs[0]
    ids = torch.tensor([x["expanded"]])
    with torch.no_grad():
        with Float32Blocks(model):
            out = model(input_ids=ids, use_cache=True)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        assert cache.layers[0].keys.dtype == torch.float32
        cast_cache(cache, torch.bfloat16)
        assert {layer.keys.dtype for layer in cache.layers} == {torch.bfloat16}
        step = model(input_ids=torch.tensor([[5]]), cache=cache, use_cache=True)
    assert step.logits.dtype == torch.bfloat16 and torch.isfinite(step.logits).all()


# --- prompts that share a prefix compute it once --------------------------------------------------------------
def _unshared(ctx: Context) -> Context:
    ctx.__dict__["shared_prefixes"] = [(0, [i]) for i in range(len(ctx.parity_inputs))]
    return ctx


def test_default_prompts_share_their_system_text_and_image(converted):
    ctx = _ctx(converted, "float32-blocks")
    names = [x["name"] for x in ctx.parity_inputs]
    groups = [[names[i] for i in members] for k, members in ctx.shared_prefixes if k]
    assert sorted(map(sorted, groups)) == [
        ["box_inside", "image_then_space", "two_turn"],
        ["image_no_newline", "square_describe"],
    ]
    assert sorted(i for _, m in ctx.shared_prefixes for i in m) == list(range(len(names)))  # every prompt exactly once


@pytest.mark.parametrize("backbone", BACKBONES)
def test_a_shared_prefix_gives_the_logits_and_tokens_of_whole_prompts(backbone_pair, backbone):
    """Both sides, all default prompts: computing the shared prefix once and extending it per prompt gives the same
    logits (float32 arithmetic, kernel-order noise only) and the same greedy tokens as running each prompt whole."""
    from fixtures.build import sample_conversations

    _, repo = backbone_pair(backbone)
    # Llama-3's and Phi-3's default conversations each show another image: one more on the box makes a group
    prompts = (
        None
        if backbone == "vicuna"
        else [
            *sample_conversations(),
            {
                "name": "box_again",
                "image": "box",
                "turns": [
                    {"role": "user", "text": "<image>\nWhat colour is the box?"},
                    {"role": "assistant", "text": None},
                ],
            },
        ]
    )
    shared, whole = _ctx(repo, "float32-blocks", prompts), _unshared(_ctx(repo, "float32-blocks", prompts))
    assert any(k for k, _ in shared.shared_prefixes)
    for a, b in zip(shared.reference_runs, whole.reference_runs, strict=True):
        assert a[0].input_positions == b[0].input_positions and a[1] == b[1]
        assert (a[0].logits - b[0].logits).abs().max().item() <= 1e-5
    for a, b in zip(shared.converted_runs, whole.converted_runs, strict=True):
        assert a[1] == b[1] and a[0].shape == b[0].shape
        assert (a[0] - b[0]).abs().max().item() <= 1e-5


def test_extend_splices_images_and_keeps_the_prefix_reusable(converted):
    """``extend`` of a prefix by ids that hold an image is the whole prompt's forward (the system text shared by
    every unit: the image comes after it); a sentinel without its image is refused; the prefix stays reusable."""
    ctx = _ctx(converted, "float32-blocks")
    ref, x = ctx.reference, ctx.parity_inputs[0]
    first_image = min(j for j, t in enumerate(x["ids"]) if t < 0)
    k = max(j for j, t in enumerate(x["ids"]) if t < 0) + 1
    pre = ref.forward(x["ids"][:k], x["images"], keep_cache=True)
    with pytest.raises(ValueError, match="image sentinel"):
        ref.extend(pre, [-200])
    one, two = ref.extend(pre, x["ids"][k:]), ref.extend(pre, x["ids"][k:])
    assert torch.equal(one.logits, two.logits) and one.logits.shape[0] == len(one.input_positions)
    system = ref.forward(x["ids"][:first_image], keep_cache=True)
    whole = ref.forward(x["ids"], x["images"])
    with pytest.raises(ValueError, match="image sentinel"):
        ref.extend(system, x["ids"][first_image:])
    got = ref.extend(system, x["ids"][first_image:], images=x["images"])
    assert got.input_positions == whole.input_positions
    assert (got.logits - whole.logits).abs().max().item() <= 1e-5
    again = ref.extend(system, x["ids"][first_image:], images=x["images"])
    assert torch.equal(got.logits, again.logits)


def test_every_unit_shares_the_system_text_and_it_is_computed_once_per_side(converted, monkeypatch):
    """The default prompts' units (5 images and a text-only prompt) all begin with the system text: the root prefix
    holds those ids (no image), each side runs it once, within its first unit, and the other units extend a copy.
    On the converted side, one forward only runs from position 0; every other unit's computes its ids after the
    root."""
    ctx = _ctx(converted, "float32-blocks")
    R = ctx.root_prefix
    xs = ctx.parity_inputs
    units = [members[0] for _, members in ctx.shared_prefixes]
    assert len(units) == 6 and R > 10
    assert all(t >= 0 for t in xs[units[0]]["ids"][:R]) and all(
        xs[u]["ids"][:R] == xs[units[0]]["ids"][:R] for u in units
    )
    assert any(xs[u]["ids"][R] != xs[units[0]]["ids"][R] or xs[u]["ids"][R] < 0 for u in units)
    ref = ctx.reference
    whole, extended = [], []
    real_forward, real_extend = ref.forward, ref.extend
    monkeypatch.setattr(ref, "forward", lambda ids, *a, **k: whole.append(len(ids)) or real_forward(ids, *a, **k))
    monkeypatch.setattr(
        ref,
        "extend",
        lambda p, ids, *a, **k: extended.append((len(p.input_positions), len(ids))) or real_extend(p, ids, *a, **k),
    )
    assert len(ctx.reference_runs) == len(xs)
    assert whole == [len(xs[units[0]]["ids"])]  # only the first unit runs from position 0
    # every other unit extends the root by the rest of its ids (its image included), the group members their groups
    assert sorted(n for p, n in extended if p == R) == sorted(len(xs[u]["ids"]) - R for u in units[1:])
    assert len(extended) == len(xs) - 1 and all(p > R for p, _ in extended if p != R)
    model = ctx.model
    rows: list = []
    hook = model.register_forward_hook(lambda _m, _a, out: rows.append(out.logits.shape[1]))
    try:
        assert len(ctx.converted_runs) == len(xs)
    finally:
        hook.remove()
    longest = max(len(x["expanded"]) for x in xs)
    assert [n for n in rows if n > longest - R] == [len(xs[units[0]]["expanded"])]  # one forward from position 0
    for u in units[1:]:
        assert len(xs[u]["expanded"]) - R in rows


def test_a_prefix_cut_from_a_whole_forward_is_the_prefix_forward(converted):
    """``prefix(forward(ids), k)`` (how a group's shared prefix is computed: within its first prompt) equals
    ``forward(ids[:k])``: logits, positions and cache; it is a copy (casting the whole forward's cache for the greedy
    steps leaves it alone), and extending it gives the whole prompt again."""
    ctx = _ctx(converted, "float32")
    ref, x = ctx.reference, ctx.parity_inputs[0]
    k = max(j for j, t in enumerate(x["ids"]) if t < 0) + 1
    assert k < len(x["ids"])
    with torch.no_grad():
        whole = ref.forward(x["ids"], x["images"], keep_cache=True)
        alone = ref.forward(x["ids"][:k], x["images"], keep_cache=True)
        cut = ref.prefix(whole, k)
        assert cut.input_positions == alone.input_positions
        assert (cut.logits - alone.logits).abs().max().item() <= 1e-5
        for a, b in zip(cut.cache.layers, alone.cache.layers, strict=True):
            assert a.keys.shape == b.keys.shape and (a.keys - b.keys).abs().max().item() <= 1e-5
            assert (a.values - b.values).abs().max().item() <= 1e-5
        cast_cache(whole.cache, torch.bfloat16)
        assert {layer.keys.dtype for layer in cut.cache.layers} == {torch.float32}
        again = ref.extend(cut, x["ids"][k:])
        assert (again.logits - whole.logits).abs().max().item() <= 1e-5
        with pytest.raises(ValueError, match="keep_cache"):
            ref.prefix(ref.forward(x["ids"], x["images"]), k)


# --- the greedy steps: float32 products over the stored weights, a slab at a time ------------------------------------


@given(
    rows=st.integers(1, 300),
    width=st.integers(1, 96),
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    bias=st.booleans(),
    slab=st.sampled_from([64, 256, 4096]),
)
@settings(max_examples=40, deadline=None)
def test_slab_linear_is_the_float32_product_rounded_once(rows, width, lead, bias, slab):
    """Every slab boundary (rows not a multiple of the slab, a slab larger than the weight): the same values as the
    float32 product of the upcast weight, rounded once to the input's dtype."""
    import verify.compute as compute

    g = torch.Generator().manual_seed(rows * 1000 + width)
    w = torch.randn(rows, width, generator=g).bfloat16()
    b = torch.randn(rows, generator=g).bfloat16() if bias else None
    x = torch.randn(*lead, width, generator=g).bfloat16()
    old = compute.SLAB_BYTES
    compute.SLAB_BYTES = slab
    try:
        got = compute.slab_linear(x, w, b, x.dtype)
    finally:
        compute.SLAB_BYTES = old
    want = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)
    assert got.dtype == x.dtype and got.shape == (*lead, rows)
    assert (
        got.is_contiguous()
    )  # row-major like a linear layer's output: attention kernels are slow on transposed strides
    assert torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    # equal to the last bit except where float32 sums in another order straddle a bf16 rounding boundary
    assert (got != want).float().mean().item() <= 0.02


def test_float32_products_patch_only_while_active_and_take_the_stored_path_for_long_inputs(converted):
    from verify.compute import Float32Products

    ctx = _ctx(converted, "bfloat16")
    model = ctx.model
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    calls = []
    import verify.compute as compute

    real = compute.slab_linear

    def counting(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    compute.slab_linear = counting
    try:
        lin = linears[0]
        x_short = torch.randn(3, lin.in_features).bfloat16()
        x_long = torch.randn(65, lin.in_features).bfloat16()
        with torch.no_grad(), Float32Products(model, max_rows=64):
            assert "forward" in vars(lin)
            short, long = lin(x_short), lin(x_long)
        assert all("forward" not in vars(m) for m in linears)  # restored
    finally:
        compute.slab_linear = real
    assert calls == [x_short.shape]
    assert short.dtype == long.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(long, torch.nn.functional.linear(x_long, lin.weight, lin.bias))


def test_greedy_steps_of_both_sides_run_through_float32_products(converted, monkeypatch):
    """verify's default (bf16 weights) decodes with float32 products on both sides, and both sides still produce
    each prompt's ids; with the products planted wrong on one side only, the generation check fails."""
    import verify.compute as compute
    from verify.api import verify_repo

    real = compute.slab_linear
    seen = []

    def counting(x, *a, **k):
        seen.append(x.shape[0] if x.dim() == 2 else x.shape[:-1].numel())
        return real(x, *a, **k)

    monkeypatch.setattr(compute, "slab_linear", counting)
    report = verify_repo(converted, images=sample_images(), max_new_tokens=4, progress=False, only=["generation"])
    assert report.passed, report.table()
    assert seen and max(seen) > 1  # the batched steps went through it

    import inspect

    def wrong_on_the_reference(x, w, b, dtype):
        out = real(x, w, b, dtype)
        in_reference = any(f.function == "continue_greedy_batch" for f in inspect.stack(0))
        return -out if in_reference else out

    monkeypatch.setattr(compute, "slab_linear", wrong_on_the_reference)
    report = verify_repo(converted, images=sample_images(), max_new_tokens=4, progress=False, only=["generation"])
    assert not report.passed


@settings(max_examples=40, deadline=None)
@given(
    filled=st.integers(0, 6),
    room=st.integers(0, 4),
    steps=st.lists(st.integers(1, 3), min_size=1, max_size=5),
    reorder_at=st.one_of(st.none(), st.integers(0, 4)),
)
def test_a_reserved_cache_holds_what_concatenation_holds(filled, room, steps, reorder_at):
    """Each update of a reserved layer returns exactly what DynamicLayer's concatenation returns; while the room
    lasts it writes in place (the keys stay views of the buffer), past it or after a reorder it concatenates."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(filled * 100 + room)
    buf_k = torch.randn(2, 3, filled + room, 4, generator=g)
    buf_v = torch.randn(2, 3, filled + room, 4, generator=g)
    plain = DynamicCache(ddp_cache_data=[(buf_k[..., :filled, :].clone(), buf_v[..., :filled, :].clone())])
    ours = reserved_cache([(buf_k, buf_v)], filled)
    assert ours.get_seq_length() == plain.get_seq_length() == filled
    n = filled
    for i, m in enumerate(steps):
        if reorder_at == i:
            order = torch.tensor([1, 0])
            plain.layers[0].keys, plain.layers[0].values = plain.layers[0].keys[order], plain.layers[0].values[order]
            ours.layers[0].keys, ours.layers[0].values = ours.layers[0].keys[order], ours.layers[0].values[order]
            reordered = True
        else:
            reordered = reorder_at is not None and reorder_at < i
        k, v = torch.randn(2, 3, m, 4, generator=g), torch.randn(2, 3, m, 4, generator=g)
        want = plain.layers[0].update(k, v)
        got = ours.layers[0].update(k, v)
        n += m
        for w, t in zip(want, got, strict=True):
            assert t.shape[-2] == n and torch.equal(w, t)
        in_place = not reordered and n <= filled + room
        assert (got[0].data_ptr() == buf_k.data_ptr()) == in_place
        assert ours.get_seq_length() == n


def test_a_reserved_cache_writing_at_the_wrong_place_is_caught(converted, monkeypatch):
    """Planted: the room is written one position too late (the steps attend to a zero slot and miss their own key);
    the lock-step ids then differ from the prompts' ids alone, on the reference as on the converted side."""
    import verify.compute as vcompute

    ctx = Context(converted, images=sample_images(), dtype="float32", max_new_tokens=6)
    ref = ctx.reference
    outs = [ref.forward(x["ids"], x["images"] or None, keep_cache=True) for x in ctx.parity_inputs]
    want = ref.continue_greedy_batch(outs, 6, reserved=reserved_cache)
    layer_class = vcompute._reserved_layer_class()
    real = layer_class.update

    def late(self, key_states, value_states, *args, **kwargs):
        if self._room is not None:
            kb, vb = self._room
            n = self.keys.shape[-2]
            if n + 2 <= kb.shape[-2]:
                kb[..., n + 1 : n + 2, :] = key_states
                vb[..., n + 1 : n + 2, :] = value_states
                self.keys, self.values = kb[..., : n + 1, :], vb[..., : n + 1, :]
                return self.keys, self.values
        return real(self, key_states, value_states, *args, **kwargs)

    monkeypatch.setattr(layer_class, "update", late)
    outs = [ref.forward(x["ids"], x["images"] or None, keep_cache=True) for x in ctx.parity_inputs]
    assert ref.continue_greedy_batch(outs, 6, reserved=reserved_cache) != want


@pytest.mark.parametrize("plant", ["drop_pixels", "drop_cache"])
def test_a_generate_that_drops_the_image_or_the_cached_prefix_is_refused(converted, plant, monkeypatch):
    """The converted side's first step hands ``generate`` a cached prefix (the system text, or a group's prefix) and,
    for a unit's first prompt, the pixels of the image that follows it. Planted: a ``generate`` that drops the pixel
    values when a cache is given (as releases before 5.x's multimodal prefill did), or that drops the cache and
    recomputes the prompt whole: verify refuses the run with a RuntimeError, before any logits are compared."""
    ctx = _ctx(converted, "float32-blocks")
    model = ctx.model
    real = model.generate

    def planted(*args, **kw):
        if kw.get("cache") is not None:
            if plant == "drop_pixels":
                kw.pop("pixel_values", None)
            else:
                kw.pop("cache")
        return real(*args, **kw)

    monkeypatch.setattr(model, "generate", planted)
    with pytest.raises(RuntimeError, match="projected 0 image" if plant == "drop_pixels" else "recomputed"):
        _ = ctx.converted_runs
