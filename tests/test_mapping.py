"""Property-based tests of the key mapping (convert/mapping.py).

Generated data (see ``tests/strategies.py``): plausible ORIGINAL ViP-LLaVA checkpoints as key -> shape dicts (no
tensor is allocated), 1-80 text layers, 11-48 vision layers, vocab 3-128256, with and without the legacy
buffers. Every property runs once per backbone (``backbone`` parameter: vicuna, llama3, phi3): the drawn
checkpoint is put on that backbone's layout (Phi-3: fused ``qkv_proj`` / ``gate_up_proj``) and checked against
the table the converter uses for it (``table_for(BACKBONES[backbone].layer_rules)``, as convert/pipeline.py).

Every check compares against something derived without the rule table: the module tree of a meta-device
``VipLlavaForConditionalGeneration`` (``convert.layout.expected_shapes``) for the target names and shapes, and the
hand-written original layout (``strategies.documented_original_keys``) for what is dropped and what is foreign.

The checks are plain functions taking a ``RuleTable`` (``assert_total(table, ...)`` ...): the ``@given`` tests
run them on the real table, the break tests run them on deliberately broken copies of ``RULES`` and expect them
to fail. Limitation, stated once: two targets of the SAME shape swapped (e.g. ``gate_proj`` <-> ``up_proj``)
keep every key and shape property true; only a value check (verify's logits comparison) sees that.

Tiers: each property runs in the default run under the "ci" hypothesis profile (``test_x``) and again, marked
``slow``, under the "slow" profile (``test_x_slow``): ``pytest -m slow tests/test_mapping.py``.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from strategies import (
    BACKBONE_NAMES,
    EDGE_CHECKPOINTS,
    FEATURE_LAYERS,
    MIN_VISION_LAYERS,
    ORIGINAL_EMBED,
    ORIGINAL_LM_HEAD,
    VISION_LAYER_CHOICES,
    Checkpoint,
    checkpoints,
    documented_original_keys,
    edge_examples,
    expected_for,
    feature_layer_positions,
    foreign_keys,
    legacy_buffer_keys,
    slow_tier,
    smallest_multiple_of_64_at_least,
    spec,
)

from convert.backbones import BACKBONES
from convert.errors import ConversionError
from convert.mapping import RULES, TABLE, RuleTable, rules_for, table_for

# the slow twins run per backbone: 200 examples each, the 600 of the single-table era in total
SLOW_PER_BACKBONE = 200


def table_of(backbone: str) -> RuleTable:
    """The table the converter applies to ``backbone``'s checkpoints."""
    return table_for(BACKBONES[backbone].layer_rules)


def rules_of(backbone: str) -> tuple[tuple[str, str, str | None], ...]:
    return rules_for(BACKBONES[backbone].layer_rules)


def test_backbone_names_are_the_converters():
    assert set(BACKBONE_NAMES) == set(BACKBONES)


per_backbone = pytest.mark.parametrize("backbone", BACKBONE_NAMES)

# ------------------------------------------------------------------------------------------
# the properties, as plain functions of a table
# ------------------------------------------------------------------------------------------


def assert_total(table: RuleTable, keys, backbone: str) -> None:
    """Every key is mapped or dropped by a named drop rule; mapped + dropped partition the input; what is dropped
    is exactly ``backbone``'s legacy buffers."""
    keys = list(keys)
    m = table.map_keys(keys)  # raises ConversionError when a key is unclaimed or claimed twice
    assert set(m.mapped).isdisjoint(m.dropped), "a key is both mapped and dropped"
    assert set(m.mapped) | set(m.dropped) == set(keys), "mapped + dropped does not cover the input"
    text_layers = len({k.split(".")[2] for k in keys if k.startswith("model.layers.")})
    legacy = {k for k in legacy_buffer_keys(text_layers, backbone) if k in set(keys)}
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


def _generator_matches_documented_layout(ckpt: Checkpoint, backbone: str):
    s = ckpt.on(backbone).spec
    documented = documented_original_keys(s.text_layers, s.vision_layers, s.legacy_buffers, backbone)
    assert set(ckpt.on(backbone).shapes) == documented


