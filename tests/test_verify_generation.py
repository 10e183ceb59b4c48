"""verify's compute side: the checkpoint's own weights dtype by default (bf16, float32 arithmetic in blocks), the memory
estimate that refuses a run
before anything is loaded, and the generation check that compares the converted repo's own generation (through its
generation_config.json, nothing masked) with the reference."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.build import sample_images, sample_prompts
from verify.api import verify_repo
from verify.context import (
    DECODE_BATCH_BYTES,
    Context,
    GiB,
    ModelShape,
    VerifyUsageError,
    estimate_memory,
    largest_decode_batch,
)

PROMPTS = [p for p in sample_prompts() if p["name"] in ("wide_colour", "text_only", "two_turn")]
T = 997  # len(base tokenizer) of the tiny Vicuna fixture; rows [T, 1024) are <image>, <pad> and padding
HEAD = "language_model.lm_head.weight"


@pytest.fixture()
def repo(converted, tmp_path) -> Path:
    dst = tmp_path / "repo"
    shutil.copytree(converted, dst)
    return dst


def _refuse_loading(monkeypatch):
    """Any model load fails the test: a refused run must stop before loading anything."""
    from transformers import VipLlavaForConditionalGeneration

    from verify.original import OriginalVipLlava

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the memory check refused the run")

    monkeypatch.setattr(OriginalVipLlava, "from_dirs", boom)
    monkeypatch.setattr(VipLlavaForConditionalGeneration, "from_pretrained", boom)


# --- dtype ---------------------------------------------------------------------------------------------------
def test_default_is_the_checkpoints_bf16_weights_in_float32_blocks_with_stated_tolerances(converted):
    report = verify_repo(converted, prompts=PROMPTS, images=sample_images(), max_new_tokens=4, progress=False)
    assert report.passed, report.table()
    assert (report.settings["dtype"], report.settings["dtype_source"]) == ("float32-blocks", "checkpoint")
    logits = report.get("logits")
    assert logits.numbers["tolerance"] == 1e-4
    assert logits.numbers["tolerance_per_dtype"] == {"float32-blocks": 1e-4, "float32": 1e-4, "bfloat16": 5e-2}
    assert logits.numbers["max_abs_diff"] <= 1e-4 and logits.numbers["top1_agree"] == logits.numbers["top1_decided"] > 0
    assert "<= 0.0001 (float32-blocks; float32 0.0001, bfloat16 0.05)" in logits.summary
    # bf16 weights are read from the files as stored: no copy counted, only the float32 block buffers
    mem = report.settings["memory_estimate"]
    assert mem["weight_copies"] == 0 and mem["parts"]["weights"] == 0 and mem["total"] <= mem["limit"]
    assert (mem["dtype"], mem["arithmetic"]) == ("bfloat16", "float32") and mem["parts"]["float32_blocks"] > 0
    # time per phase is visible: loads, prompt forwards and decoding, per side
    phases = report.settings["phase_seconds"]
    assert {
        "reference_load",
        "reference_forward",
        "reference_decode",
        "converted_load",
        "converted_forward",
        "converted_decode",
    } <= set(phases)
    assert set(report.get("generation").numbers["seconds"]) == {"reference_decode", "converted_decode"}
    assert report.get("generation").numbers["tokens_compared"] > len(PROMPTS)


def test_bfloat16_when_asked(converted):
    """All-bf16 arithmetic (what a GPU user runs): passes within bf16's stated tolerance, nothing copied."""
    report = verify_repo(
        converted,
        prompts=PROMPTS,
        images=sample_images(),
        max_new_tokens=4,
        progress=False,
        dtype="bfloat16",
        only=["logits", "generation"],
    )
    assert report.passed, report.table()
    assert (report.settings["dtype"], report.settings["dtype_source"]) == ("bfloat16", "asked")
    assert report.get("logits").numbers["tolerance"] == 5e-2 and report.get("logits").numbers["max_abs_diff"] <= 5e-2
    mem = report.settings["memory_estimate"]
    assert mem["arithmetic"] == "bfloat16" and mem["parts"]["float32_blocks"] == 0 and mem["weight_copies"] == 0


def test_float32_when_asked(converted):
    report = verify_repo(
        converted,
        prompts=PROMPTS[:1],
        images=sample_images(),
        max_new_tokens=2,
        progress=False,
        dtype="float32",
        only=["logits", "generation"],
    )
    assert report.passed, report.table()
    assert (report.settings["dtype"], report.settings["dtype_source"]) == ("float32", "asked")
    assert report.get("logits").numbers["tolerance"] == 1e-4
    assert report.settings["memory_estimate"]["weight_copies"] == 2  # bf16 on disk, fp32 copies of both models


