"""convert/safejson.py: the one bounded, strict JSON reader, the name sanitiser and the path confinement."""

from __future__ import annotations

import json
import os

import pytest

from convert.safejson import InputFileError, clean, confined, load_json, parse_json, read_bounded


@pytest.mark.parametrize(
    "text, says",
    [
        ("[1]", "expected a JSON object at the top level, found a JSON array"),
        ('{"a": NaN}', "found NaN"),
        ('{"a": -Infinity}', "found -Infinity"),
        ('{"a": 1e999}', "overflows to inf"),
        ('{"a": ' + "9" * 5000 + "}", "an integer of 5000 digits"),
        ('{"a": 1, "a": 2}', "the key 'a' twice"),
        ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "64 levels"),
        ('{"a": ' + "[" * 70 + "]" * 70 + "}", "64 levels"),
        ('{"a": "\\ud800"}', "lone surrogate"),
        ('{"a": 1', "expected JSON, found"),
    ],
)
def test_refused(text, says):
    with pytest.raises(InputFileError) as e:
        parse_json(text, "f.json")
    assert says in str(e.value) and str(e.value).startswith("f.json: ") and "\n" not in str(e.value)


def test_accepted_as_json_would():
    obj = {"a": [1, 2.5, -3e-5, None, True, "é\u2028x"], "b": {"c": "d" * 10_000}, "deep": [[[[[]]]]]}
    assert parse_json(json.dumps(obj), "f") == obj
    assert parse_json(b'{"x": 1}', "f") == {"x": 1}
    assert parse_json("[1]", "f", expect=list) == [1]


def test_size_and_special_files(tmp_path):
    big = tmp_path / "big.json"
    big.write_text("{}")
    os.truncate(big, 17 << 20)
    with pytest.raises(InputFileError, match="at most 16.0 MiB, found 17.0 MiB"):
        load_json(big)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(InputFileError, match="found a special file"):
        load_json(fifo)  # refused before open(): it would block
    with pytest.raises(InputFileError, match="found a special file"):
        read_bounded("/dev/zero", 10)
    assert read_bounded(big, 20 << 20)[:2] == b"{}"


def test_clean_keeps_one_line():
    assert clean("a\nb\x1b[31m\u202ec\u2028") == "a\\x0ab\\x1b[31m\\u202ec\\u2028"
    assert clean("naïve 中文 ✓") == "naïve 中文 ✓"
    assert clean("x" * 50, 10) == "x" * 10 + "..."


@pytest.mark.parametrize("entry", ["../x", "/etc/passwd", "a/b", ".", "..", "", "a\\b", "a\x00b", 3, None])
def test_confined_refuses_before_looking(tmp_path, entry):
    with pytest.raises(InputFileError):
        confined(tmp_path, entry)


def test_confined_symlinks(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "real.bin").write_bytes(b"x")
    (tmp_path / "outside.bin").write_bytes(b"x")
    (folder / "inside-link.bin").symlink_to(folder / "real.bin")
    (folder / "escape.bin").symlink_to(tmp_path / "outside.bin")
    assert confined(folder, "real.bin") == folder / "real.bin"
    assert confined(folder, "inside-link.bin") == folder / "inside-link.bin"
    assert confined(folder, "missing.bin") == folder / "missing.bin"  # the caller reports it missing
    with pytest.raises(InputFileError, match="is a symlink to .*outside"):
        confined(folder, "escape.bin")
    # the Hugging Face cache layout: snapshots/<rev>/file -> ../../blobs/<sha>
    repo = tmp_path / "models--o--n"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_bytes(b"x")
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "w.bin").symlink_to(os.path.join("..", "..", "blobs", "abc"))
    assert confined(snap, "w.bin") == snap / "w.bin"
