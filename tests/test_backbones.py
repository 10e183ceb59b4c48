"""The three backbones: detection, chat templates that reproduce the original prompts byte for byte, the token
layout, and (per backbone) convert + ``python -m verify`` with every check passing on the tiny fixture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from convert.backbones import BACKBONES, LLAMA3, PHI3, VICUNA, detect
from convert.config import TokenIds
from convert.errors import ConversionError

# Produced by running the ORIGINAL llava/conversation.py (provenance in tests/original_prompts.json): (a) user
# "<image>\nWhat is shown?", assistant None; (b) the same, assistant "A cat.", user "What colour?", assistant None.
ORIGINAL_PROMPTS = {
    (mode, case): text
    for mode, cases in json.loads((Path(__file__).with_name("original_prompts.json")).read_text())["prompts"].items()
    for case, text in cases.items()
}
_IMAGE_Q = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}
CONVERSATIONS = {
    "a": [_IMAGE_Q],
    "b": [
        _IMAGE_Q,
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "What colour?"}]},
    ],
}


@pytest.mark.parametrize("name", sorted(BACKBONES))
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
def test_chat_template_reproduces_the_original_prompt(name, conv):
    b = BACKBONES[name]
    assert b.render(CONVERSATIONS[conv]) == ORIGINAL_PROMPTS[(b.conv_mode, conv)]


def test_chat_template_through_transformers_is_the_same_text():
    """The sandboxed renderer we use for the card is what transformers' apply_chat_template gives."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"x": 0}, unk_token="x")), eos_token="</s>"
    )
    for b in BACKBONES.values():
        for conv, messages in CONVERSATIONS.items():
            got = tok.apply_chat_template(
                messages, chat_template=b.chat_template, add_generation_prompt=True, tokenize=False
            )
            assert got == ORIGINAL_PROMPTS[(b.conv_mode, conv)], (b.name, conv)


@pytest.mark.parametrize(
    "model_type, vocab, forced, want",
    [
        ("llava_llama", {"<s>": 1}, None, "vicuna"),
        ("llava_llama", {"<|begin_of_text|>": 0, "<|eot_id|>": 9}, None, "llama3"),
        ("llava_phi3", {"<|end|>": 4}, None, "phi3"),
        ("llava_llama", {"<s>": 1}, "vicuna", "vicuna"),
        ("llava_llama", {"<|eot_id|>": 9}, "auto", "llama3"),
    ],
)
def test_detect(model_type, vocab, forced, want):
    assert detect({"model_type": model_type}, vocab, "config.json", forced).name == want


@pytest.mark.parametrize(
    "model_type, forced, words",
    [
        ("llava_mistral", None, ["'llava_mistral'", "llava_llama", "llava_phi3"]),
        ("llava_llama", "phi3", ["'llava_llama'", "--backbone phi3", "'llava_phi3'"]),
        ("llava_phi3", "llama3", ["'llava_phi3'", "--backbone llama3"]),
    ],
)
def test_detect_refuses(model_type, forced, words):
    with pytest.raises(ConversionError) as e:
        detect({"model_type": model_type}, {}, "x/config.json", forced)
    assert all(w in str(e.value) for w in words) and str(e.value).startswith("x/config.json")


@pytest.mark.parametrize(
    "rows, tokens, image, pad, padded",
    [
        (32000, None, 32000, 32001, 32064),
        (128256, None, 128256, 128257, 128320),
        (32064, 32011, 32011, 32012, 32064),
        (32064, 32063, 32063, 32064, 32128),
        (997, None, 997, 998, 1024),
    ],
)
def test_token_layout(rows, tokens, image, pad, padded):
    ids = TokenIds(vocab=rows, bos=1, eos=2, tokens=tokens)
    assert (ids.image, ids.pad, ids.rows) == (image, pad, padded)
    assert ids.rows % 64 == 0 and ids.rows >= max(rows, ids.pad + 1)


