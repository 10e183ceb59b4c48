"""verify's one pass over the bytes (verify/datapass.py): its own readers locate every tensor where torch reads it,
it reads each converted byte and each compared original byte once, its results are the direct computation's, it
reads no original when only ``files`` runs, and a wrong location or a changed value cannot pass."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.build import build, sample_images, sample_prompts
from verify import checks, datapass
from verify.api import verify_repo
from verify.context import Context

PROMPTS = [p for p in sample_prompts() if p["name"] == "text_only"]


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_located_bytes_are_the_tensors_torch_reads(tmp_path, fmt):
    paths = build(tmp_path / "fx", fmt=fmt, shards=2)  # its own: each format, two shards
    files = sorted(paths.original.glob(f"*.{fmt}"))
    assert len(files) == 2
    for f in files:
        tensors = load_file(str(f)) if fmt == "safetensors" else torch.load(f, weights_only=True)
        locs = datapass.locate(f)
        assert set(locs) == set(tensors)
        data = f.read_bytes()
        for k, t in tensors.items():
            loc = locs[k]
            assert (loc.dtype, loc.shape) == (t.dtype, tuple(t.shape)), k
            assert data[loc.offset : loc.offset + loc.nbytes] == _raw(t), k


def test_what_cannot_be_located_is_left_out(tmp_path):
    """Non-contiguous storage and a pickle with foreign classes: not located (read through torch.load instead)."""
    torch.save(
        {
            "plain": torch.arange(6.0),
            "transposed": torch.arange(12.0).reshape(3, 4).t(),
            "view": torch.arange(10, dtype=torch.int64)[2:7],
        },
        tmp_path / "x.bin",
    )
    locs = datapass.locate(tmp_path / "x.bin")
    assert set(locs) == {"plain", "view"}
    data = (tmp_path / "x.bin").read_bytes()
    assert data[locs["view"].offset : locs["view"].offset + locs["view"].nbytes] == _raw(torch.arange(2, 7))
    torch.save({"w": torch.nn.Parameter(torch.ones(3))}, tmp_path / "p.bin")  # _rebuild_parameter: not read here
    assert datapass.locate(tmp_path / "p.bin") == {}


def test_the_pass_reads_each_byte_once_and_agrees_with_the_direct_computation(converted):
    ctx = Context(converted, prompts=PROMPTS, images=sample_images())
    r = ctx.data_pass
    shards = sorted(converted.glob("*.safetensors"))
    assert r.bytes_converted == sum(p.stat().st_size for p in shards)
    assert r.describe()["converted_bytes"] == r.bytes_converted and r.describe()["tensors_compared"] == 226
    orig, conv = ctx.original_tensors, ctx.converted_tensors
    mapped = [k for k in orig.keys() if checks.canonical(k) is not None]
    assert len(r.equal) == len(mapped) == 226 and all(r.equal.values()) and not r.problems
    assert r.bytes_original == sum(orig.get(k).numel() * orig.get(k).element_size() for k in mapped)
    assert r.digests == {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in converted.iterdir() if p.name != "conversion.json"
    }
    E = orig.get("model.embed_tokens.weight").double()
    assert r.stats.rows == E.shape[0]
    assert torch.allclose(r.stats.mean, E.mean(0), rtol=0, atol=1e-15)
    assert r.stats.trace == pytest.approx(((E - E.mean(0)) ** 2).sum(1).mean().item(), rel=1e-12)
    for name in (checks.EMBED, checks.HEAD):
        assert torch.equal(r.new_rows[name], conv.get(name)[E.shape[0] :])


def test_only_files_reads_no_original(converted):
    ctx = Context(converted, prompts=PROMPTS, images=sample_images())
    ctx.data_checks = {"files"}
    r = ctx.data_pass
    assert r.bytes_original == 0 and not r.equal and len(r.digests) == 10
    ctx = Context(converted, prompts=PROMPTS, images=sample_images())
    ctx.data_checks = {"resize"}
    r = ctx.data_pass
    assert set(r.equal) == {checks.EMBED, checks.HEAD} and not r.digests
    assert r.bytes_converted == sum(ctx.converted_tensors.meta(n)[1][0] * 64 * 2 for n in r.equal)


def _rehash(repo: Path) -> None:
    m = json.loads((repo / "conversion.json").read_text())
    m["outputs"] = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(repo.iterdir())
        if p.name != "conversion.json"
    }
    (repo / "conversion.json").write_text(json.dumps(m, indent=2, sort_keys=True))


def test_a_cast_output_is_compared_after_the_cast_and_one_changed_value_fails(tiny, tmp_path):
    """float32 output of a bf16 original: the stream casts the original's chunks; one element off by one float32
    ulp (invisible in bf16) fails mapping."""
    from tests.conftest import run_convert

    repo = tmp_path / "f32"
    assert run_convert(tiny, repo, "--dtype", "float32") == 0
    report = verify_repo(
        repo, prompts=PROMPTS, images=sample_images(), progress=False, only=["files", "mapping", "resize"]
    )
    assert report.passed, report.table()
    assert report.get("mapping").numbers["bit_identical"] == 226
    f = repo / "model.safetensors"
    sd = load_file(str(f))
    w = sd["language_model.model.layers.1.mlp.down_proj.weight"]
    w.view(-1)[5] = torch.nextafter(w.view(-1)[5], torch.tensor(float("inf")))
    save_file(sd, str(f), metadata={"format": "pt"})
    _rehash(repo)
    report = verify_repo(repo, prompts=PROMPTS, images=sample_images(), progress=False, only=["files", "mapping"])
    assert report.failed_checks == ["mapping"], report.table()
    assert any(
        d.startswith("language_model.model.layers.1.mlp.down_proj.weight: values differ")
        for d in report.get("mapping").details
    )


def test_a_wrong_location_is_a_verifier_bug_not_a_pass(converted, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    shutil.copytree(converted, repo)
    real = datapass.torch_zip_locations

    def shifted(path):
        out = real(path)
        k = "model.layers.0.self_attn.q_proj.weight"
        if k in out:
            loc = out[k]
            out[k] = datapass.Located(loc.path, loc.offset + 2, loc.dtype, loc.shape)
        return out

    monkeypatch.setattr(datapass, "torch_zip_locations", shifted)
    report = verify_repo(repo, prompts=PROMPTS, images=sample_images(), progress=False, only=["mapping"])
    assert report.failed_checks == ["mapping"]
    assert any(
        "model.layers.0.self_attn.q_proj.weight: the bytes verify located" in d and "verifier bug" in d
        for d in report.get("mapping").details
    ), report.table()


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 17, 4099])
def test_byte_comparison_sees_every_flipped_bit(n):
    import os

    a = bytearray(os.urandom(n))
    assert datapass._equal_bytes(memoryview(a), memoryview(bytearray(a)))
    assert n < 2 or datapass._equal_bytes(memoryview(a)[1:], memoryview(bytearray(a))[1:])  # unaligned views too
    for i in range(n):
        b = bytearray(a)
        b[i] ^= 0x80
        assert not datapass._equal_bytes(memoryview(a), memoryview(b)), i
