"""The plan (convert/plan.py): which output tensor comes from which input, in which dtype and shape, and how.

It is pure, so these tests give it records and positions only, no checkpoint."""

from __future__ import annotations

import pytest
import torch

from convert.errors import ConversionError
from convert.mapping import EMBED_KEY, LM_HEAD_KEY, KeyMapping, table_for
from convert.plan import ORIGINAL_EMBED, ORIGINAL_LM_HEAD, choose_dtypes, plan
from convert.sources import TensorInfo

BF16, F32 = torch.bfloat16, torch.float32


def _inputs(head_dtype=BF16):
    infos = {
        ORIGINAL_EMBED: TensorInfo(BF16, (100, 8)),
        ORIGINAL_LM_HEAD: TensorInfo(head_dtype, (100, 8)),
        "model.layers.0.self_attn.q_proj.weight": TensorInfo(BF16, (8, 8)),
        "model.norm.weight": TensorInfo(F32, (8,)),
        "model.layers.0.self_attn.rotary_emb.inv_freq": TensorInfo(F32, (4,)),
    }
    mapping = table_for().map_keys(list(infos))
    spans, pos = {}, 0
    for k, info in infos.items():
        spans[k] = (pos, pos + info.nbytes)
        pos += info.nbytes + 64  # pickle records between tensors
    return mapping, infos, spans


def test_auto_copies_stored_bytes_and_resizes_the_two_matrices():
    mapping, infos, spans = _inputs()
    dtypes = choose_dtypes("auto", infos[ORIGINAL_EMBED], infos[ORIGINAL_LM_HEAD])
    entries = {t.target: t for t in plan(mapping, infos, spans, dtypes, rows=128)}
    assert set(entries) == set(mapping.mapped.values())  # every mapped tensor once; the dropped buffer not at all
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in mapping.dropped
    for key in (EMBED_KEY, LM_HEAD_KEY):
        assert entries[key].how == "resized" and entries[key].shape == (128, 8) and entries[key].dtype == BF16
    q = entries["language_model.model.layers.0.self_attn.q_proj.weight"]
    assert (q.how, q.dtype, q.span, q.source) == (
        "verbatim",
        BF16,
        spans["model.layers.0.self_attn.q_proj.weight"],
        "model.layers.0.self_attn.q_proj.weight",
    )
    norm = entries["language_model.model.norm.weight"]
    assert (norm.how, norm.dtype) == ("verbatim", F32)  # auto keeps each tensor's own dtype


def test_a_named_dtype_casts_what_differs_and_copies_what_matches():
    mapping, infos, spans = _inputs()
    dtypes = choose_dtypes("bfloat16", infos[ORIGINAL_EMBED], infos[ORIGINAL_LM_HEAD])
    entries = {t.target: t for t in plan(mapping, infos, spans, dtypes, rows=128)}
    assert entries["language_model.model.norm.weight"].how == "load"  # float32 stored, bfloat16 asked
    assert entries["language_model.model.norm.weight"].dtype == BF16
    assert entries["language_model.model.layers.0.self_attn.q_proj.weight"].how == "verbatim"


def test_without_a_stream_position_a_tensor_is_loaded():
    mapping, infos, spans = _inputs()
    spans["model.layers.0.self_attn.q_proj.weight"] = None  # e.g. a non-contiguous storage view in a pickle
    dtypes = choose_dtypes("auto", infos[ORIGINAL_EMBED], infos[ORIGINAL_LM_HEAD])
    entries = {t.target: t for t in plan(mapping, infos, spans, dtypes, rows=100)}
    assert entries["language_model.model.layers.0.self_attn.q_proj.weight"].how == "load"


def test_auto_keeps_a_head_stored_in_another_dtype():
    mapping, infos, spans = _inputs(head_dtype=F32)
    dtypes = choose_dtypes("auto", infos[ORIGINAL_EMBED], infos[ORIGINAL_LM_HEAD])
    assert (dtypes.embed, dtypes.head) == (BF16, F32)
    entries = {t.target: t for t in plan(mapping, infos, spans, dtypes, rows=128)}
    assert entries[LM_HEAD_KEY].dtype == F32 and entries[EMBED_KEY].dtype == BF16
    named = choose_dtypes("float16", infos[ORIGINAL_EMBED], infos[ORIGINAL_LM_HEAD])
    assert (named.embed, named.head) == (torch.float16, torch.float16)


def test_an_integer_embedding_is_refused_naming_the_key():
    with pytest.raises(
        ConversionError, match=r"model\.embed_tokens\.weight: stored as torch\.int8; expected a floating"
    ):
        choose_dtypes("auto", TensorInfo(torch.int8, (10, 4)), TensorInfo(BF16, (10, 4)))


def test_the_plan_is_deterministic_and_follows_the_mapping_order():
    mapping, infos, spans = _inputs()
    dtypes = choose_dtypes("auto", infos[ORIGINAL_EMBED], infos[ORIGINAL_LM_HEAD])
    a = plan(mapping, infos, spans, dtypes, rows=128)
    assert a == plan(KeyMapping(dict(mapping.mapped), dict(mapping.dropped)), infos, spans, dtypes, rows=128)
    assert [t.source for t in a] == list(mapping.mapped)
