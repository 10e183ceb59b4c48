"""Hostile and broken input, table-driven: each row is an input, exit code 2, a fragment of the one-line message,
and the assertion that nothing was written (no output folder, no temporary folder beside it, nothing replaced).
The malicious pickle must never run: its marker file must not exist afterwards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import os
import struct
import subprocess
import sys

from fixtures.build import build, write_checkpoint
from verify.tiny import TinySpec, original_config, original_state_dict


def _rewrite_original(fx, mutate_sd=None, mutate_cfg=None):
    sd = original_state_dict(TinySpec(), seed=0)
    cfg = original_config(TinySpec())
    if mutate_sd:
        mutate_sd(sd)
    if mutate_cfg:
        mutate_cfg(cfg)
    for p in fx.original.iterdir():
        p.unlink()
    write_checkpoint(fx.original, sd, shards=2)
    (fx.original / "config.json").write_text(json.dumps(cfg))


def _unmapped(fx, tmp):
    _rewrite_original(fx, lambda sd: sd.__setitem__("model.foo.weight", torch.zeros(2)))


def _plain_llava(fx, tmp):
    def m(sd):
        for k in [k for k in sd if k.startswith("model.mm_projector.")]:
            v = sd.pop(k)
            if "final_linear" in k:
                sd[k.replace("final_linear.", "")] = v
    _rewrite_original(fx, m)


def _vocab_mismatch(fx, tmp):
    def m(sd):
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            sd[k] = torch.cat([sd[k], sd[k][:3]])
    _rewrite_original(fx, m, lambda cfg: cfg.__setitem__("vocab_size", 1000))


def _vision_hidden(fx, tmp):
    p = fx.vision_model / "config.json"
    cfg = json.loads(p.read_text())
    cfg["vision_config"]["hidden_size"] = 48
    p.write_text(json.dumps(cfg))


def _shallow_vision(fx, tmp):
    p = fx.vision_model / "config.json"
    cfg = json.loads(p.read_text())
    cfg["vision_config"]["num_hidden_layers"] = 5
    p.write_text(json.dumps(cfg))


def _missing_shard(fx, tmp):
    (fx.original / "pytorch_model-00002-of-00002.bin").unlink()


def _existing_output(fx, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("precious")


def _output_is_file(fx, tmp):
    (tmp / "out").write_text("not a folder")


def _wrong_shape(fx, tmp):
    def m(sd):
        k = "model.layers.1.mlp.up_proj.weight"
        sd[k] = sd[k][:, :-1].clone()
    _rewrite_original(fx, m)


def _nan_embedding(fx, tmp):
    def m(sd):
        sd["model.embed_tokens.weight"][5, 7] = float("nan")
    _rewrite_original(fx, m)


def _already_converted(fx, tmp):
    shutil.rmtree(fx.original)
    from tests.conftest import run_convert

    fresh = build(tmp / "fresh")
    assert run_convert(fresh, fx.original) == 0


MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / "vipllava-pwned-marker"


class _Exploit:
    """Unpickling this runs exec(): what a hostile checkpoint would do."""

    def __reduce__(self):
        return (exec, (f"open({str(MARKER)!r}, 'w').write('pwned')",))


def _malicious_pickle(fx, tmp):
    shard = fx.original / "pytorch_model-00001-of-00002.bin"
    sd = torch.load(shard, weights_only=True)
    sd["model.norm.weight"] = _Exploit()
    torch.save(sd, shard)


def _unexpected_global(fx, tmp):
    import collections

    shard = fx.original / "pytorch_model-00002-of-00002.bin"
    sd = torch.load(shard, weights_only=True)
    sd["lm_head.weight"] = collections.Counter(a=1)
    torch.save(sd, shard)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _corrupt_zip_directory(fx, tmp):
    f = fx.original / "pytorch_model-00001-of-00002.bin"
    data = bytearray(f.read_bytes())
    data[-60] ^= 0xFF  # inside the zip's central directory
    f.write_bytes(bytes(data))


def _truncated_bin(fx, tmp):
    _truncate(fx.original / "pytorch_model-00002-of-00002.bin")


def _as_safetensors(fx):
    shutil.rmtree(fx.original)
    fresh = build(fx.root.parent / "st", fmt="safetensors")
    shutil.move(str(fresh.original), str(fx.original))


def _truncated_safetensors(fx, tmp):
    _as_safetensors(fx)
    _truncate(fx.original / "model-00002-of-00002.safetensors", 0.9)


def _flipped_header_byte(fx, tmp):
    _as_safetensors(fx)
    f = fx.original / "model-00001-of-00002.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    data[8 + n // 2] ^= 0x20  # inside the JSON header
    f.write_bytes(bytes(data))


def _key_in_two_shards(fx, tmp):
    a, b = fx.original / "pytorch_model-00001-of-00002.bin", fx.original / "pytorch_model-00002-of-00002.bin"
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    k = next(iter(sa))
    sb[k] = sa[k]
    torch.save(sb, b)


def _index_names_absent_key(fx, tmp):
    p = fx.original / "pytorch_model.bin.index.json"
    idx = json.loads(p.read_text())
    idx["weight_map"]["model.layers.0.mlp.extra.weight"] = "pytorch_model-00001-of-00002.bin"
    p.write_text(json.dumps(idx))


def _empty_folder(fx, tmp):
    for p in fx.original.iterdir():
        p.unlink()


def _inf_embedding(fx, tmp):
    def m(sd):
        sd["model.embed_tokens.weight"][0, 0] = float("inf")
    _rewrite_original(fx, m)


def _unwritable_parent(fx, tmp):
    """A read-only file system as the output's parent (root ignores permission bits, so mount one)."""
    ro = tmp / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o500)
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.decode().strip()}")


