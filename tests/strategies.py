"""Hypothesis strategies for the property tests of the key mapping and the embedding resize.

What is generated: plausible ORIGINAL ViP-LLaVA checkpoints (Llama text model + frozen CLIP tower + ViP-LLaVA
projector, the original code's state dict layout) as ``TinySpec``s, whose key -> shape dicts come from
``verify.tiny.original_key_shapes`` (meta device, nothing allocated, any size is free), with

- any number of text layers, 1 to 80;
- a vision depth for which the five feature layers [-2, -5, -8, -11, 6] are all valid AND distinct indices
  into ``hidden_states`` (which has ``layers + 1`` entries), up to 48 layers (see :func:`feature_layers_ok`);
- text / vision hidden sizes built as ``heads * head_dim`` (so the heads divide them; the text head_dim is
  even for the rotary embedding) and kv heads dividing the heads;
- original vocab sizes from 3 to 128256, with the real ones (32000, 128256) and ones smaller than the hidden
  size (singular embedding covariance) pinned;
- with and without the legacy buffers (``rotary_emb.inv_freq`` per text layer, CLIP ``embeddings.position_ids``).

Hidden sizes are kept small on purpose: the meta-device model transformers builds for the expected layout
costs time per MODULE, not per parameter, so layer counts and vocab sizes span the full range while widths stay
small.

Every backbone is generated: a ``Checkpoint`` is drawn once and put on a backbone with :meth:`Checkpoint.on`
(Vicuna and Llama-3: Llama decoder layers; Phi-3, ``mucai/vip-llava-phi-3-mini-3.8B``: fused ``qkv_proj`` /
``gate_up_proj``; only Vicuna's old saves carry the rotary ``inv_freq`` buffer), so the property tests run the
same draws and the same pinned edge cases on each backbone's table.

Independent oracle: :func:`documented_original_keys` writes the original key layout out by hand (the original
code's state dict and CLIP's 4.x module names), sharing nothing with the rule table or with ``verify.tiny``; it
is used to check the generator itself and to decide that a mutated key is really outside the layout.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from functools import lru_cache

import pytest
from hypothesis import example, settings
from hypothesis import strategies as st

from convert.layout import expected_shapes
from verify.tiny import TinySpec, original_key_shapes, vipllava_config

FEATURE_LAYERS = (-2, -5, -8, -11, 6)
MAX_TEXT_LAYERS = 80
MAX_VISION_LAYERS = 48
MAX_VOCAB = 128256
#: original vocab sizes that matter: tiny, the fixture's prime, Llama-2 / Vicuna, already padded, Llama-3
PINNED_VOCABS = (3, 997, 32000, 32064, 128256)


def feature_layer_positions(vision_layers: int) -> list[int] | None:
    """The positions in ``hidden_states`` (``vision_layers + 1`` entries) the feature layers select,
    or None if one is out of range (Python indexing: -k is position n - k)."""
    n = vision_layers + 1
    if any(not -n <= i < n for i in FEATURE_LAYERS):
        return None
    return [i % n for i in FEATURE_LAYERS]


def feature_layers_ok(vision_layers: int) -> bool:
    """All five feature layers valid and distinct. Valid needs n = layers + 1 >= 11 (index -11) and n > 6;
    distinct fails when 6 == n - k for k in (2, 5, 8, 11), i.e. layers in {7, 10, 13, 16}. So the minimum is
    11 layers, and 13 and 16 are excluded too (there -8, resp. -11, is hidden state 6 again)."""
    pos = feature_layer_positions(vision_layers)
    return pos is not None and len(set(pos)) == len(pos)


VISION_LAYER_CHOICES = tuple(n for n in range(1, MAX_VISION_LAYERS + 1) if feature_layers_ok(n))
MIN_VISION_LAYERS = VISION_LAYER_CHOICES[0]


# ------------------------------------------------------------------------------------------
# the hand-written original layout (independent oracle)
# ------------------------------------------------------------------------------------------

#: every backbone's tests run on these (the names of convert.backbones.BACKBONES and verify.tiny.BACKBONES)
BACKBONE_NAMES = ("vicuna", "llama3", "phi3")
_LLAMA_LAYER_PARTS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)
_PHI3_LAYER_PARTS = (
    "self_attn.qkv_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)
_TEXT_LAYER_PARTS = {"vicuna": _LLAMA_LAYER_PARTS, "llama3": _LLAMA_LAYER_PARTS, "phi3": _PHI3_LAYER_PARTS}
#: the backbones whose original saves carry ``rotary_emb.inv_freq`` (transformers <= 4.31: the Vicuna release)
_ROTARY_BUFFER_BACKBONES = frozenset({"vicuna"})
_CLIP_LAYER_PARTS = tuple(
    f"{m}.{wb}"
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "layer_norm1",
        "layer_norm2",
        "mlp.fc1",
        "mlp.fc2",
    )
    for wb in ("weight", "bias")
)
ORIGINAL_VISION = "model.vision_tower.vision_tower.vision_model."
ORIGINAL_EMBED = "model.embed_tokens.weight"
ORIGINAL_LM_HEAD = "lm_head.weight"


def documented_original_keys(
    text_layers: int, vision_layers: int, legacy_buffers: bool, backbone: str = "vicuna"
) -> frozenset[str]:
    """The original key set of ``backbone``, written out by hand from the original layout, without the rule
    table."""
    keys = {ORIGINAL_EMBED, "model.norm.weight", ORIGINAL_LM_HEAD}
    keys |= {f"model.layers.{i}.{p}" for i in range(text_layers) for p in _TEXT_LAYER_PARTS[backbone]}
    v = ORIGINAL_VISION
    keys |= {
        v + "embeddings.class_embedding",
        v + "embeddings.patch_embedding.weight",
        v + "embeddings.position_embedding.weight",
        v + "pre_layrnorm.weight",
        v + "pre_layrnorm.bias",
        v + "post_layernorm.weight",
        v + "post_layernorm.bias",
    }
    keys |= {f"{v}encoder.layers.{i}.{p}" for i in range(vision_layers) for p in _CLIP_LAYER_PARTS}
    keys |= {
        f"model.mm_projector.{m}.{wb}"
        for m in ("clip_layernorm", "final_linear.0", "final_linear.2")
        for wb in ("weight", "bias")
    }
    if legacy_buffers:
        if backbone in _ROTARY_BUFFER_BACKBONES:
            keys |= {f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(text_layers)}
        keys.add(v + "embeddings.position_ids")
    return frozenset(keys)


def legacy_buffer_keys(text_layers: int, backbone: str = "vicuna") -> frozenset[str]:
    """The keys dropped on purpose: the legacy buffers (``rotary_emb.inv_freq``, CLIP ``embeddings.position_ids``)."""
    return documented_original_keys(text_layers, 0, True, backbone) - documented_original_keys(
        text_layers, 0, False, backbone
    )


@lru_cache(maxsize=None)
def _any_depth_layout(backbone: str) -> frozenset[str]:
    """Every documented key of ``backbone`` for up to 100 text and vision layers (a superset for the mutations
    below), with Vicuna's ``rotary_emb.inv_freq`` keys for every backbone: the table drops them whatever the
    backbone, which is not wrong, so they are not "outside the layout" either."""
    inv_freq = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(100)}
    return documented_original_keys(100, 100, True, backbone) | inv_freq


# ------------------------------------------------------------------------------------------
# generated checkpoints
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A generated original checkpoint: its spec and its key -> shape dict in a given key order."""

    spec: TinySpec
    order_seed: int  # 0 = save (module) order, else the keys are shuffled with this seed

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return shuffled_shapes(self.spec, self.order_seed)

    def on(self, backbone: str) -> "Checkpoint":
        """The same sizes, depths, buffers and key order on ``backbone``'s layout. The special-token ids of the
        backbone's tiny fixture are kept when they fit the vocabulary, else taken modulo its size (they name no
        tensor; torch refuses an embedding whose padding index is out of range)."""
        ids = TinySpec(backbone=backbone).special_ids
        v = self.spec.vocab_size
        token_ids = None if all(i is None or i < v for i in ids) else tuple(None if i is None else i % v for i in ids)
        return Checkpoint(replace(self.spec, backbone=backbone, token_ids=token_ids), self.order_seed)


