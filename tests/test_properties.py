"""Property-based tests of the key mapping (convert/mapping.py) and the embedding resize (convert/resize.py).

Generated data (see ``tests/strategies.py``): plausible ORIGINAL ViP-LLaVA checkpoints as key -> shape dicts (no
tensor is allocated), 1-80 text layers, 11-48 vision layers, vocab 3-128256, with and without the legacy
buffers. Phi-3 based checkpoints (fused ``qkv_proj`` / ``gate_up_proj``) are not generated here; their mapping is
tested on the Phi-3 fixture in tests/test_backbones.py.

Every check compares against something derived without the rule table: the module tree of a meta-device
``VipLlavaForConditionalGeneration`` (``convert.layout.expected_shapes``) for the target names and shapes, the
hand-written original layout (``strategies.documented_original_keys``) for what is dropped
and what is foreign, and plain arithmetic / linear algebra for the resize.

The checks are plain functions taking a ``RuleTable`` (``assert_total(table, ...)`` ...): the ``@given`` tests
run them on the real table, the break tests run them on deliberately broken copies of ``RULES`` and expect them
to fail. Limitation, stated once: two targets of the SAME shape swapped (e.g. ``gate_proj`` <-> ``up_proj``)
keep every key and shape property true; only a value check (verify's logits comparison) sees that.

Found by these tests: ``resize`` seeded its generator with ``manual_seed(seed)`` and torch's CPU generator keeps only
the low 32 bits, so seeds s and s + 2**32 (and -1 and 2**32 - 1) silently gave the same rows and 2**64 raised a
bare ValueError; resize now refuses seeds outside [0, 2**32) (``test_seed_refused_or_its_own``).

Tiers: each property runs in the default run under the "ci" hypothesis profile and again, marked ``slow``,
under the "slow" profile (more examples; bigger matrices for the resize): ``pytest -m slow tests/test_properties.py``.
"""

from __future__ import annotations

import math
from collections import Counter
from functools import lru_cache

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from strategies import (
    EDGE_CHECKPOINTS,
    FEATURE_LAYERS,
    MIN_VISION_LAYERS,
    ORIGINAL_EMBED,
    ORIGINAL_LM_HEAD,
    VISION_LAYER_CHOICES,
    Checkpoint,
    EmbedSpec,
    checkpoints,
    documented_original_keys,
    embed_specs,
    feature_layer_positions,
    foreign_keys,
    legacy_buffer_keys,
    spec,
)

from convert.config import TokenIds, build_config, load_vipllava_config, padded_rows, vision_tower_config
from convert.errors import ConversionError
from convert.layout import expected_shapes
from convert.mapping import RULES, TABLE, RuleTable
from convert.resize import SCALE, resize, sample_new_rows
from verify.tiny import TinySpec, clip_config, original_config, vipllava_config

# ------------------------------------------------------------------------------------------
# tiers
# ------------------------------------------------------------------------------------------


def tiers(body, fast: dict, slow: dict | None = None):
    """(default test, slow test) running ``body`` under ``@given(**fast)`` with the active ("ci") profile and
    under ``@given(**(slow or fast))`` with the "slow" profile, marked ``slow``. ``@example``s on ``body``
    apply to both."""
    fast_test = given(**fast)(body)
    slow_test = pytest.mark.slow(settings(settings.get_profile("slow"))(given(**(slow or fast))(body)))
    return fast_test, slow_test


def edge_examples(fn=None, **other):
    """Pin the edge checkpoints (1 / 80 text layers, 11 / 48 vision layers, vocab 3 / 997 / 32000 / 128256,
    h > vocab, with / without legacy buffers, shuffled key order) on a ``body(ckpt, **other)``."""
    if fn is None:
        return lambda f: edge_examples(f, **other)
    for ckpt in EDGE_CHECKPOINTS:
        fn = example(ckpt=ckpt, **other)(fn)
    return fn


# ------------------------------------------------------------------------------------------
# independent expectations
# ------------------------------------------------------------------------------------------