@per_backbone
@given(ckpt=checkpoints())
@edge_examples
def test_generator_matches_documented_layout(ckpt: Checkpoint, backbone: str):
    _generator_matches_documented_layout(ckpt, backbone)


@slow_tier(max_examples=SLOW_PER_BACKBONE)
@per_backbone
@given(ckpt=checkpoints())
@edge_examples
def test_generator_matches_documented_layout_slow(ckpt: Checkpoint, backbone: str):
    _generator_matches_documented_layout(ckpt, backbone)


# ------------------------------------------------------------------------------------------
# 1. totality
# ------------------------------------------------------------------------------------------


def _totality(ckpt: Checkpoint, backbone: str):
    assert_total(table_of(backbone), ckpt.on(backbone).shapes, backbone)


@per_backbone
@given(ckpt=checkpoints())
@edge_examples
def test_totality(ckpt: Checkpoint, backbone: str):
    _totality(ckpt, backbone)


@slow_tier(max_examples=SLOW_PER_BACKBONE)
@per_backbone
@given(ckpt=checkpoints())
@edge_examples
def test_totality_slow(ckpt: Checkpoint, backbone: str):
    _totality(ckpt, backbone)


_FOREIGN_EXAMPLES = (
    "model.foo.weight",
    "model.layers.01.self_attn.q_proj.weight",
    "model.layers.1.self_attn.q_proj",
    "model.mm_projector.0.weight",
    "model.layers.1.self_attn.q_proj.bias",
    "language_model.model.embed_tokens.weight",
    "model.vision_tower.vision_tower.vision_model.encoder.layers.007.mlp.fc1.bias",
)


def _pin_foreign(fn):
    """Pin the hand-picked foreign keys on the 7th edge checkpoint."""
    for bad in _FOREIGN_EXAMPLES:
        fn = example(ckpt=EDGE_CHECKPOINTS[6], data=None, bad=bad)(fn)
    return fn


def _foreign_keys_rejected(ckpt: Checkpoint, backbone: str, data, bad):
    shapes = ckpt.on(backbone).shapes
    if bad is None:
        bad = data.draw(foreign_keys(shapes, backbone), label="bad")
    assert_rejects(table_of(backbone), shapes, bad)


@per_backbone
@given(ckpt=checkpoints(max_text_layers=12), data=st.data(), bad=st.none())
@_pin_foreign
def test_foreign_keys_rejected(ckpt: Checkpoint, backbone: str, data, bad):
    _foreign_keys_rejected(ckpt, backbone, data, bad)


@slow_tier(max_examples=SLOW_PER_BACKBONE)
@per_backbone
@given(ckpt=checkpoints(max_text_layers=12), data=st.data(), bad=st.none())
@_pin_foreign
def test_foreign_keys_rejected_slow(ckpt: Checkpoint, backbone: str, data, bad):
    _foreign_keys_rejected(ckpt, backbone, data, bad)


def test_phi3_refuses_the_llama_projections():
    """Phi-3's table has no rule for split q/k/v or gate/up (the converter does not split fused tensors)."""
    shapes = EDGE_CHECKPOINTS[6].on("phi3").shapes
    for bad in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        assert_rejects(table_of("phi3"), shapes, bad)


# ------------------------------------------------------------------------------------------
# 2. injectivity, 3. exactness, 4. round trip, 7. shapes
# ------------------------------------------------------------------------------------------


def _injective(ckpt: Checkpoint, backbone: str):
    assert_injective(table_of(backbone), ckpt.on(backbone).shapes)


@per_backbone
@given(ckpt=checkpoints())
@edge_examples
def test_injective(ckpt: Checkpoint, backbone: str):
    _injective(ckpt, backbone)


@slow_tier(max_examples=SLOW_PER_BACKBONE)
@per_backbone
@given(ckpt=checkpoints())
@edge_examples
def test_injective_slow(ckpt: Checkpoint, backbone: str):
    _injective(ckpt, backbone)