@lru_cache(maxsize=64)
def key_shapes(spec: TinySpec) -> dict[str, tuple[int, ...]]:
    return original_key_shapes(spec)


def shuffled_shapes(spec: TinySpec, order_seed: int) -> dict[str, tuple[int, ...]]:
    shapes = key_shapes(spec)
    keys = list(shapes)
    if order_seed:
        random.Random(order_seed).shuffle(keys)
    return {k: shapes[k] for k in keys}


def spec(
    vocab: int = 997,
    text_layers: int = 2,
    vision_layers: int = 12,
    text_heads: int = 2,
    text_head_dim: int = 8,
    text_kv_heads: int = 1,
    text_intermediate: int = 24,
    vision_heads: int = 2,
    vision_head_dim: int = 8,
    vision_intermediate: int = 40,
    patch_size: int = 2,
    grid: int = 3,
    legacy_buffers: bool = True,
) -> TinySpec:
    """A ``TinySpec`` from the generator's parameters (heads * head_dim = hidden)."""
    return TinySpec(
        vocab_size=vocab,
        text_hidden=text_heads * text_head_dim,
        text_intermediate=text_intermediate,
        text_layers=text_layers,
        text_heads=text_heads,
        text_kv_heads=text_kv_heads,
        vision_hidden=vision_heads * vision_head_dim,
        vision_intermediate=vision_intermediate,
        vision_layers=vision_layers,
        vision_heads=vision_heads,
        image_size=patch_size * grid,
        patch_size=patch_size,
        legacy_buffers=legacy_buffers,
    )