@lru_cache(maxsize=32)
def expected_for(spec_: TinySpec) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape transformers expects, from the independently built ``VipLlavaConfig``."""
    return expected_shapes(vipllava_config(spec_))


def smallest_multiple_of_64_at_least(x: int) -> int:
    """By definition, by search (not the converter's ceiling formula)."""
    return next(r for r in range(x, x + 64) if r % 64 == 0)


# ------------------------------------------------------------------------------------------
# the properties, as plain functions of a table
# ------------------------------------------------------------------------------------------


def assert_total(table: RuleTable, keys) -> None:
    """Every key is mapped or dropped by a named drop rule; mapped + dropped partition the input; what is dropped
    is exactly the legacy buffers."""
    keys = list(keys)
    m = table.map_keys(keys)  # raises ConversionError when a key is unclaimed or claimed twice
    assert set(m.mapped).isdisjoint(m.dropped), "a key is both mapped and dropped"
    assert set(m.mapped) | set(m.dropped) == set(keys), "mapped + dropped does not cover the input"
    text_layers = len({k.split(".")[2] for k in keys if k.startswith("model.layers.")})
    legacy = {k for k in legacy_buffer_keys(text_layers) if k in set(keys)}
    differ = sorted(set(m.dropped) ^ legacy)[:5]
    assert set(m.dropped) == legacy, f"dropped {differ} differently from the documented legacy buffers"
    drop_rules = {r.name for r in table.rules if r.target is None}
    assert set(m.dropped.values()) <= drop_rules, "a dropped key does not name a drop rule"


def assert_rejects(table: RuleTable, keys, bad: str) -> None:
    """A key outside the original layout is refused with a ConversionError naming it (alone and among
    valid keys)."""
    with pytest.raises(ConversionError) as err:
        table.map_keys([*keys, bad])
    assert bad in str(err.value), f"the error does not name {bad!r}: {err.value}"
    with pytest.raises(ConversionError) as err:
        table.map_key(bad)
    assert bad in str(err.value), f"the error does not name {bad!r}: {err.value}"


def _targets(table: RuleTable, keys) -> dict[str, str]:
    return {k: t for k in keys if (t := table.map_key(k)) is not None}


def assert_injective(table: RuleTable, keys) -> None:
    counts = Counter(_targets(table, keys).values())
    dup = sorted(t for t, c in counts.items() if c > 1)
    assert not dup, f"several original keys map to {dup[:3]}"


def assert_exact(table: RuleTable, keys, expected: dict) -> None:
    """The mapped key set equals the one transformers' meta model has for the same config."""
    produced = set(_targets(table, keys).values())
    missing, extra = sorted(set(expected) - produced), sorted(produced - set(expected))
    assert not missing and not extra, f"missing {missing[:3]} ({len(missing)}), unexpected {extra[:3]} ({len(extra)})"


def assert_round_trip(table: RuleTable, keys, expected: dict) -> None:
    """inverse(map(k)) == k for every mapped key; map(inverse(t)) == t for every target transformers expects."""
    for k, t in _targets(table, keys).items():
        assert table.inverse_key(t) == k, f"{k} -> {t} -> {table.inverse_key(t)}"
    for t in expected:
        s = table.inverse_key(t)
        assert table.map_key(s) == t, f"{t} -> {s} -> {table.map_key(s)}"


@lru_cache(maxsize=None)
def _single_rule_table(rule: tuple) -> RuleTable:
    return RuleTable([rule])


def _claims(rule, key: str) -> bool:
    try:
        _single_rule_table((rule.name, rule.source, rule.target)).match(key)
    except ConversionError:
        return False
    return True


def assert_unique_claims(table: RuleTable, keys) -> None:
    """Each key is claimed by exactly one rule, each rule asked on its own (not through the table's lookup)."""
    for k in keys:
        names = [r.name for r in table.rules if _claims(r, k)]
        assert len(names) == 1, f"{k} is claimed by {names or 'no rule'}"


def _outcome(fn, arg):
    try:
        return ("ok", fn(arg))
    except ConversionError:
        return ("error", None)


def assert_order_independent(table: RuleTable, other: RuleTable, keys, expected: dict) -> None:
    """Two tables holding the same rules in different orders give the same result for every key and target."""
    for k in keys:
        assert _outcome(table.map_key, k) == _outcome(other.map_key, k), k
    for t in expected:
        assert _outcome(table.inverse_key, t) == _outcome(other.inverse_key, t), t
    a, b = _outcome(table.map_keys, list(keys)), _outcome(other.map_keys, list(keys))
    assert a[0] == b[0] and (a[1] is None or (a[1].mapped, a[1].dropped) == (b[1].mapped, b[1].dropped))


def assert_shapes(table: RuleTable, shapes: dict, expected: dict) -> None:
    """Each mapped tensor's shape (embed / lm_head rows padded) is the one transformers expects for its name."""
    for k, t in _targets(table, shapes).items():
        got = shapes[k]
        if k in (ORIGINAL_EMBED, ORIGINAL_LM_HEAD):
            got = (smallest_multiple_of_64_at_least(got[0] + 2), *got[1:])
        assert t in expected, f"{k} -> {t}, a name the model does not have"
        assert tuple(expected[t]) == tuple(got), f"{k} {got} -> {t}, which transformers expects as {expected[t]}"


# ------------------------------------------------------------------------------------------
# the generator itself
# ------------------------------------------------------------------------------------------


def test_minimum_vision_layers():
    """hidden_states has layers + 1 entries; -11 needs >= 11 entries, 6 needs > 6; distinctness rules out 10
    (-5 -> 6), 13 (-8 -> 6) and 16 (-11 -> 6). So 11 is the minimum, and 13, 16 are not generated."""
    assert MIN_VISION_LAYERS == 11
    assert feature_layer_positions(9) is None  # -11 is out of range for 10 hidden states
    assert sorted(feature_layer_positions(11)) == [1, 4, 6, 7, 10]
    for n in (10, 13, 16):
        pos = feature_layer_positions(n)
        assert pos is not None and len(set(pos)) == 4
        assert n not in VISION_LAYER_CHOICES
    # and against the real indexing: the positions are the ones a list of layers + 1 items picks
    for n in VISION_LAYER_CHOICES:
        states = list(range(n + 1))
        assert [states[i] for i in FEATURE_LAYERS] == feature_layer_positions(n)


@edge_examples
def _generator_matches_documented_layout(ckpt: Checkpoint):
    s = ckpt.spec
    assert set(ckpt.shapes) == documented_original_keys(s.text_layers, s.vision_layers, s.legacy_buffers)


test_generator_matches_documented_layout, test_generator_matches_documented_layout_slow = tiers(
    _generator_matches_documented_layout, dict(ckpt=checkpoints())
)


# ------------------------------------------------------------------------------------------
# 1. totality
# ------------------------------------------------------------------------------------------


@edge_examples
def _totality(ckpt: Checkpoint):
    assert_total(TABLE, ckpt.shapes)


test_totality, test_totality_slow = tiers(_totality, dict(ckpt=checkpoints()))


@example(ckpt=EDGE_CHECKPOINTS[6], data=None, bad="model.foo.weight")
@example(ckpt=EDGE_CHECKPOINTS[6], data=None, bad="model.layers.01.self_attn.q_proj.weight")
@example(ckpt=EDGE_CHECKPOINTS[6], data=None, bad="model.layers.1.self_attn.q_proj")
@example(ckpt=EDGE_CHECKPOINTS[6], data=None, bad="model.mm_projector.0.weight")
@example(ckpt=EDGE_CHECKPOINTS[6], data=None, bad="model.layers.1.self_attn.q_proj.bias")
@example(ckpt=EDGE_CHECKPOINTS[6], data=None, bad="language_model.model.embed_tokens.weight")
@example(
    ckpt=EDGE_CHECKPOINTS[6],
    data=None,
    bad="model.vision_tower.vision_tower.vision_model.encoder.layers.007.mlp.fc1.bias",
)
def _foreign_keys_rejected(ckpt: Checkpoint, data, bad):
    if bad is None:
        bad = data.draw(foreign_keys(ckpt.shapes), label="bad")
    assert_rejects(TABLE, ckpt.shapes, bad)


test_foreign_keys_rejected, test_foreign_keys_rejected_slow = tiers(
    _foreign_keys_rejected, dict(ckpt=checkpoints(max_text_layers=12), data=st.data(), bad=st.none())
)


# ------------------------------------------------------------------------------------------
# 2. injectivity, 3. exactness, 4. round trip, 7. shapes
# ------------------------------------------------------------------------------------------


@edge_examples
def _injective(ckpt: Checkpoint):
    assert_injective(TABLE, ckpt.shapes)


test_injective, test_injective_slow = tiers(_injective, dict(ckpt=checkpoints()))


@edge_examples
def _exact(ckpt: Checkpoint):
    assert_exact(TABLE, ckpt.shapes, expected_for(ckpt.spec))


test_exact, test_exact_slow = tiers(_exact, dict(ckpt=checkpoints()))


@edge_examples
def _round_trip(ckpt: Checkpoint):
    assert_round_trip(TABLE, ckpt.shapes, expected_for(ckpt.spec))


test_round_trip, test_round_trip_slow = tiers(_round_trip, dict(ckpt=checkpoints()))


@edge_examples
def _shapes(ckpt: Checkpoint):
    expected = expected_for(ckpt.spec)
    # the independent config pads the vocab to the smallest multiple of 64 >= n + 2
    rows = smallest_multiple_of_64_at_least(ckpt.spec.vocab_size + 2)
    assert expected["language_model.model.embed_tokens.weight"][0] == rows
    assert_shapes(TABLE, ckpt.shapes, expected)


test_shapes, test_shapes_slow = tiers(_shapes, dict(ckpt=checkpoints()))


@edge_examples
def _converter_config_expects_the_same_shapes(ckpt: Checkpoint):
    """The converter's own config path (build_config -> load_vipllava_config), which the pipeline checks shapes
    against, expects what the independently built VipLlavaConfig expects."""
    s = ckpt.spec
    vision = vision_tower_config(clip_config(s), "clip/config.json")
    cfg = build_config(original_config(s), vision, TokenIds(s.vocab_size, 1, 2), "bfloat16", "config.json")
    assert cfg["text_config"]["vocab_size"] == smallest_multiple_of_64_at_least(s.vocab_size + 2)
    assert (cfg["image_token_index"], cfg["pad_token_id"]) == (s.vocab_size, s.vocab_size + 1)
    assert expected_shapes(load_vipllava_config(cfg)) == expected_for(s)


test_converter_config_expects_the_same_shapes, test_converter_config_expects_the_same_shapes_slow = tiers(
    _converter_config_expects_the_same_shapes, dict(ckpt=checkpoints())
)


# ------------------------------------------------------------------------------------------
# 5. order independence
# ------------------------------------------------------------------------------------------


@edge_examples(rules=tuple(reversed(RULES)))
def _order_independent(ckpt: Checkpoint, rules):
    shuffled = RuleTable(rules)
    assert_unique_claims(shuffled, ckpt.shapes)
    assert_order_independent(TABLE, shuffled, ckpt.shapes, expected_for(ckpt.spec))


test_order_independent, test_order_independent_slow = tiers(
    _order_independent, dict(ckpt=checkpoints(), rules=st.permutations(RULES))
)


# ------------------------------------------------------------------------------------------
# deliberately broken tables: each makes at least one property fail
# ------------------------------------------------------------------------------------------


def _with_target(name: str, target: str) -> tuple:
    assert name in {r[0] for r in RULES}
    return tuple((n, s, target if n == name else t) for n, s, t in RULES)


_LM = "language_model.model.layers.{}."
BREAKS = {
    # (a) two rules claim one key
    "overlap": RULES + (("text.q_again", "model.layers.{}.self_attn.q_proj.weight", _LM + "self_attn.q_proj.weight"),),
    "overlap_drop": RULES + (("drop.norm", "model.norm.weight", None),),
    # (b) a drop rule missing
    "missing_inv_freq_drop": tuple(r for r in RULES if r[0] != "drop.rotary_inv_freq"),
    # (c) wrong targets / inverses
    "q_written_as_k": _with_target("text.q", _LM + "self_attn.k_proj.weight"),
    "shifted_layer_slot": _with_target("text.down", "language_model.model.layers.1{}.mlp.down_proj.weight"),
    "up_down_swapped": tuple(
        (n, s, {"text.up": _LM + "mlp.down_proj.weight", "text.down": _LM + "mlp.up_proj.weight"}.get(n, t))
        for n, s, t in RULES
    ),
}
# which properties each break violates on BREAK_EXAMPLE, reasoned from the break (not observed):
EXPECTED_FAILURES = {
    # a key claimed twice: map_keys refuses it, per-key lookups raise, the claim count is 2
    "overlap": {"total", "injective", "exact", "round_trip", "unique_claims", "shapes"},
    "overlap_drop": {"total", "injective", "exact", "round_trip", "unique_claims", "shapes"},
    # inv_freq unclaimed: every check that looks the key up raises; the target side (round trip from the
    # expected names) never meets inv_freq but the key side does
    "missing_inv_freq_drop": {"total", "injective", "exact", "round_trip", "unique_claims", "shapes"},
    # q and k both land on k_proj: not injective (map_keys checks that too, so totality refuses it), q_proj
    # never produced, inverse of k_proj ambiguous; shapes: q (heads*d x h) on k's name (kv*d x h)
    "q_written_as_k": {"total", "injective", "exact", "round_trip", "shapes"},
    # layer i -> "1i": names the model does not have; layers.0.mlp.down_proj has no producing rule
    "shifted_layer_slot": {"exact", "round_trip", "shapes"},
    # a bijection onto the right names, but up (I x h) lands on down (h x I): only shapes sees it
    "up_down_swapped": {"shapes"},
}
BREAK_EXAMPLE = Checkpoint(
    spec(text_layers=3, vision_layers=12, vocab=997, text_intermediate=24, legacy_buffers=True), 0
)


def _failing_properties(table: RuleTable, ckpt: Checkpoint) -> set[str]:
    shapes, expected = ckpt.shapes, expected_for(ckpt.spec)
    checks = {
        "total": lambda: assert_total(table, shapes),
        "injective": lambda: assert_injective(table, shapes),
        "exact": lambda: assert_exact(table, shapes, expected),
        "round_trip": lambda: assert_round_trip(table, shapes, expected),
        "unique_claims": lambda: assert_unique_claims(table, shapes),
        "shapes": lambda: assert_shapes(table, shapes, expected),
    }
    failing = set()
    for name, check in checks.items():
        try:
            check()
        except (AssertionError, ConversionError):
            failing.add(name)
    return failing


def test_real_table_passes_the_break_example():
    assert _failing_properties(TABLE, BREAK_EXAMPLE) == set()


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_broken_table_fails_a_property(name):
    broken = RuleTable(BREAKS[name])
    assert broken.rules != TABLE.rules
    assert _failing_properties(broken, BREAK_EXAMPLE) == EXPECTED_FAILURES[name]


def test_broken_tables_are_caught_by_hypothesis_too():
    """No pinned example needed: hypothesis finds a checkpoint exhibiting the missing drop rule."""
    from hypothesis import find

    broken = RuleTable(BREAKS["missing_inv_freq_drop"])

    def breaks(ckpt):
        try:
            assert_total(broken, ckpt.shapes)
        except ConversionError as e:
            return "inv_freq" in str(e)
        return False

    found = find(checkpoints(max_text_layers=4), breaks, settings=settings(max_examples=200, database=None))
    assert found.spec.legacy_buffers


def test_module_table_not_mutated():
    assert tuple((r.name, r.source, r.target) for r in TABLE.rules) == RULES


# ------------------------------------------------------------------------------------------
# 6. resize
# ------------------------------------------------------------------------------------------


@example(n=1)
@example(n=3)
@example(n=62)
@example(n=63)
@example(n=997)
@example(n=32000)
@example(n=32062)
@example(n=128256)
def _padded_rows(n: int):
    rows = padded_rows(n)
    assert rows == smallest_multiple_of_64_at_least(n + 2)
    assert rows % 64 == 0 and n + 2 <= rows < n + 2 + 64


test_padded_rows, test_padded_rows_slow = tiers(_padded_rows, dict(n=st.integers(1, 10**7)))


def _stats(e: torch.Tensor):
    """mu, tr(Sigma), tr(Sigma^2) of the rows, float64 (population covariance)."""
    x = e.to(torch.float64)
    mu = x.mean(0)
    c = x - mu
    sigma = c.T @ c / x.shape[0]
    return mu, torch.trace(sigma).item(), (sigma * sigma).sum().item()


_RESIZE_EXAMPLES = [
    EmbedSpec(n=3, h=64, rank=64, scale=0.5, offset=1.0, seed=0),  # h > n: singular
    EmbedSpec(n=1, h=16, rank=16, scale=1.0, offset=1.0, seed=1),  # one row: Sigma = 0
    EmbedSpec(n=997, h=64, rank=64, scale=0.02, offset=0.1, seed=2),
    EmbedSpec(n=2000, h=256, rank=8, scale=1.0, offset=0.0, seed=3),  # n > h but rank 8
    EmbedSpec(n=62, h=1, rank=1, scale=4.0, offset=1.0, seed=4),  # 62 + 2 = 64 rows exactly
    EmbedSpec(n=63, h=32, rank=32, scale=1e-3, offset=1.0, seed=5),  # 65 -> 128 rows, tiny spread
]


def _pin_resize(fn):
    for e in _RESIZE_EXAMPLES:
        fn = example(emb=e, dtype=torch.float32, seed=0)(fn)
    return example(emb=_RESIZE_EXAMPLES[2], dtype=torch.bfloat16, seed=7)(fn)


@_pin_resize
def _resize_keeps_rows_and_seeds(emb: EmbedSpec, dtype, seed: int):
    e = emb.build(dtype)
    head = EmbedSpec(emb.n, emb.h, emb.h, 1.0, 3.0, emb.seed + 1).build(dtype)  # its own, different mean
    rows = smallest_multiple_of_64_at_least(emb.n + 2)
    r = resize(e, head, padded_rows(emb.n), seed, dtype)
    assert (r.rows, r.original_rows) == (rows, emb.n)
    assert r.embed.shape == r.lm_head.shape == (rows, emb.h) and r.embed.dtype == r.lm_head.dtype == dtype
    # original rows bit for bit (compared as integers: no float equality subtleties)
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    assert torch.equal(r.embed[: emb.n].view(bits), e.view(bits))
    assert torch.equal(r.lm_head[: emb.n].view(bits), head.view(bits))
    new = torch.cat([r.embed[emb.n :], r.lm_head[emb.n :]]).to(torch.float64)
    assert torch.isfinite(new).all()
    # both matrices' new rows come from the EMBEDDING statistics: each within a chi-square tail bound of mu.
    # ||x - mu||^2 / tr(C) for x ~ N(mu, C) has a tail no heavier than chi2(1) above 1.54 (Szekely-Bakirov);
    # P(chi2_1 > 50) ~ 2e-12; the output rounding adds at most eps * ||x||.
    mu, tr, _ = _stats(e)
    eps = torch.finfo(dtype).eps
    dist = (new - mu).norm(dim=1)
    bound = math.sqrt(50 * SCALE * tr) + eps * new.norm(dim=1) + 1e-12
    assert (dist <= bound).all(), f"a new row is {dist.max():.3g} from mu (bound {bound.min():.3g})"
    # the same seed gives the same bits; a different seed different rows (when Sigma != 0)
    again = resize(e, head, rows, seed, dtype)
    assert torch.equal(again.embed, r.embed) and torch.equal(again.lm_head, r.lm_head)
    other = resize(e, head, rows, seed + 1, dtype)
    assert torch.equal(other.embed[: emb.n], r.embed[: emb.n])
    if tr > 0 and dtype == torch.float32:
        assert not torch.equal(other.embed[emb.n :], r.embed[emb.n :])
        assert not torch.equal(other.lm_head[emb.n :], r.lm_head[emb.n :])


test_resize_keeps_rows_and_seeds, test_resize_keeps_rows_and_seeds_slow = tiers(
    _resize_keeps_rows_and_seeds,
    dict(
        emb=embed_specs(),
        dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
        seed=st.integers(0, 2**31 - 1),
    ),
    dict(
        emb=embed_specs(max_n=32000, max_h=512),
        dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
        seed=st.integers(0, 2**31 - 1),
    ),
)


@example(seed=2**32)
@example(seed=2**32 - 1)
@example(seed=2**32 + 7)
@example(seed=-1)
@example(seed=2**64 - 1)
@example(seed=2**64)
def _seed_refused_or_its_own(seed: int):
    """A seed either gives its own rows or is refused by name; never silently the rows of another seed.
    torch's CPU generator keeps the low 32 bits, so exactly the seeds in [0, 2**32) can be honoured."""
    e = _RESIZE_EXAMPLES[2].build(torch.float32)
    n, rows = e.shape[0], padded_rows(e.shape[0])
    try:
        r = resize(e, e.clone(), rows, seed, torch.float32)
    except ConversionError as err:
        assert str(seed) in str(err)
        assert not 0 <= seed < 2**32, f"seed {seed} refused"
        return
    assert 0 <= seed < 2**32, f"seed {seed} accepted, but it gives the rows of seed {seed % 2**32}"
    assert torch.equal(r.embed[n:], resize(e, e.clone(), rows, seed, torch.float32).embed[n:])


test_seed_refused_or_its_own, test_seed_refused_or_its_own_slow = tiers(
    _seed_refused_or_its_own, dict(seed=st.one_of(st.integers(-(2**70), 2**70), st.integers(-3, 2**32 + 3)))
)


M = 1000  # new rows drawn for the statistics


@_pin_resize
def _new_rows_converge(emb: EmbedSpec, dtype, seed: int):
    """Mean of m new rows -> mu: x_bar - mu ~ N(0, 1e-5 Sigma / m), so ||x_bar - mu||^2 <= 25 * 1e-5 tr(Sigma) / m
    except with probability <= P(chi2_1 > 25) ~ 6e-7 (same tail bound as above). Scale: the mean of
    ||x - mu||^2 over m rows is 1e-5 tr(Sigma) with standard deviation 1e-5 sqrt(2 tr(Sigma^2) / m); 7 of them."""
    e = emb.build(dtype).to(torch.float32)
    mu, tr, tr2 = _stats(e)
    x = sample_new_rows(e, M, torch.Generator().manual_seed(seed))
    slack = 1e-10 * (1 + mu.norm().item())
    assert (x.mean(0) - mu).norm().item() <= 5 * math.sqrt(SCALE * tr / M) + slack
    msd = ((x - mu) ** 2).sum(1).mean().item()
    assert abs(msd - SCALE * tr) <= 7 * SCALE * math.sqrt(2 * tr2 / M) + slack


test_new_rows_converge, test_new_rows_converge_slow = tiers(
    _new_rows_converge,
    dict(emb=embed_specs(max_n=1500), dtype=st.just(torch.float32), seed=st.integers(0, 2**31 - 1)),
    dict(emb=embed_specs(max_n=8000, max_h=256), dtype=st.just(torch.float32), seed=st.integers(0, 2**31 - 1)),
)


def _residual_off_span(x: torch.Tensor, e: torch.Tensor):
    """Norms of the rows of x - mu after removing their component in span(E - mu), and of x - mu."""
    mu = e.to(torch.float64).mean(0)
    c = e.to(torch.float64) - mu
    _, s, vh = torch.linalg.svd(c, full_matrices=False)
    rank = int((s > s.max() * 1e-9).sum()) if s.numel() and s.max() > 0 else 0
    q = vh[:rank]
    d = x.to(torch.float64) - mu
    return (d - d @ q.T @ q).norm(dim=1), d.norm(dim=1), rank


@_pin_resize
def _singular_covariance_stays_in_span(emb: EmbedSpec, dtype, seed: int):
    """Sigma singular (h > n - 1, or rank < h): no crash, new rows in mu + span(E - mu)."""
    e = emb.build(torch.float32)
    x = sample_new_rows(e, 64, torch.Generator().manual_seed(seed))
    res, dist, rank = _residual_off_span(x, e)
    assert rank <= min(emb.n - 1, emb.rank, emb.h)
    mu_norm = e.to(torch.float64).mean(0).norm().item()
    assert (res <= 1e-9 * dist + 1e-12 * (1 + mu_norm)).all(), f"off-span residual {res.max():.3g}"
    # through resize (float32 output): rounding moves a row by at most eps32 * ||x||
    r = resize(e, e.clone(), padded_rows(emb.n), seed, torch.float32)
    new = torch.cat([r.embed[emb.n :], r.lm_head[emb.n :]])
    res, dist, _ = _residual_off_span(new, e)
    assert (res <= torch.finfo(torch.float32).eps * new.to(torch.float64).norm(dim=1) + 1e-12).all()


test_singular_covariance_stays_in_span, test_singular_covariance_stays_in_span_slow = tiers(
    _singular_covariance_stays_in_span,
    dict(
        emb=embed_specs().filter(lambda m: m.h > m.n - 1 or m.rank < m.h),
        dtype=st.just(torch.float32),
        seed=st.integers(0, 2**31 - 1),
    ),
    dict(
        emb=embed_specs(max_n=4000, max_h=384).filter(lambda m: m.h > m.n - 1 or m.rank < m.h),
        dtype=st.just(torch.float32),
        seed=st.integers(0, 2**31 - 1),
    ),
)