def test_backbone_tables_differ_only_in_the_decoder_projections():
    from convert.mapping import rules_for

    v, p = set(rules_for(VICUNA.layer_rules)), set(rules_for(PHI3.layer_rules))
    assert {r[0] for r in v - p} == {"text.q", "text.k", "text.v", "text.gate", "text.up"}
    assert {r[0] for r in p - v} == {"text.qkv", "text.gate_up"}
    assert rules_for(LLAMA3.layer_rules) == rules_for(VICUNA.layer_rules)


# --------------------------------------------------------------------------------------------------------------
# end to end on each backbone's tiny fixture: convert (the CLI, auto-detected) then `python -m verify`
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(params=["llama3", "phi3"])
def variant(request, backbone_pair):
    """(name, fixture paths, repo): the session's tiny fixture of the backbone, converted by the CLI (auto-detected)."""
    fx, out = backbone_pair(request.param)
    return request.param, fx, out


def test_variant_converts_with_its_layout(variant):
    name, fx, out = variant
    b = BACKBONES[name]
    cfg = json.loads((out / "config.json").read_text())
    m = json.loads((out / "conversion.json").read_text())
    tok_cfg = json.loads((fx.text_model / "tokenizer_config.json").read_text())
    base = json.loads((fx.text_model / "tokenizer.json").read_text())
    tokens = len(base["model"]["vocab"]) + len(
        [t for t in base["added_tokens"] if t["content"] not in base["model"]["vocab"]]
    )
    rows = json.loads((fx.original / "config.json").read_text())["vocab_size"]
    assert m["settings"]["backbone"] == name
    assert cfg["text_config"]["model_type"] == b.text_model_type
    assert (cfg["image_token_index"], cfg["pad_token_id"]) == (tokens, tokens + 1)
    assert cfg["text_config"]["vocab_size"] == max(rows, -(-(tokens + 2) // 64) * 64)
    gen = json.loads((out / "generation_config.json").read_text())
    vocab = {t["content"]: t["id"] for t in base["added_tokens"]}
    eos = gen["eos_token_id"]
    assert vocab[b.stop_tokens[0]] == eos[0] and vocab[tok_cfg["eos_token"]] in eos
    template = json.loads((out / "chat_template.json").read_text())["chat_template"]
    assert template == b.chat_template


def test_variant_verifies(variant):
    """Every check of `python -m verify` passes, including logits and generation parity against the reference
    and the chat template reproducing the original prompt strings."""
    from verify.api import verify_repo

    name, _, out = variant
    report = verify_repo(out, progress=False, max_new_tokens=4)
    # tokenizer_era is N/A for Llama-3 / Phi-3 (their original ran the fast tokenizer: one tokenization in every era)
    expected_na = {"tokenizer_era"} if name in ("llama3", "phi3") else set()
    failed = [
        (c.name, c.status, c.summary) for c in report.checks if c.status != ("N/A" if c.name in expected_na else "PASS")
    ]
    assert not failed, failed
    names = {c.name for c in report.checks}
    assert {"logits", "generation", "chat_template", "processor", "strict_load", "resize", "mapping", "files"} <= names


def test_backbone_flag_contradicting_the_config_is_refused(tiny, tmp_path, capsys):
    from tests.conftest import run_convert

    out = tmp_path / "out"
    assert run_convert(tiny, out, "--backbone", "phi3") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--backbone phi3" in err and "'llava_llama'" in err and "config.json" in err
    assert not out.exists() and not any(p.name.startswith(".vipllava-tmp") for p in tmp_path.iterdir())


def test_demo_with_a_backbone_converts_that_backbones_fixture(tmp_path, monkeypatch):
    """`python -m convert --demo DIR --backbone phi3` builds (into a private cache here) and converts the Phi-3
    fixture."""
    from convert.cli import main

    monkeypatch.setenv("VIPLLAVA_HARNESS_CACHE", str(tmp_path / "cache"))
    assert main(["--demo", str(tmp_path / "out"), "--backbone", "phi3", "--quiet"]) == 0
    m = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert m["settings"]["backbone"] == "phi3" and "phi3" in m["inputs"]["original"]["path"]