def vocab_sizes(max_vocab: int = MAX_VOCAB) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([v for v in PINNED_VOCABS if v <= max_vocab]), st.integers(3, max_vocab))


@st.composite
def specs(
    draw, max_text_layers: int = MAX_TEXT_LAYERS, max_vision_layers: int = MAX_VISION_LAYERS, max_vocab: int = MAX_VOCAB
) -> TinySpec:
    text_heads = draw(st.sampled_from([1, 2, 4, 8]))
    kv_heads = draw(st.sampled_from([d for d in (1, 2, 4, 8) if text_heads % d == 0]))
    return spec(
        vocab=draw(vocab_sizes(max_vocab)),
        text_layers=draw(st.integers(1, max_text_layers)),
        vision_layers=draw(st.sampled_from([n for n in VISION_LAYER_CHOICES if n <= max_vision_layers])),
        text_heads=text_heads,
        text_head_dim=draw(st.sampled_from([2, 4, 8, 16])),
        text_kv_heads=kv_heads,
        text_intermediate=draw(st.integers(1, 96)),
        vision_heads=draw(st.sampled_from([1, 2, 4])),
        vision_head_dim=draw(st.integers(1, 16)),
        vision_intermediate=draw(st.integers(1, 96)),
        patch_size=draw(st.integers(1, 14)),
        grid=draw(st.integers(1, 4)),
        legacy_buffers=draw(st.booleans()),
    )


def checkpoints(**kw) -> st.SearchStrategy[Checkpoint]:
    return st.builds(Checkpoint, specs(**kw), st.one_of(st.just(0), st.integers(1, 2**32 - 1)))