def _unmount(tmp):
    ro = tmp / "ro"
    if ro.is_dir() and os.path.ismount(ro):
        subprocess.run(["umount", str(ro)], check=False)


CASES = [
    # (id, setup, extra CLI args, message fragment)
    ("unmapped-key", _unmapped, [], "model.foo.weight"),
    ("plain-llava-projector", _plain_llava, [], "plain LLaVA-1.5 projector"),
    ("text-vocab-differs", _vocab_mismatch, [], "tokenizer has 997 tokens but the original embedding has 1000 rows"),
    ("vision-hidden-x5", _vision_hidden, [], "mm_hidden_size is 160 but the vision model's hidden_size 48 x 5"),
    ("vision-too-shallow", _shallow_vision, [], "the vision model has 5 layers, too few for feature layers"),
    ("missing-shard", _missing_shard, [], "pytorch_model-00002-of-00002.bin which is missing"),
    ("output-exists", _existing_output, [], "exists and is not empty; pass --force"),
    ("output-is-file", _output_is_file, [], "exists and is a file"),
    ("wrong-shape", _wrong_shape, [], "model.layers.1.mlp.up_proj.weight: shape (128, 63)"),
    ("nan-embedding", _nan_embedding, [], "model.embed_tokens.weight: holds NaN or Inf"),
    ("already-converted", _already_converted, [], "already a converted HF VipLlava repo"),
    ("unknown-dtype", None, ["--dtype", "int4"], "--dtype 'int4'"),
    ("seed-beyond-32-bits", None, ["--seed", str(2**32 + 5)], "--seed 4294967301: expected an integer with 0 <= seed < 2**32"),
    ("malicious-pickle", _malicious_pickle, [], "pickle references builtins.exec"),
    ("unexpected-global", _unexpected_global, [], "pickle references collections.Counter"),
    ("truncated-bin", _truncated_bin, [], "pytorch_model-00002-of-00002.bin: truncated or corrupt"),
    ("corrupt-zip-directory", _corrupt_zip_directory, [], "pytorch_model-00001-of-00002.bin: truncated or corrupt"),
    ("truncated-safetensors", _truncated_safetensors, [], "model-00002-of-00002.safetensors: truncated"),
    ("flipped-header-byte", _flipped_header_byte, [], "model-00001-of-00002.safetensors"),
    ("key-in-two-shards", _key_in_two_shards, [], "present in two shards"),
    ("index-names-absent-key", _index_names_absent_key, [], "names model.layers.0.mlp.extra.weight in pytorch_model-00001-of-00002.bin but no shard holds it"),
    ("empty-folder", _empty_folder, [], "config.json: missing"),
    ("inf-embedding", _inf_embedding, [], "model.embed_tokens.weight: holds NaN or Inf (first at row 0, column 0)"),
    ("unwritable-parent", _unwritable_parent, ["@ro/out"], "not writable"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(case, tmp_path, capsys):
    from tests.conftest import run_convert

    name, setup, extra, fragment = case
    MARKER.unlink(missing_ok=True)
    fx = build(tmp_path / "fx")
    output = tmp_path / "out"
    if extra and extra[0].startswith("@"):
        output, extra = tmp_path / extra[0][1:], extra[1:]
    try:
        if setup:
            setup(fx, tmp_path)
        before = {p.name: (p.is_file() and p.read_bytes()) for p in tmp_path.iterdir()}
        capsys.readouterr()
        code = run_convert(fx, output, *extra)
        err = capsys.readouterr().err.strip()
        assert not any(output.parent.glob(".vipllava-*"))
    finally:
        _unmount(tmp_path)
    assert not MARKER.exists(), "the malicious pickle ran"
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert fragment in err, err
    after = {p.name: (p.is_file() and p.read_bytes()) for p in tmp_path.iterdir()}
    assert after == before  # no output folder created, nothing replaced, no temporary folder left
    if name == "output-exists":
        assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_hub_id_unavailable_offline(tmp_path, monkeypatch, capsys):
    from convert.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code = main(["--original", "mucai/vip-llava-7b", "--output", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "mucai/vip-llava-7b" in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_the_exploit_is_real(tmp_path):
    """The malicious row is only meaningful if unpickling the object really runs code."""
    import pickle

    MARKER.unlink(missing_ok=True)
    pickle.loads(pickle.dumps(_Exploit()))
    assert MARKER.read_text() == "pwned"
    MARKER.unlink()


def test_safetensors_preferred_when_both_formats_are_present(tmp_path):
    """A folder holding both: the safetensors are read and the pickles never opened (a hostile .bin is ignored)."""
    from tests.conftest import run_convert

    fx = build(tmp_path / "fx")
    st = build(tmp_path / "st", fmt="safetensors")
    for p in st.original.glob("model*.safetensors*"):
        shutil.copy(p, fx.original / p.name)
    _malicious_pickle(fx, tmp_path)
    MARKER.unlink(missing_ok=True)
    assert run_convert(fx, tmp_path / "out") == 0
    assert json.loads((tmp_path / "out" / "conversion.json").read_text())["settings"]["format"] == "safetensors"
    assert not MARKER.exists()


def test_bin_input_refused_on_torch_before_2_6(tmp_path, monkeypatch, capsys):
    """weights_only=True could be bypassed before torch 2.6 (CVE-2025-32434): no pickle is even opened there."""
    import convert.sources as sources
    from tests.conftest import run_convert

    fx = build(tmp_path / "fx")
    _malicious_pickle(fx, tmp_path)
    MARKER.unlink(missing_ok=True)
    monkeypatch.setattr(sources, "_torch_version", lambda: (2, 5))
    capsys.readouterr()
    assert run_convert(fx, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "refusing .bin input on torch" in err and "CVE-2025-32434" in err and "\n" not in err.strip()
    assert not MARKER.exists() and not (tmp_path / "out").exists()
