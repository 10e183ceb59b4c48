"""verify.compute: float32 arithmetic over bf16-stored weights, one block at a time (verify's default
``--dtype float32-blocks``). Under it both models must compute exactly what the same models loaded in float32 compute,
through every entry point verify uses (a plain forward, ``generate``, the reference's own calls), and leave the stored
weights untouched."""

from __future__ import annotations

import pytest
import torch

from fixtures.build import sample_images, sample_prompts
from verify.compute import Float32Blocks, blocks, cast_cache
from verify.context import Context

BACKBONES = ("vicuna", "llama3", "phi3")


def _ctx(repo, dtype: str, prompts=None) -> Context:
    return Context(repo, prompts=prompts, images=sample_images(), dtype=dtype, max_new_tokens=3)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_float32_blocks_compute_what_a_float32_model_computes(backbone_pair, backbone):
    """Both sides, every default prompt, through verify's own runs (generate for the converted model: its vision tower
    runs before the model's first forward): the logits of the bf16-stored models under float32 blocks equal those of
    the same models loaded in float32; the bf16 runs do not (the comparison can fail)."""
    _, repo = backbone_pair(backbone)
    blocks32, full32, bf16 = _ctx(repo, "float32-blocks"), _ctx(repo, "float32"), _ctx(repo, "bfloat16")
    assert blocks32.dtype == torch.bfloat16 and blocks32.arithmetic == torch.float32
    for side in ("reference", "converted"):
        got = [r[0].logits if side == "reference" else r[0] for r in getattr(blocks32, f"{side}_runs")]
        want = [r[0].logits if side == "reference" else r[0] for r in getattr(full32, f"{side}_runs")]
        low = [r[0].logits if side == "reference" else r[0] for r in getattr(bf16, f"{side}_runs")]
        worst = max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))
        assert worst <= 1e-6, (side, worst)
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


def test_stored_weights_come_back_and_only_one_buffer_per_shape(converted):
    ctx = _ctx(converted, "bfloat16", prompts=[p for p in sample_prompts() if p["name"] == "wide_colour"])
    model, x = ctx.model, ctx.parity_inputs[0]
    before = {n: (p.data_ptr(), p.dtype) for n, p in model.named_parameters()}
    with torch.no_grad(), Float32Blocks(model) as f32:
        model(input_ids=torch.tensor([x["expanded"]]), pixel_values=x["pixels"])
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
    assert ours == [] and f32._pool == {}


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


def test_extend_refuses_an_image_and_keeps_the_prefix_reusable(converted):
    ctx = _ctx(converted, "float32-blocks")
    ref, x = ctx.reference, ctx.parity_inputs[0]
    k = max(j for j, t in enumerate(x["ids"]) if t < 0) + 1
    pre = ref.forward(x["ids"][:k], x["images"], keep_cache=True)
    with pytest.raises(ValueError, match="text ids"):
        ref.extend(pre, [-200])
    one, two = ref.extend(pre, x["ids"][k:]), ref.extend(pre, x["ids"][k:])
    assert torch.equal(one.logits, two.logits) and one.logits.shape[0] == len(one.input_positions)