#: the edge cases every checkpoint property pins with @example
EDGE_SPECS = (
    spec(text_layers=1, vision_layers=MIN_VISION_LAYERS, vocab=3, legacy_buffers=True),  # h=16 > vocab 3
    spec(text_layers=1, vision_layers=MIN_VISION_LAYERS, vocab=3, legacy_buffers=False),
    spec(text_layers=80, vision_layers=MAX_VISION_LAYERS, vocab=128256, legacy_buffers=True),
    spec(text_layers=80, vision_layers=24, vocab=32000, legacy_buffers=False),
    spec(text_layers=32, vision_layers=24, vocab=32000, text_heads=8, text_head_dim=16),  # 7B-like depths
    spec(text_layers=40, vision_layers=24, vocab=32000, text_heads=4, text_head_dim=16, text_intermediate=128),
    spec(text_layers=2, vision_layers=12, vocab=997),  # the fixture's shape
    spec(
        text_layers=11, vision_layers=MIN_VISION_LAYERS, vocab=62, text_heads=8, text_head_dim=16
    ),  # h=128 > vocab, rows 64
    spec(text_layers=10, vision_layers=17, vocab=63, legacy_buffers=False),  # 63 + 2 = 65 -> 128 rows
)
EDGE_CHECKPOINTS = tuple(Checkpoint(s, 0) for s in EDGE_SPECS) + (Checkpoint(EDGE_SPECS[6], 12345),)


# ------------------------------------------------------------------------------------------
# keys outside the original layout
# ------------------------------------------------------------------------------------------

_IDENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)


@st.composite
def foreign_keys(draw, shapes: dict[str, tuple[int, ...]], backbone: str = "vicuna") -> str:
    """A key near (or far from) ``backbone``'s original layout that is NOT in it, for any layer count < 100."""
    keys = sorted(shapes)
    layered = [k for k in keys if ".layers." in k]
    kind = draw(
        st.sampled_from(
            [
                "extra",
                "leading_zero",
                "truncated",
                "plain_llava",
                "converted_name",
                "prefixed",
                "inserted",
                "bad_index",
                "case",
            ]
        )
    )
    if kind == "extra":
        key = f"model.{draw(_IDENT)}.{draw(st.sampled_from(['weight', 'bias']))}"
    elif kind == "leading_zero":
        key = draw(st.sampled_from(layered))
        head, sep, tail = key.partition(".layers.")
        key = f"{head}{sep}0{tail}"
    elif kind == "truncated":
        key = draw(st.sampled_from(keys))
        key = key[: draw(st.integers(1, len(key) - 1))]
    elif kind == "plain_llava":
        key = f"model.mm_projector.{draw(st.sampled_from(['0', '2']))}.{draw(st.sampled_from(['weight', 'bias']))}"
    elif kind == "converted_name":
        key = draw(
            st.sampled_from(
                [
                    "language_model.model.embed_tokens.weight",
                    "language_model.lm_head.weight",
                    "multi_modal_projector.linear_1.weight",
                    "vision_tower.vision_model.post_layernorm.bias",
                    "language_model.model.layers.0.mlp.up_proj.weight",
                ]
            )
        )
    elif kind == "prefixed":
        key = draw(st.sampled_from(["module.", "model.", "base_model.", "_orig_mod."])) + draw(st.sampled_from(keys))
    elif kind == "inserted":
        parts = draw(st.sampled_from(keys)).split(".")
        parts.insert(draw(st.integers(0, len(parts))), draw(_IDENT))
        key = ".".join(parts)
    elif kind == "bad_index":
        key = draw(st.sampled_from(layered))
        head, sep, tail = key.partition(".layers.")
        tail = tail.split(".", 1)[1]
        key = f"{head}{sep}{draw(st.sampled_from(['-1', 'x', '1e3', '+2', ' 3', '', '٣']))}.{tail}"
    else:  # case
        key = draw(st.sampled_from(keys))
        key = key[0].upper() + key[1:]
    # the hand-written layout (any depth < 100, with legacy buffers) is the oracle for "outside the layout"
    from hypothesis import assume

    assume(key not in _any_depth_layout(backbone))
    return key