def _exact(ckpt: Checkpoint, backbone: str):
    ckpt = ckpt.on(backbone)
    assert_exact(table_of(backbone), ckpt.shapes, expected_for(ckpt.spec))


@per_backbone
@given(ckpt=checkpoints())
@edge_examples
def test_exact(ckpt: Checkpoint, backbone: str):
    _exact(ckpt, backbone)


@slow_tier(max_examples=SLOW_PER_BACKBONE)
@per_backbone
@given(ckpt=checkpoints())
@edge_examples
def test_exact_slow(ckpt: Checkpoint, backbone: str):
    _exact(ckpt, backbone)


def _round_trip(ckpt: Checkpoint, backbone: str):
    ckpt = ckpt.on(backbone)
    assert_round_trip(table_of(backbone), ckpt.shapes, expected_for(ckpt.spec))


@per_backbone
@given(ckpt=checkpoints())
@edge_examples
def test_round_trip(ckpt: Checkpoint, backbone: str):
    _round_trip(ckpt, backbone)


@slow_tier(max_examples=SLOW_PER_BACKBONE)
@per_backbone
@given(ckpt=checkpoints())
@edge_examples
def test_round_trip_slow(ckpt: Checkpoint, backbone: str):
    _round_trip(ckpt, backbone)


def _shapes(ckpt: Checkpoint, backbone: str):
    ckpt = ckpt.on(backbone)
    expected = expected_for(ckpt.spec)
    # the independent config pads the vocab to the smallest multiple of 64 >= n + 2
    rows = smallest_multiple_of_64_at_least(ckpt.spec.vocab_size + 2)
    assert expected["language_model.model.embed_tokens.weight"][0] == rows
    assert_shapes(table_of(backbone), ckpt.shapes, expected)


@per_backbone
@given(ckpt=checkpoints())
@edge_examples
def test_shapes(ckpt: Checkpoint, backbone: str):
    _shapes(ckpt, backbone)


@slow_tier(max_examples=SLOW_PER_BACKBONE)
@per_backbone
@given(ckpt=checkpoints())
@edge_examples
def test_shapes_slow(ckpt: Checkpoint, backbone: str):
    _shapes(ckpt, backbone)


# ------------------------------------------------------------------------------------------
# 5. order independence
# ------------------------------------------------------------------------------------------


def _order_independent(ckpt: Checkpoint, backbone: str, data):
    """``data`` draws a permutation of the backbone's rules; None (the pinned examples) takes them reversed."""
    ckpt, rules = ckpt.on(backbone), rules_of(backbone)
    order = tuple(reversed(rules)) if data is None else data.draw(st.permutations(rules), label="rules")
    shuffled = RuleTable(order)
    assert_unique_claims(shuffled, ckpt.shapes)
    assert_order_independent(table_of(backbone), shuffled, ckpt.shapes, expected_for(ckpt.spec))


@per_backbone
@given(ckpt=checkpoints(), data=st.data())
@edge_examples(data=None)
def test_order_independent(ckpt: Checkpoint, backbone: str, data):
    _order_independent(ckpt, backbone, data)


@slow_tier(max_examples=SLOW_PER_BACKBONE)
@per_backbone
@given(ckpt=checkpoints(), data=st.data())
@edge_examples(data=None)
def test_order_independent_slow(ckpt: Checkpoint, backbone: str, data):
    _order_independent(ckpt, backbone, data)


# ------------------------------------------------------------------------------------------
# deliberately broken tables: each makes at least one property fail
# ------------------------------------------------------------------------------------------


def _with_target(name: str, target: str, rules: tuple = RULES) -> tuple:
    assert name in {r[0] for r in rules}
    return tuple((n, s, target if n == name else t) for n, s, t in rules)


def _swapped_targets(a: str, b: str, rules: tuple = RULES) -> tuple:
    """``rules`` with the targets of rules ``a`` and ``b`` exchanged."""
    target = {n: t for n, _, t in rules}
    return _with_target(a, target[b], _with_target(b, target[a], rules))


