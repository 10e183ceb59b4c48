"""The converted generation config suppresses every id the original could never emit ([T, rows): the original
resized its embeddings to ``len(tokenizer)`` at load), and verify's strict_load check fails when it does not.
verify's tokenizer_era outcome: a non-legacy Vicuna tokenizer whose 4.31-era ids differ is reported (WARN, with
counts), never FAILed and never passed silently."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from convert.config import TokenIds, generation_config, suppressed_ids
from fixtures.build import sample_images, sample_prompts
from verify.api import verify_repo

PROMPTS = [p for p in sample_prompts() if p["name"] == "text_only"]


@pytest.mark.parametrize(
    "vocab,tokens,first,last",
    [
        (32000, None, 32000, 32063),  # Vicuna: <image>, <pad> and 62 sampled rows
        (32064, 32011, 32011, 32063),  # Phi-3: the base tokenizer's 32011 tokens in 32064 rows
        (128256, None, 128256, 128319),  # Llama-3
    ],
)
def test_suppressed_ids_are_every_id_from_the_base_tokenizer_length_to_the_rows(vocab, tokens, first, last):
    ids = TokenIds(vocab=vocab, bos=1, eos=2, tokens=tokens)
    assert suppressed_ids(ids) == list(range(first, last + 1))
    assert generation_config(ids)["suppress_tokens"] == list(range(first, last + 1))


def test_converted_repo_suppresses_exactly_t_to_rows(converted):
    gen = json.loads((converted / "generation_config.json").read_text())
    cfg = json.loads((converted / "config.json").read_text())
    assert gen["suppress_tokens"] == list(range(cfg["image_token_index"], cfg["text_config"]["vocab_size"]))


def _rehash(repo: Path) -> None:
    m = json.loads((repo / "conversion.json").read_text())
    m["outputs"] = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(repo.iterdir())
        if p.name != "conversion.json"
    }
    (repo / "conversion.json").write_text(json.dumps(m, indent=2, sort_keys=True))


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda g: g.pop("suppress_tokens"), "suppress_tokens is None"),
        (lambda g: g.__setitem__("suppress_tokens", g["suppress_tokens"][2:]), "lacks 2 id(s)"),
        (lambda g: g.__setitem__("suppress_tokens", [5] + g["suppress_tokens"]), "holds 1 id(s) outside"),
    ],
    ids=["missing", "too_few", "original_id"],
)
def test_strict_load_fails_on_a_wrong_suppression(converted, tmp_path, edit, message):
    repo = tmp_path / "repo"
    shutil.copytree(converted, repo)
    gen = json.loads((repo / "generation_config.json").read_text())
    edit(gen)
    (repo / "generation_config.json").write_text(json.dumps(gen, indent=2))
    _rehash(repo)
    report = verify_repo(
        repo, prompts=PROMPTS, images=sample_images(), max_new_tokens=1, progress=False, only=["strict_load"]
    )
    check = report.get("strict_load")
    assert check.failed and any(message in d for d in check.details), report.table()
    clean = verify_repo(
        converted, prompts=PROMPTS, images=sample_images(), max_new_tokens=1, progress=False, only=["strict_load"]
    )
    assert clean.passed, clean.table()


def _text_model_copy(tiny, tmp_path, **cfg_changes) -> Path:
    text = tmp_path / "text-model"
    shutil.copytree(tiny.text_model, text)
    cfg = json.loads((text / "tokenizer_config.json").read_text())
    cfg.update(cfg_changes)
    (text / "tokenizer_config.json").write_text(json.dumps(cfg))
    return text


def test_tokenizer_era_warns_with_counts_for_a_non_legacy_vicuna(tiny, converted, tmp_path):
    from verify.original import LlamaSlowTokenizer

    text = _text_model_copy(tiny, tmp_path, legacy=False)
    prompts = sample_prompts()
    report = verify_repo(
        converted, text_model=str(text), prompts=prompts, images=sample_images(), progress=False, only=["tokenizer_era"]
    )
    check = report.get("tokenizer_era")
    assert check.status == "WARN" and report.passed, report.table()
    # only the prompts with text right after a special token (the two-turn prompt's "</s>USER:") can differ
    after_special = [p["name"] for p in prompts if "</s>" in p["prompt"]]
    new, old = LlamaSlowTokenizer(text), LlamaSlowTokenizer(text, era="4.31.0")
    differ = [p["name"] for p in prompts if new.encode_with_images(p["prompt"]) != old.encode_with_images(p["prompt"])]
    assert differ and set(differ) <= set(after_special)
    assert check.numbers["4.31.0"]["differ"] == len(differ)
    assert check.summary.startswith(
        f"4.31.0-era tokenization differs on {len(differ)} of {len(prompts)} prompts, first at {differ[0]} "
    )


def test_tokenizer_era_passes_when_the_eras_agree(converted):
    report = verify_repo(
        converted, prompts=sample_prompts(), images=sample_images(), progress=False, only=["tokenizer_era"]
    )
    check = report.get("tokenizer_era")
    assert check.status == "PASS" and check.numbers["4.31.0"]["differ"] == 0, report.table()
    assert "identical on 9 of 9 prompts" in check.summary


HF_GENERATE = Path(__file__).with_name("hf_generate_suppressed.py")


@pytest.mark.parametrize("era", [None, "4.37.2"], ids=["installed", "4.37.2"])
def test_generate_honours_suppress_tokens_from_the_generation_config(converted, era):
    """transformers' generate reads suppress_tokens from the repo's generation_config.json: with rows >= T made to
    win, they are emitted without it and never with it. On the installed release, and on 4.37.2 (the original
    code's pin) in its own Python (tests/era.py)."""
    import subprocess
    import sys

    from tests.era import era_python

    python = sys.executable if era is None else era_python(era)
    run = subprocess.run([python, str(HF_GENERATE), str(converted)], capture_output=True, text=True, timeout=600)
    last = run.stdout.rstrip("\n").rpartition("\n")[2]
    assert run.returncode == 0 and last.startswith("{"), run.stderr[-2000:]
    got = json.loads(last)
    if era is not None:
        assert got["version"] == era
    assert got["loaded_suppress"] == list(range(got["T"], got["rows"]))
    assert any(t >= got["T"] for t in got["free"]), got
    assert got["configured"] and all(t < got["T"] for t in got["configured"]), got
