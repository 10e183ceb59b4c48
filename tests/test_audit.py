"""Audits: verifying a repo this tool did not write (no conversion.json), with the original inputs given.

Two repos made from the tiny converted fixture:
- an HONEST one: the converted repo with its conversion.json deleted. Every applicable check passes; ``files``
  is N/A (no recorded hashes), and the report and table say it was an audit.
- one laid out as the upstream one-shot script (transformers' convert_vipllava_weights_to_hf.py) publishes it:
  no manifest; the vision model's plain ``CLIPImageProcessor`` (no pad-to-square); the base model's DEFAULT
  ``AutoTokenizer`` (fast) with ``<image>`` and ``<pad>`` added; no chat template. The weights are the same. verify
  must fail on exactly what differs: ``processor`` (non-square images centre-cropped instead of padded; the
  fast tokenizer drops the piece sentencepiece puts after ``<image>``) and ``chat_template`` (none); everything
  about the weights passes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from verify.fixtures.build import sample_images, sample_prompts

# square and non-square images, the text right after <image>, a text-only prompt, two turns
PROMPTS = [
    p
    for p in sample_prompts()
    if p["name"] in ("square_describe", "wide_colour", "text_only", "two_turn", "image_then_space")
]


def _inputs(tiny) -> dict:
    return {"original": str(tiny.original), "text_model": str(tiny.text_model), "vision_model": str(tiny.vision_model)}


def _verify(repo: Path, tiny, **kw):
    from verify.api import verify_repo

    return verify_repo(
        repo, prompts=PROMPTS, images=sample_images(), max_new_tokens=3, progress=False, **_inputs(tiny), **kw
    )


@pytest.fixture(scope="module")
def honest(converted, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("audit") / "honest"
    shutil.copytree(converted, dst)
    (dst / "conversion.json").unlink()
    return dst


@pytest.fixture(scope="module")
def upstream_style(converted, tiny, tmp_path_factory) -> Path:
    """What the upstream script would publish for the same checkpoint (weights kept identical)."""
    from transformers import AddedToken, AutoTokenizer

    dst = tmp_path_factory.mktemp("audit") / "upstream"
    shutil.copytree(converted, dst)
    for name in (
        "conversion.json",
        "chat_template.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ):
        (dst / name).unlink(missing_ok=True)
    pre = json.loads((tiny.vision_model / "preprocessor_config.json").read_text())  # CLIPImageProcessor, no do_pad
    assert pre["image_processor_type"] == "CLIPImageProcessor" and "do_pad" not in pre
    (dst / "preprocessor_config.json").write_text(json.dumps({**pre, "processor_class": "LlavaProcessor"}, indent=2))
    tok = AutoTokenizer.from_pretrained(str(tiny.text_model))  # the default: a fast tokenizer
    assert tok.is_fast
    tok.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.save_pretrained(str(dst))
    return dst


def test_an_honest_repo_without_a_manifest_passes_as_an_audit(honest, tiny):
    report = _verify(honest, tiny)
    assert report.passed, report.table()
    assert report.audit and "no conversion.json" in report.audit
    files = report.get("files")
    assert files.status == "N/A" and files.summary.startswith("not applicable: no conversion.json")
    assert report.not_applicable == ["files"]
    assert all(c.status in ("PASS", "WARN") for c in report.checks if c.name != "files"), report.table()
    table = report.table()
    assert "AUDIT: " in table.splitlines()[1]
    assert table.splitlines()[-1] == "ALL APPLICABLE CHECKS PASSED (audit; not applicable: files)"
    data = json.loads(report.to_json())
    assert data["passed"] is True and data["audit"] is True and data["not_applicable"] == ["files"]


def test_an_upstream_style_repo_fails_exactly_on_what_differs(upstream_style, tiny):
    report = _verify(upstream_style, tiny)
    assert not report.passed and report.audit
    assert report.failed_checks == ["processor", "chat_template"], report.table()
    assert report.get("files").status == "N/A"
    for name in ("mapping", "strict_load", "resize", "logits", "generation"):  # the weights are the original's
        assert report.get(name).status in ("PASS", "WARN"), report.table()
    details = report.get("processor").details
    assert any(d.startswith("prompt image_then_space: ids differ") for d in details), details  # fast tokenizer
    assert any(d.startswith("image wide (") and "pixel_values differ" in d for d in details), details  # centre crop
    assert not any("image square" in d for d in details), details  # a square image needs no padding: no difference
    assert all("chat_template" in d or "chat template" in d for d in report.get("chat_template").details)
    assert report.table().splitlines()[-1] == "FAILED: processor, chat_template (audit; not applicable: files)"


def test_audit_from_the_command_line_and_its_exit_codes(honest, tiny, tmp_path, capsys):
    from verify.cli import main

    args = [
        str(honest),
        "--original",
        str(tiny.original),
        "--text-model",
        str(tiny.text_model),
        "--vision-model",
        str(tiny.vision_model),
        "--quiet",
    ]
    assert main(args + ["--only", "files"]) == 1  # N/A alone is no evidence
    assert (
        capsys.readouterr().out.splitlines()[-1] == "NOT PASSED: no applicable check ran (audit; not applicable: files)"
    )
    assert main(args + ["--only", "files", "--only", "mapping", "--json", str(tmp_path / "r.json")]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["audit"] is True and data["passed"] is True and [c["status"] for c in data["checks"]] == ["N/A", "PASS"]
    assert main([str(honest), "--quiet"]) == 2
    assert (
        "auditing it needs the original inputs; pass --original, --text-model, --vision-model"
        in capsys.readouterr().err
    )


def test_audit_of_a_hub_id_from_the_cache(honest, tiny, tmp_path, monkeypatch, capsys):
    """``python -m verify owner/name@revision`` reads the repo through huggingface_hub's cache (offline here)."""
    import huggingface_hub.constants as c

    from tests.hubcache import populate

    cache = tmp_path / "hub"
    commit = "a" * 40
    populate(cache, "someone/vip-llava-tiny-hf", honest, commit=commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    from verify.cli import main

    code = main(
        [
            f"someone/vip-llava-tiny-hf@{commit}",
            "--original",
            str(tiny.original),
            "--text-model",
            str(tiny.text_model),
            "--vision-model",
            str(tiny.vision_model),
            "--quiet",
            "--only",
            "mapping",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["repo"] == f"someone/vip-llava-tiny-hf@{commit}" and data["settings"]["repo_revision"] == commit
    assert data["audit"] is True and data["checks"][0]["status"] == "PASS"