_LM = "language_model.model.layers.{}."
_PHI3_RULES = rules_of("phi3")
BREAKS = {  # name -> (backbone, broken copy of its table)
    # (a) two rules claim one key
    "overlap": (
        "vicuna",
        RULES + (("text.q_again", "model.layers.{}.self_attn.q_proj.weight", _LM + "self_attn.q_proj.weight"),),
    ),
    "overlap_drop": ("vicuna", RULES + (("drop.norm", "model.norm.weight", None),)),
    # (b) a drop rule missing
    "missing_inv_freq_drop": ("vicuna", tuple(r for r in RULES if r[0] != "drop.rotary_inv_freq")),
    # (c) wrong targets / inverses
    "q_written_as_k": ("vicuna", _with_target("text.q", _LM + "self_attn.k_proj.weight")),
    "shifted_layer_slot": ("vicuna", _with_target("text.down", "language_model.model.layers.1{}.mlp.down_proj.weight")),
    "up_down_swapped": ("vicuna", _swapped_targets("text.up", "text.down")),
    # (d) the same kinds of mistakes in Phi-3's fused rules
    "phi3_qkv_written_as_o": ("phi3", _with_target("text.qkv", _LM + "self_attn.o_proj.weight", _PHI3_RULES)),
    "phi3_qkv_given_llamas_name": ("phi3", _with_target("text.qkv", _LM + "self_attn.q_proj.weight", _PHI3_RULES)),
    "phi3_gate_up_down_swapped": ("phi3", _swapped_targets("text.gate_up", "text.down", _PHI3_RULES)),
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
    # qkv and o both land on o_proj: as q_written_as_k; shapes: qkv ((heads+2kv)*d x h) on o's name (h x h)
    "phi3_qkv_written_as_o": {"total", "injective", "exact", "round_trip", "shapes"},
    # qkv -> q_proj, a name Phi3 does not have: one claim per key and injective, but qkv_proj is never produced
    "phi3_qkv_given_llamas_name": {"exact", "round_trip", "shapes"},
    # a bijection onto the right names, gate_up (2I x h) on down (h x I): only shapes sees it
    "phi3_gate_up_down_swapped": {"shapes"},
}
BREAK_EXAMPLE = Checkpoint(
    spec(text_layers=3, vision_layers=12, vocab=997, text_intermediate=24, legacy_buffers=True), 0
)


def _failing_properties(table: RuleTable, ckpt: Checkpoint) -> set[str]:
    shapes, expected, backbone = ckpt.shapes, expected_for(ckpt.spec), ckpt.spec.backbone
    checks = {
        "total": lambda: assert_total(table, shapes, backbone),
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


@per_backbone
def test_real_table_passes_the_break_example(backbone):
    assert _failing_properties(table_of(backbone), BREAK_EXAMPLE.on(backbone)) == set()


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_broken_table_fails_a_property(name):
    backbone, rules = BREAKS[name]
    broken = RuleTable(rules)
    assert broken.rules != table_of(backbone).rules
    assert _failing_properties(broken, BREAK_EXAMPLE.on(backbone)) == EXPECTED_FAILURES[name]


def test_broken_tables_are_caught_by_hypothesis_too():
    """No pinned example needed: hypothesis finds a checkpoint exhibiting the missing drop rule."""
    from hypothesis import find

    broken = RuleTable(BREAKS["missing_inv_freq_drop"][1])

    def breaks(ckpt):
        try:
            assert_total(broken, ckpt.shapes, "vicuna")
        except ConversionError as e:
            return "inv_freq" in str(e)
        return False

    found = find(checkpoints(max_text_layers=4), breaks, settings=settings(max_examples=200, database=None))
    assert found.spec.legacy_buffers


@per_backbone
def test_module_table_not_mutated(backbone):
    assert tuple((r.name, r.source, r.target) for r in TABLE.rules) == RULES
    assert tuple((r.name, r.source, r.target) for r in table_of(backbone).rules) == rules_of(backbone)