# --- the memory estimate -------------------------------------------------------------------------------------
def test_float32_that_does_not_fit_is_refused_before_loading(converted, monkeypatch):
    need = Context(converted, prompts=PROMPTS, images=sample_images(), dtype="float32", memory_limit=1 << 50).memory
    assert need["parts"]["weights"] == 2 * need["parameters"] * 4
    _refuse_loading(monkeypatch)
    with pytest.raises(
        VerifyUsageError,
        match=r"a float32 run needs about .* GiB of memory .* is available \(given\); pass --dtype float32-blocks",
    ):
        verify_repo(
            converted,
            prompts=PROMPTS,
            images=sample_images(),
            dtype="float32",
            memory_limit=need["total"] - 1,
            progress=False,
        )
    # exactly enough: accepted (the Context is built, nothing loaded yet)
    ctx = Context(converted, prompts=PROMPTS, images=sample_images(), dtype="float32", memory_limit=need["total"])
    assert ctx.memory["total"] == need["total"]
    # checks that load no model are never refused
    assert verify_repo(
        converted, images=sample_images(), dtype="float32", only=["files"], memory_limit=1, progress=False
    ).passed


def test_cli_refuses_with_one_line_and_exit_2(converted, monkeypatch, capsys):
    from verify import context
    from verify.cli import main

    _refuse_loading(monkeypatch)
    monkeypatch.setattr(context, "available_memory", lambda: 64 << 20)
    assert main([str(converted), "--dtype", "float32", "--quiet"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert (
        len(err) == 1
        and err[0].startswith("error: ")
        and "MemAvailable" in err[0]
        and "--dtype float32-blocks" in err[0]
    ), captured.err
    assert captured.out == ""


def _full_size_shape(size: str) -> ModelShape:
    from bench.make_checkpoint import SIZES
    from verify.tiny import original_key_shapes

    spec = SIZES[size]
    patches = (spec.image_size // spec.patch_size) ** 2
    return ModelShape(
        parameters=sum(math.prod(s) for s in original_key_shapes(spec).values()),
        layers=spec.text_layers,
        hidden=spec.text_hidden,
        heads=spec.text_heads,
        kv_dim=spec.text_kv_heads * (spec.text_hidden // spec.text_heads),
        intermediate=spec.text_intermediate,
        vocab=spec.vocab_size,
        vision_layers=spec.vision_layers,
        vision_hidden=spec.vision_hidden,
        vision_heads=spec.vision_heads,
        vision_intermediate=spec.vision_intermediate,
        vision_tokens=patches + 1,
        image_tokens=patches,
    )


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_full_size_estimate_fp32_exceeds_24_gb_and_the_default_fits(tiny, size):
    """The real 7B/13B shapes with the bundled default prompts (counted with the tiny tokenizer, which splits finer
    than the real one: longer sequences, a larger estimate), 8 new tokens."""
    from verify.original import IMAGE_SENTINEL, load_base_tokenizer

    shape = _full_size_shape(size)
    assert shape.parameters > {"7b": 7.0e9, "13b": 13.3e9}[size]
    tok = load_base_tokenizer("vicuna", tiny.text_model)
    ids = [tok.encode_with_images(p["prompt"]) for p in sample_prompts()]
    images = [x.count(IMAGE_SENTINEL) for x in ids]
    seqs = [shape.sequence(len(x) - n, n) for x, n in zip(ids, images, strict=True)]
    assert len(seqs) == 9 and max(seqs) > 576
    bf16 = (torch.bfloat16, torch.bfloat16)
    fp32 = estimate_memory(shape, torch.float32, bf16, seqs, images, 8)
    low = estimate_memory(shape, torch.bfloat16, bf16, seqs, images, 8)
    assert fp32["total"] > 24e9 and fp32["parts"]["weights"] == 2 * shape.parameters * 4
    assert low["total"] < 8 * GiB and low["parts"]["weights"] == 0
    # the default: float32 blocks, and the lock-step batches' bf16 caches (the 13B prompts take two batches)
    names = [p["image"] if n else None for p, n in zip(sample_prompts(), images, strict=True)]
    held = largest_decode_batch(shape, ids, names, seqs, 8, torch.bfloat16)
    assert 2 * GiB < held <= DECODE_BATCH_BYTES
    blocks = estimate_memory(
        shape, torch.bfloat16, bf16, seqs, images, 8, arithmetic=torch.float32, decode_caches=held, shared_prefix=True
    )
    # an upper bound (measured peaks, BENCHMARKS.md session 8: 7.58 GiB at 7B, 6.33 GiB at 13B) that leaves a 24 GB
    # machine half of its memory for the page cache
    assert (
        blocks["total"] < 12 * GiB
        and blocks["parts"]["kv_cache"] == 3 * shape.cache_bytes(max(seqs) + 8, 4)
        and blocks["parts"]["weights"] == 0
        and 1 * GiB < blocks["parts"]["float32_blocks"] < 3 * GiB
        and blocks["parts"]["decode_caches"] == held
    )
    # a bf16 run of a repo converted to fp32 copies one model
    assert (
        estimate_memory(shape, torch.bfloat16, (torch.bfloat16, torch.float32), seqs, images, 8)["weight_copies"] == 1
    )


# --- generation: the repo's own generation_config, nothing masked ---------------------------------------------
def _padding_rows_win(repo: Path) -> None:
    """Rows [T, rows) of lm_head aligned with the mean final hidden state and scaled up: at the generated positions
    they outscore the whole real vocabulary, as a padding row of a real conversion can."""
    from verify.original import OriginalVipLlava

    ctx = Context(repo, prompts=PROMPTS, images=sample_images())
    ref = OriginalVipLlava.from_dirs(ctx.original_dir, ctx.inputs.text_model, ctx.inputs.vision_model)
    states = torch.cat(
        [ref.forward(x["ids"], x["images"] or None, capture=True).trace["decoder.norm"] for x in ctx.parity_inputs]
    )
    direction = states.mean(0)
    f = repo / "model.safetensors"
    sd = load_file(str(f))
    W = sd[HEAD]
    W[T:] = (direction / direction.norm() * 1e3).to(W.dtype)
    save_file(sd, str(f), metadata={"format": "pt"})


def _set_suppress(repo: Path, ids: list[int] | None) -> None:
    p = repo / "generation_config.json"
    g = json.loads(p.read_text())
    g.pop("suppress_tokens", None)
    if ids is not None:
        g["suppress_tokens"] = ids
    p.write_text(json.dumps(g, indent=2))


def test_a_padding_row_that_outscores_the_vocabulary_fails_unless_suppressed(repo):
    _padding_rows_win(repo)
    _set_suppress(repo, None)
    report = verify_repo(
        repo, prompts=PROMPTS, images=sample_images(), max_new_tokens=4, progress=False, only=["generation"]
    )
    gen = report.get("generation")
    assert gen.failed, report.table()
    assert gen.numbers["emitted_beyond_base"] and min(gen.numbers["emitted_beyond_base"]) >= T
    assert any(f"are >= len(base tokenizer) {T}, which the original could never emit" in d for d in gen.details)
    # the repo's own generation_config keeps the model off those ids: identical to the original again
    _set_suppress(repo, list(range(T, 1024)))
    report = verify_repo(
        repo, prompts=PROMPTS, images=sample_images(), max_new_tokens=4, progress=False, only=["generation"]
    )
    gen = report.get("generation")
    assert gen.status == "PASS", report.table()
    assert gen.numbers["suppress_tokens"] == 1024 - T and gen.numbers["emitted_beyond_base"] == []


def test_generation_follows_the_repos_generation_config(repo):
    """An eos the original never stopped on, planted in generation_config.json, is obeyed by the converted side (it
    stops early) and the check fails: the comparison runs through the repo's own config."""
    clean = verify_repo(
        repo, prompts=PROMPTS[:1], images=sample_images(), max_new_tokens=6, progress=False, only=["generation"]
    )
    assert clean.passed, clean.table()
    first = json.loads(clean.to_json())["checks"][0]
    assert first["numbers"]["tokens_compared"] >= 2
    ctx = Context(repo, prompts=PROMPTS[:1], images=sample_images(), only=["generation"])
    first_token = ctx.reference_generations[0][0]
    p = repo / "generation_config.json"
    g = json.loads(p.read_text())
    g["eos_token_id"] = (
        [g["eos_token_id"], first_token] if isinstance(g["eos_token_id"], int) else g["eos_token_id"] + [first_token]
    )
    p.write_text(json.dumps(g, indent=2))
    report = verify_repo(
        repo, prompts=PROMPTS[:1], images=sample_images(), max_new_tokens=6, progress=False, only=["generation"]
    )
    gen = report.get("generation")
    assert gen.failed and any(f"converted [{first_token}] vs original" in d for d in gen.details), report.table()
