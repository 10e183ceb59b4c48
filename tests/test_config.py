"""Tests of the converted config (convert/config.py): the padded row count and the shapes the converter's own
config path expects, against independent expectations (by search, and a ``VipLlavaConfig`` built without the
converter). Hypothesis tiers as in tests/test_mapping.py (``test_x`` under the "ci" profile, ``test_x_slow``
marked ``slow``).
"""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st
from strategies import (
    Checkpoint,
    checkpoints,
    edge_examples,
    expected_for,
    slow_tier,
    smallest_multiple_of_64_at_least,
)

from convert.config import TokenIds, build_config, load_vipllava_config, padded_rows, vision_tower_config
from convert.layout import expected_shapes
from verify.tiny import clip_config, original_config


def _pin_padded_rows(fn):
    """Pin the row counts at and around the multiples of 64 and the real vocabularies."""
    for n in (1, 3, 62, 63, 997, 32000, 32062, 128256):
        fn = example(n=n)(fn)
    return fn


def _padded_rows(n: int):
    rows = padded_rows(n)
    assert rows == smallest_multiple_of_64_at_least(n + 2)
    assert rows % 64 == 0 and n + 2 <= rows < n + 2 + 64


@given(n=st.integers(1, 10**7))
@_pin_padded_rows
def test_padded_rows(n: int):
    _padded_rows(n)


@slow_tier
@given(n=st.integers(1, 10**7))
@_pin_padded_rows
def test_padded_rows_slow(n: int):
    _padded_rows(n)


def _converter_config_expects_the_same_shapes(ckpt: Checkpoint):
    """The converter's own config path (build_config -> load_vipllava_config), which the pipeline checks shapes
    against, expects what the independently built VipLlavaConfig expects."""
    s = ckpt.spec
    vision = vision_tower_config(clip_config(s), "clip/config.json")
    cfg = build_config(original_config(s), vision, TokenIds(s.vocab_size, 1, 2), "bfloat16", "config.json")
    assert cfg["text_config"]["vocab_size"] == smallest_multiple_of_64_at_least(s.vocab_size + 2)
    assert (cfg["image_token_index"], cfg["pad_token_id"]) == (s.vocab_size, s.vocab_size + 1)
    assert expected_shapes(load_vipllava_config(cfg)) == expected_for(s)


@given(ckpt=checkpoints())
@edge_examples
def test_converter_config_expects_the_same_shapes(ckpt: Checkpoint):
    _converter_config_expects_the_same_shapes(ckpt)


@slow_tier
@given(ckpt=checkpoints())
@edge_examples
def test_converter_config_expects_the_same_shapes_slow(ckpt: Checkpoint):
    _converter_config_expects_the_same_shapes(ckpt)