# ------------------------------------------------------------------------------------------
# embedding matrices for the resize
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbedSpec:
    """An n x h embedding matrix built from a seed on demand.

    ``rank`` < h makes the covariance EXACTLY singular even after rounding to the storage dtype: an n x rank
    matrix B is rounded first, then every column of E is a copy of one column of B. (h > n - 1 is singular
    anyway: n centred rows span at most n - 1 dimensions.) ``offset`` moves the mean away from 0.
    """

    n: int
    h: int
    rank: int
    scale: float
    offset: float
    seed: int

    def build(self, dtype=None):
        import torch

        # E must not be built from the very normals the resize draws when its seed equals ours (g would be
        # parallel to E - mu, a 9-sigma row). torch's CPU generator keeps only the low 32 bits of a seed, so the
        # offset has to move the seed within them: resize seeds are < 2**31, these are >= 2**31.
        g = torch.Generator().manual_seed(2**31 + self.seed)
        r = max(1, min(self.rank, self.h))
        base = torch.randn(self.n, r, generator=g, dtype=torch.float64) * self.scale
        base = base + self.offset * torch.randn(r, generator=g, dtype=torch.float64)
        base = base.to(dtype or torch.float32)
        cols = torch.cat([torch.arange(r), torch.randint(0, r, (self.h - r,), generator=g)])
        return base[:, cols].contiguous()


@st.composite
def embed_specs(draw, max_n: int = 3000, max_h: int = 256) -> EmbedSpec:
    n = draw(st.one_of(st.sampled_from([v for v in (1, 2, 3, 62, 63, 64, 997) if v <= max_n]), st.integers(1, max_n)))
    h = draw(st.one_of(st.sampled_from([1, 2, 64, max_h]), st.integers(1, max_h)))
    rank = draw(st.one_of(st.just(h), st.integers(1, h)))  # full rank, or an exactly singular covariance
    return EmbedSpec(
        n=n,
        h=h,
        rank=rank,
        scale=draw(st.sampled_from([1e-3, 0.02, 0.5, 1.0, 4.0])),
        offset=draw(st.sampled_from([0.0, 0.1, 1.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )  # see build()


# ------------------------------------------------------------------------------------------
# shared by the property tests (tests/test_mapping.py, test_config.py, test_resize.py)
# ------------------------------------------------------------------------------------------


def slow_tier(test=None, *, max_examples: int | None = None):
    """The slow tier of a property test: the "slow" hypothesis profile (more examples), marked ``slow`` (run with
    ``pytest -m slow``). Goes above ``@given``. ``@slow_tier(max_examples=N)`` takes N examples instead of the
    profile's (the per-backbone mapping properties: N per backbone)."""
    if test is None:
        return lambda t: slow_tier(t, max_examples=max_examples)
    profile = settings.get_profile("slow")
    chosen = profile if max_examples is None else settings(profile, max_examples=max_examples)
    return pytest.mark.slow(settings(chosen)(test))


def edge_examples(fn=None, **other):
    """Pin the edge checkpoints (1 / 80 text layers, 11 / 48 vision layers, vocab 3 / 997 / 32000 / 128256,
    h > vocab, with / without legacy buffers, shuffled key order) on a ``body(ckpt, **other)``."""
    if fn is None:
        return lambda f: edge_examples(f, **other)
    for ckpt in EDGE_CHECKPOINTS:
        fn = example(ckpt=ckpt, **other)(fn)
    return fn


@lru_cache(maxsize=32)
def expected_for(spec_: TinySpec) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape transformers expects, from the independently built ``VipLlavaConfig``."""
    return expected_shapes(vipllava_config(spec_))


def smallest_multiple_of_64_at_least(x: int) -> int:
    """By definition, by search (not the converter's ceiling formula)."""
    return next(r for r in range(x, x + 64) if r % 64 == 0)
