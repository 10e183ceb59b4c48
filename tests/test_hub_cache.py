"""Hub ids resolved by the real huggingface_hub code from a pre-populated cache, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.hubcache import populate


@pytest.fixture()
def hub(tiny, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    commits = {
        "mucai/vip-llava-tiny": "a" * 40,
        "lmsys/vicuna-tiny": "b" * 40,
        "openai/clip-tiny": "c" * 40,
    }
    populate(cache, "mucai/vip-llava-tiny", tiny.original, commits["mucai/vip-llava-tiny"])
    populate(cache, "lmsys/vicuna-tiny", tiny.text_model, commits["lmsys/vicuna-tiny"])
    populate(cache, "openai/clip-tiny", tiny.vision_model, commits["openai/clip-tiny"])
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    return cache, commits


def _convert(out: Path, *extra: str) -> int:
    from convert.cli import main

    return main(
        [
            "--original",
            "mucai/vip-llava-tiny",
            "--text-model",
            "lmsys/vicuna-tiny",
            "--vision-model",
            "openai/clip-tiny",
            "--output",
            str(out),
            "--quiet",
            *extra,
        ]
    )


def test_hub_ids_convert_offline_and_record_revisions(hub, tmp_path, converted):
    cache, commits = hub
    out = tmp_path / "out"
    assert _convert(out) == 0
    m = json.loads((out / "conversion.json").read_text())
    for key, repo_id in (
        ("original", "mucai/vip-llava-tiny"),
        ("text_model", "lmsys/vicuna-tiny"),
        ("vision_model", "openai/clip-tiny"),
    ):
        assert m["inputs"][key]["repo_id"] == repo_id and m["inputs"][key]["revision"] == commits[repo_id]
    # the same bytes as the local-path conversion, whatever the inputs' names
    for name, digest in m["outputs"].items():
        assert json.loads((converted / "conversion.json").read_text())["outputs"][name] == digest


def test_revision_pin_is_honoured(hub, tmp_path, capsys):
    from convert.cli import main

    out = tmp_path / "out"
    code = main(
        [
            "--original",
            "mucai/vip-llava-tiny@" + "d" * 40,
            "--text-model",
            "lmsys/vicuna-tiny",
            "--vision-model",
            "openai/clip-tiny",
            "--output",
            str(out),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "mucai/vip-llava-tiny@" in err and not out.exists()


def test_corrupt_cached_blob_fails_the_lfs_sha256(hub, tmp_path, capsys):
    cache, _ = hub
    snap = next((cache / "models--mucai--vip-llava-tiny" / "snapshots").iterdir())
    shard = snap / "pytorch_model-00002-of-00002.bin"
    blob = shard.resolve()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a byte of tensor data: the zip stays readable, only the sha256 can tell
    blob.write_bytes(bytes(data))
    out = tmp_path / "out"
    code = _convert(out)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert "pytorch_model-00002-of-00002.bin" in err and "the Hub published" in err, err
    assert not out.exists() and not list(tmp_path.glob(".vipllava-*"))
