"""End to end on the REAL vocabularies, in the default run: a tiny-dimension original with the real row count
(Vicuna 32000, Llama-3 128256, Phi-3 32064) and the real base tokenizer (``tests/realvocab.py``) is converted with
``convert`` and verified with verify's DEFAULT prompts (the two-turn one included), once per backbone per session.
Skips in one line when the registry (and so the real vocabularies) cannot be reached.

Planted defect: a Phi-3 original whose base folder holds only ``tokenizer.model`` (LLaVA's train.py saved the
tokenizer with ``use_fast=False``); the converter accepts it, so verify must run every check on it and pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REAL = {  # backbone: (original embedding rows, base tokenizer length)
    "vicuna": (32000, 32000),
    "llama3": (128256, 128256),
    "phi3": (32064, 32011),
}


def base_layout(folder: Path) -> tuple[int, tuple[int, int, int | None]]:
    """(len(tokenizer), (bos, eos, pad) ids) of a base tokenizer folder, read with tokenizers / sentencepiece."""
    cfg = json.loads((folder / "tokenizer_config.json").read_text())

    def content(v):
        return v["content"] if isinstance(v, dict) else v

    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tk = Tokenizer.from_file(str(folder / "tokenizer.json"))
        size, lookup = tk.get_vocab_size(with_added_tokens=True), tk.token_to_id
    else:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        decoder = {content(e): int(i) for i, e in (cfg.get("added_tokens_decoder") or {}).items()}
        size = max([sp.get_piece_size() - 1, *decoder.values()]) + 1

        def lookup(t):
            return decoder.get(t, sp.piece_to_id(t))

    ids = tuple(
        None if content(cfg.get(k)) is None else lookup(content(cfg.get(k)))
        for k in ("bos_token", "eos_token", "pad_token")
    )
    return size, ids


def convert_and_verify(realvocab, tmp_path_factory, backbone: str, slow_only: bool = False):
    from convert.pipeline import Options, convert
    from fixtures.build import build_real_vocab
    from verify.api import verify_repo

    name = backbone + ("-slow-only" if slow_only else "")
    base = realvocab.base_tokenizer_dir(backbone)
    if slow_only:
        base = realvocab.copy_base_tokenizer(backbone, tmp_path_factory.mktemp(f"base-{name}") / "tok")
        (base / "tokenizer.json").unlink()
    rows, tokens = REAL[backbone]
    size, ids = base_layout(base)
    assert size == tokens
    fx = build_real_vocab(tmp_path_factory.mktemp(f"fx-{name}") / "tiny", base, backbone, rows, tokens, ids)
    repo = tmp_path_factory.mktemp(f"out-{name}") / "repo"
    convert(
        Options(
            original=str(fx.original),
            text_model=str(fx.text_model),
            vision_model=str(fx.vision_model),
            output=repo,
            progress=False,
        )
    )
    return repo, verify_repo(repo, progress=False)


@pytest.fixture(scope="session", params=list(REAL))
def real_conversion(request, realvocab, tmp_path_factory):
    repo, report = convert_and_verify(realvocab, tmp_path_factory, request.param)
    return request.param, repo, report


def test_real_vocabulary_conversion_passes_default_verification(real_conversion):
    backbone, repo, report = real_conversion
    print(report.table())
    assert report.settings["backbone"] == backbone
    assert "two_turn" in report.settings["prompts"] or "odd_two_turn" in report.settings["prompts"]
    assert report.passed, report.table()
    rows, tokens = REAL[backbone]
    strict = report.get("strict_load").numbers
    assert (strict["base_tokens"], strict["original_rows"]) == (tokens, rows)
    gen = json.loads((repo / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == list(range(tokens, strict["rows"]))
    assert report.get("processor").numbers["prompts"] == len(report.settings["prompts"])


def test_real_vicuna_reports_the_4_31_era_difference(real_conversion):
    """Vicuna v1.5 says legacy: false, so the 4.31-era tokenizer differs after "</s>" in the two-turn prompt: a
    WARN with its count, never a FAIL and never a silent pass."""
    backbone, _, report = real_conversion
    era = report.get("tokenizer_era")
    if backbone != "vicuna":
        assert era.status == "N/A" and era.numbers["applicable"] is False
        return
    assert era.status == "WARN" and not era.failed
    assert era.numbers["4.31.0"]["differ"] >= 1 and era.numbers["4.31.0"]["first"][0] == "two_turn"
    assert era.summary.startswith(
        f"4.31.0-era tokenization differs on {era.numbers['4.31.0']['differ']} of {len(report.settings['prompts'])} "
        "prompts"
    )


def test_slow_only_phi3_original_verifies(realvocab, tmp_path_factory):
    """A Phi-3 base folder with only tokenizer.model: the original builder loaded it with use_fast=True, i.e. the
    fast tokenizer transformers 4.37.2 converted itself; verify restates that and runs every check."""
    repo, report = convert_and_verify(realvocab, tmp_path_factory, "phi3", slow_only=True)
    assert not (
        Path(json.loads((repo / "conversion.json").read_text())["inputs"]["text_model"]["path"]) / "tokenizer.json"
    ).exists()
    assert not any("not found" in c.summary for c in report.checks), report.table()
    assert report.passed, report.table()
