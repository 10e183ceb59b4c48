"""Bad input: one line on stderr naming the problem, exit 2, and nothing left behind (no output folder, no
temporary folder beside it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

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


CASES = [
    # (id, setup, extra CLI args, message fragment)
    ("unmapped-key", _unmapped, [], "model.foo.weight"),
    ("plain-llava-projector", _plain_llava, [], "plain LLaVA-1.5 projector"),
    ("text-vocab-differs", _vocab_mismatch, [], "tokenizer has 997 tokens but the original embedding has 1000 rows"),
    ("vision-hidden-x5", _vision_hidden, [], "mm_hidden_size is 160 but the vision model's hidden_size 48 x 5"),
    ("missing-shard", _missing_shard, [], "pytorch_model-00002-of-00002.bin which is missing"),
    ("output-exists", _existing_output, [], "exists and is not empty; pass --force"),
    ("output-is-file", _output_is_file, [], "exists and is a file"),
    ("wrong-shape", _wrong_shape, [], "model.layers.1.mlp.up_proj.weight: shape (128, 63)"),
    ("nan-embedding", _nan_embedding, [], "model.embed_tokens.weight: holds NaN or Inf"),
    ("already-converted", _already_converted, [], "already a converted HF VipLlava repo"),
    ("unknown-dtype", None, ["--dtype", "int4"], "--dtype 'int4'"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(case, tmp_path, capsys):
    from tests.conftest import run_convert

    name, setup, extra, fragment = case
    fx = build(tmp_path / "fx")
    if setup:
        setup(fx, tmp_path)
    before = {p.name: (p.is_file() and p.read_bytes()) for p in tmp_path.iterdir()}
    capsys.readouterr()
    code = run_convert(fx, tmp_path / "out", *extra)
    err = capsys.readouterr().err.strip()
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
