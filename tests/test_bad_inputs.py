"""Hostile and broken input, table-driven (issues 5 and 16). Every row holds the same contract:

- exit code 2 and exactly one stderr line (``error: ...``), naming the file or key, with the row's fragment (what
  was expected and found) and what to do (after a ``;``); no library noise before it;
- nothing written and the inputs byte-identical afterwards: the whole folder of the row (inputs, output, the
  output's parent) hashed before and after, with ``--force`` on every row but the ones that test its absence;
- bounded memory and time: each row runs the CLI in its own forked process (``tests/forkrun.py``) under
  ``RLIMIT_AS`` (3 GiB above the interpreter's), its peak resident memory and wall time measured and compared;
- the malicious pickle never runs (its marker file never appears).

Set ``BAD_INPUTS_REPORT=FILE`` to get every row's measurements as JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixtures.build import FixturePaths, _paths, build, write_checkpoint
from verify.tiny import TinySpec, original_config, original_state_dict

sys.path.insert(0, str(Path(__file__).parent))
from forkrun import Runner  # noqa: E402


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
    shutil.copytree(TEMPLATES["repo"], fx.original)


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
    _use(fx, "st")


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


# ---------------------------------------------------------------------------------------------------------------
# Round 2 (issue 16): the hostile inputs of the adversarial run, one row each
# ---------------------------------------------------------------------------------------------------------------

TEMPLATES: dict[str, FixturePaths] = {}  # built once per module (see the ``templates`` fixture)


def _use(fx, name: str, part: str = "original") -> None:
    """Replace one folder of the row's fixture with a copy of a template's (the safetensors or Phi-3 fixture)."""
    dst = getattr(fx, part)
    shutil.rmtree(dst)
    shutil.copytree(getattr(TEMPLATES[name], part), dst, symlinks=True)


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    out = edit(obj)
    path.write_text(out if isinstance(out, str) else json.dumps(obj))


def _cfg(key, value):
    def setup(fx, tmp):
        _edit_json(fx.original / "config.json", lambda c: c.__setitem__(key, value))

    return setup


def _vision(key, value):
    def setup(fx, tmp):
        _edit_json(fx.vision_model / "config.json", lambda c: c["vision_config"].__setitem__(key, value))

    return setup


def _pre(key, value):
    def setup(fx, tmp):
        _edit_json(fx.vision_model / "preprocessor_config.json", lambda c: c.__setitem__(key, value))

    return setup


def _raw(relpath: str, data: bytes | str):
    def setup(fx, tmp):
        p = fx.root / relpath
        p.unlink()
        p.write_bytes(data.encode() if isinstance(data, str) else data)

    return setup


def _sparse(relpath: str, size: int):
    def setup(fx, tmp):
        p = fx.root / relpath
        with open(p, "r+b") as f:
            f.truncate(size)  # the JSON text, then a hole: a huge file that costs no disk

    return setup


def _deep(relpath: str, depth: int = 100_000):
    return _raw(relpath, '{"a":' + "[" * depth + "]" * depth + "}")


ST1 = "model-00001-of-00002.safetensors"


def _st_edit(edit):
    """Rewrite the first safetensors shard's header: ``edit(entries, body)`` returns (header text, body)."""

    def setup(fx, tmp):
        _use(fx, "st")
        p = fx.original / ST1
        data = p.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        text, body = edit(header, data[8 + n :])
        raw = text.encode()
        p.write_bytes(struct.pack("<Q", len(raw)) + raw + body)

    return setup


def _tensors(h: dict) -> list[str]:
    return [k for k in h if k != "__metadata__"]


def _same_size_pair(h: dict) -> tuple[str, str]:
    by_size: dict[int, str] = {}
    for k in _tensors(h):
        a, b = h[k]["data_offsets"]
        if b - a in by_size:
            return by_size[b - a], k
        by_size[b - a] = k
    raise AssertionError("no two tensors of one size")


def _st_duplicate(h, body):
    """A name listed twice, the second time over another tensor's bytes (the library keeps the last and then
    finds the overlap; a reader that kept the last without checking would serve the other tensor's values)."""
    a, b = _same_size_pair(h)
    text = json.dumps(h)
    return text[:-1] + f", {json.dumps(a)}: {json.dumps(h[b])}}}", body


def _st_overlap(h, body):
    a, b = _same_size_pair(h)
    h[b]["data_offsets"] = list(h[a]["data_offsets"])
    return json.dumps(h), body


def _st_gap(h, body):
    for k in _tensors(h):
        h[k]["data_offsets"] = [x + 8 for x in h[k]["data_offsets"]]
    return json.dumps(h), b"\0" * 8 + body


def _st_entry(key: str, fn):
    def edit(h, body):
        k = _tensors(h)[0]
        h[k][key] = fn(h[k][key])
        return json.dumps(h), body

    return edit


def _st_text(fn):
    def edit(h, body):
        return fn(json.dumps(h), h), body

    return edit


def _st_first_offsets_text(h) -> str:
    return json.dumps(h[_tensors(h)[0]]["data_offsets"])


def _st_header_claims_more(fx, tmp):
    _use(fx, "st")
    p = fx.original / ST1
    data = bytearray(p.read_bytes())
    data[:8] = struct.pack("<Q", len(data))
    p.write_bytes(bytes(data))


def _index(edit):
    def setup(fx, tmp):
        _edit_json(fx.original / "pytorch_model.bin.index.json", lambda idx: edit(idx, fx, tmp))

    return setup


def _first_shard_as(name_fn):
    def edit(idx, fx, tmp):
        wm = idx["weight_map"]
        old = "pytorch_model-00001-of-00002.bin"
        new = name_fn(fx, tmp)
        for k, v in wm.items():
            if v == old:
                wm[k] = new

    return _index(edit)


def _symlinked_shard(fx, tmp):
    """A shard moved outside the folder and linked back in: the index names a file in the folder, which escapes."""
    outside = tmp / "elsewhere"
    outside.mkdir()
    shard = fx.original / "pytorch_model-00001-of-00002.bin"
    shutil.move(str(shard), str(outside / shard.name))
    shard.symlink_to(outside / shard.name)


def _shard_with_newline_name(fx, tmp):
    bad = "pytorch_model-00001\nconversion finished: all checks passed.bin"
    _edit_json(
        fx.original / "pytorch_model.bin.index.json",
        lambda idx: idx["weight_map"].update(
            {k: bad for k, v in idx["weight_map"].items() if v.startswith("pytorch_model-00001")}
        ),
    )


def _sd(mutate):
    def setup(fx, tmp):
        _rewrite_original(fx, mutate)

    return setup


def _pickle_bomb(fx, tmp):
    """data.pkl deflated: 1 MB on disk, 1 GiB when expanded (the adversarial run's was 6 GiB)."""
    import zipfile

    shard = fx.original / "pytorch_model-00001-of-00002.bin"
    shard.unlink()
    with zipfile.ZipFile(shard, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("archive/data.pkl", "w", force_zip64=True) as f:
            block = b"\0" * (1 << 20)
            for _ in range(1024):
                f.write(block)


def _compressed_record(fx, tmp):
    import zipfile

    shard = fx.original / "pytorch_model-00001-of-00002.bin"
    with zipfile.ZipFile(shard) as z:
        members = [(i, z.read(i)) for i in z.infolist()]
    shard.unlink()
    with zipfile.ZipFile(shard, "w") as z:
        for info, data in members:
            z.writestr(
                info.filename,
                data,
                compress_type=zipfile.ZIP_DEFLATED if "/data/" in info.filename else zipfile.ZIP_STORED,
            )


def _non_tensor_value(fx, tmp):
    shard = fx.original / "pytorch_model-00002-of-00002.bin"
    sd = torch.load(shard, weights_only=True)
    sd[next(iter(sd))] = 3
    torch.save(sd, shard)


def _huge_in(key: str, where=(0, 0)):
    def m(sd):
        sd[key][where] = 1e38  # finite in bfloat16, beyond float16's 65504

    return _sd(m)


def _garbage_spm(data: bytes, backbone: str = "vicuna"):
    def setup(fx, tmp):
        if backbone != "vicuna":
            for part in ("original", "text_model", "vision_model"):
                _use(fx, backbone, part)
        (fx.text_model / "tokenizer.model").write_bytes(data)

    return setup


def _big_tokenizer_json(fx, tmp):
    p = fx.text_model / "tokenizer.json"
    p.write_text("{}")
    os.truncate(p, 100 << 20)


def _key_named(key: str):
    return _sd(lambda sd: sd.__setitem__(key, torch.zeros(2, dtype=torch.bfloat16)))


def _dangling_output(fx, tmp):
    (tmp / "out").symlink_to(tmp / "nowhere")


def _output_links_to_original(fx, tmp):
    (tmp / "out").symlink_to(fx.original)


def _original_is_a_link(fx, tmp):
    (tmp / "link").symlink_to(fx.original)


def _single_file_shard_inside_output(fx, tmp):
    """A single-file checkpoint whose weights are a symlink into the (existing, non-empty) output folder."""
    out = tmp / "out"
    out.mkdir()
    sd = original_state_dict(TinySpec(), seed=0)
    for p in fx.original.glob("pytorch_model*"):
        p.unlink()
    torch.save(sd, out / "weights.bin")
    (fx.original / "pytorch_model.bin").symlink_to(out / "weights.bin")


def _repo(edit_manifest):
    """verify rows: a copy of the converted template with its conversion.json edited."""

    def setup(fx, tmp):
        shutil.copytree(TEMPLATES["repo"], tmp / "repo")
        p = tmp / "repo" / "conversion.json"
        m = json.loads(p.read_text())
        out = edit_manifest(m)
        p.write_text(out if isinstance(out, str) else json.dumps(m))
        return {
            "tool": "verify",
            "argv": [
                str(tmp / "repo"),
                "--original",
                str(fx.original),
                "--text-model",
                str(fx.text_model),
                "--vision-model",
                str(fx.vision_model),
                "--quiet",
            ],
        }

    return setup


def _outputs_add(name: str):
    return _repo(lambda m: m["outputs"].__setitem__(name, "0" * 64))


ROUND2 = [
    # --- the output overlaps an input: refused before any work, --force or not (it used to delete the original)
    ("output-is-original-force", None, ["@fx/original"], "--output is --original"),
    ("output-is-original-no-force", None, ["@fx/original", "-no-force"], "--output is --original"),
    ("output-contains-inputs-force", None, ["@fx"], "--output contains --original"),
    ("output-inside-original", None, ["@fx/original/converted"], "--output lies inside --original"),
    ("output-is-text-model", None, ["@fx/text-model"], "--output is --text-model"),
    ("output-is-vision-model", None, ["@fx/vision-model"], "--output is --vision-model"),
    ("output-symlink-to-original", _output_links_to_original, [], "--output is --original"),
    (
        "original-via-symlink-is-output",
        _original_is_a_link,
        ["@fx/original", "--original", "@link"],
        "--output is --original",
    ),
    ("weights-symlinked-from-output", _single_file_shard_inside_output, [], "--original file pytorch_model.bin"),
    ("dangling-symlink-output", _dangling_output, [], "--output is a symlink to"),
    # --- safetensors headers, as strict as the safetensors library
    ("st-duplicate-name", _st_edit(_st_duplicate), [], "twice in one object"),
    ("st-overlapping-offsets", _st_edit(_st_overlap), [], "overlaps the previous tensor"),
    ("st-gap-before-first", _st_edit(_st_gap), [], "leaves a gap of 8 bytes"),
    (
        "st-float-offsets",
        _st_edit(_st_entry("data_offsets", lambda o: [float(o[0]), float(o[1])])),
        [],
        "expected data_offsets [begin, end] of integers",
    ),
    (
        "st-negative-offset",
        _st_edit(_st_entry("data_offsets", lambda o: [-1, o[1]])),
        [],
        "expected data_offsets [begin, end] of integers",
    ),
    ("st-end-before-begin", _st_edit(_st_entry("data_offsets", lambda o: [o[1], o[0]])), [], "0 <= begin <= end"),
    (
        "st-infinity-offset",
        _st_edit(_st_text(lambda t, h: t.replace(_st_first_offsets_text(h), "[0, Infinity]", 1))),
        [],
        "Infinity (not valid JSON",
    ),
    (
        "st-negative-shape",
        _st_edit(_st_entry("shape", lambda s: [-s[0]] + s[1:])),
        [],
        "expected a shape of non-negative integers",
    ),
    (
        "st-float-shape",
        _st_edit(_st_entry("shape", lambda s: [float(d) for d in s])),
        [],
        "expected a shape of non-negative integers",
    ),
    (
        "st-bool-shape",
        _st_edit(_st_entry("shape", lambda s: [True] * len(s))),
        [],
        "expected a shape of non-negative integers",
    ),
    (
        "st-5000-digit-shape",
        _st_edit(_st_text(lambda t, h: t.replace('"shape": [', '"shape": [' + "9" * 5000 + ", ", 1))),
        [],
        "an integer of 5000 digits",
    ),
    ("st-unknown-dtype", _st_edit(_st_entry("dtype", lambda d: "F8_E4M3")), [], "dtype 'F8_E4M3' is not one of"),
    (
        "st-entry-without-shape",
        _st_edit(lambda h, b: (h[_tensors(h)[0]].pop("shape"), (json.dumps(h), b))[1]),
        [],
        "expected a header entry with dtype, shape and data_offsets",
    ),
    (
        "st-entry-not-object",
        _st_edit(lambda h, b: (h.__setitem__(_tensors(h)[0], [1]), (json.dumps(h), b))[1]),
        [],
        "expected a header entry with dtype, shape and data_offsets, found a JSON array",
    ),
    ("st-trailing-bytes", _st_edit(lambda h, b: (json.dumps(h), b + b"\0" * 16)), [], "16 bytes after the last tensor"),
    ("st-header-claims-file", _st_header_claims_more, [], "corrupt safetensors header (claims"),
    (
        "st-metadata-not-strings",
        _st_edit(lambda h, b: (h.__setitem__("__metadata__", {"format": 1}), (json.dumps(h), b))[1]),
        [],
        "__metadata__ must map names to strings",
    ),
    (
        "st-header-is-array",
        _st_edit(lambda h, b: ("[1, 2]", b)),
        [],
        "expected a JSON object at the top level, found a JSON array",
    ),
    # --- JSON inputs: bounded size and depth, strict numbers and types
    ("config-deep-nesting", _deep("original/config.json"), [], "64 levels"),
    (
        "config-5000-digit-int",
        _raw("original/config.json", '{"hidden_size": ' + "7" * 5000 + "}"),
        [],
        "an integer of 5000 digits",
    ),
    ("config-nan", _raw("original/config.json", '{"rms_norm_eps": NaN}'), [], "NaN (not valid JSON"),
    ("config-overflowing-float", _raw("original/config.json", '{"rms_norm_eps": 1e999}'), [], "overflows to inf"),
    (
        "config-is-array",
        _raw("original/config.json", "[]"),
        [],
        "expected a JSON object at the top level, found a JSON array",
    ),
    (
        "config-8gb-sparse",
        _sparse("original/config.json", 8 << 30),
        [],
        "expected a JSON file of at most 16.0 MiB, found 8.0 GiB",
    ),
    (
        "config-is-fifo",
        lambda fx, tmp: (fx.original.joinpath("config.json").unlink(), os.mkfifo(fx.original / "config.json")),
        [],
        "expected a regular JSON file, found a special file",
    ),
    (
        "config-duplicate-key",
        _raw("original/config.json", '{"hidden_size": 64, "hidden_size": 32}'),
        [],
        "the key 'hidden_size' twice",
    ),
    ("config-not-utf8", _raw("original/config.json", b'{"model_type": "\xff"}'), [], "expected UTF-8 JSON"),
    ("index-is-array", _raw("original/pytorch_model.bin.index.json", "[]"), [], "found a JSON array"),
    (
        "index-8gb-sparse",
        _sparse("original/pytorch_model.bin.index.json", 8 << 30),
        [],
        "pytorch_model.bin.index.json: expected a JSON file of at most",
    ),
    ("index-deep-nesting", _deep("original/pytorch_model.bin.index.json"), [], "64 levels"),
    (
        "index-value-not-string",
        _index(lambda idx, fx, tmp: idx["weight_map"].__setitem__("lm_head.weight", 7)),
        [],
        "weight_map['lm_head.weight'] is an integer",
    ),
    (
        "tokenizer-config-nan",
        _raw("text-model/tokenizer_config.json", '{"legacy": NaN}'),
        [],
        "tokenizer_config.json: expected strict JSON, found NaN",
    ),
    (
        "special-tokens-map-array",
        _raw("text-model/special_tokens_map.json", "[1]"),
        [],
        "special_tokens_map.json: expected a JSON object",
    ),
    (
        "vision-config-overflow",
        _raw("vision-model/config.json", '{"model_type": "clip", "vision_config": {"hidden_size": 1e999}}'),
        [],
        "overflows to inf",
    ),
    (
        "preprocessor-is-dev-zero",
        lambda fx, tmp: (
            fx.vision_model.joinpath("preprocessor_config.json").unlink(),
            fx.vision_model.joinpath("preprocessor_config.json").symlink_to("/dev/zero"),
        ),
        [],
        "found a special file",
    ),
    # --- config numbers checked before anything is built from them
    (
        "hidden-size-negative",
        _cfg("hidden_size", -48),
        [],
        "hidden_size is -48 (an integer); expected an integer from 1 to 65536",
    ),
    (
        "heads-zero",
        _cfg("num_attention_heads", 0),
        [],
        "num_attention_heads is 0 (an integer); expected an integer from 1",
    ),
    ("hidden-size-string", _cfg("hidden_size", "64"), [], "hidden_size is '64' (a JSON string)"),
    (
        "layers-1e9-float",
        _cfg("num_hidden_layers", 1e9),
        [],
        "num_hidden_layers is 1000000000.0 (a number); expected an integer from 1 to 512",
    ),
    (
        "layers-1e9-int",
        _cfg("num_hidden_layers", 10**9),
        [],
        "num_hidden_layers is 1000000000 (an integer); expected an integer from 1 to 512",
    ),
    (
        "rms-norm-eps-negative",
        _cfg("rms_norm_eps", -1e-5),
        [],
        "rms_norm_eps is -1e-05 (a number); expected a finite number greater than 0",
    ),
    ("rms-norm-eps-string", _cfg("rms_norm_eps", "1e-5"), [], "rms_norm_eps is '1e-5'"),
    ("vocab-size-bool", _cfg("vocab_size", True), [], "vocab_size is True (true or false)"),
    (
        "kv-heads-not-dividing",
        _cfg("num_key_value_heads", 3),
        [],
        "num_attention_heads 4 is not a multiple of num_key_value_heads 3",
    ),
    (
        "hidden-not-multiple-of-heads",
        _cfg("hidden_size", 66),
        [],
        "hidden_size 66 is not a multiple of num_attention_heads 4",
    ),
    (
        "vision-patch-size-zero",
        _vision("patch_size", 0),
        [],
        "patch_size is 0 (an integer); expected an integer from 1",
    ),
    ("vision-hidden-string", _vision("hidden_size", "32"), [], "hidden_size is '32'"),
    (
        "crop-size-empty",
        _pre("crop_size", {}),
        [],
        "crop_size is {} (a JSON object); expected an integer from 1 to 16384 or an object with height, width",
    ),
    ("crop-size-string", _pre("crop_size", "42"), [], "crop_size is '42'"),
    (
        "image-std-zero",
        _pre("image_std", [0, 0, 0]),
        [],
        "image_std: 0 is 0 (an integer); expected a finite number greater than 0",
    ),
    ("size-negative", _pre("size", {"shortest_edge": -42}), [], "size: shortest_edge is -42"),
    # --- index paths confined to the folder, refused before anything is opened
    (
        "index-parent-path",
        _first_shard_as(lambda fx, tmp: "../pytorch_model-00001-of-00002.bin"),
        [],
        "names shard '../pytorch_model-00001-of-00002.bin'; expected a plain file name",
    ),
    (
        "index-absolute-path",
        _first_shard_as(lambda fx, tmp: "/etc/passwd"),
        [],
        "names shard '/etc/passwd'; expected a plain file name",
    ),
    ("index-proc-path", _first_shard_as(lambda fx, tmp: "/proc/self/pagemap"), [], "names shard '/proc/self/pagemap'"),
    ("index-subfolder-path", _first_shard_as(lambda fx, tmp: "sub/shard.bin"), [], "names shard 'sub/shard.bin'"),
    ("index-dot-path", _first_shard_as(lambda fx, tmp: "."), [], "names shard '.'"),
    ("index-symlink-escape", _symlinked_shard, [], "is a symlink to"),
    # --- pickles: bounded, and what torch.save really writes
    ("pickle-bomb-1gib", _pickle_bomb, [], "data.pkl claims 1073741824 bytes, expected at most"),
    ("pickle-compressed-record", _compressed_record, [], "is compressed; expected uncompressed records"),
    ("pickle-non-tensor-value", _non_tensor_value, [], "expected a flat dict of name -> tensor, found"),
    (
        "embedding-3d",
        _sd(lambda sd: sd.__setitem__("model.embed_tokens.weight", sd["model.embed_tokens.weight"][None])),
        [],
        "expected a 2-D matrix",
    ),
    (
        "embedding-1d",
        _sd(lambda sd: sd.__setitem__("model.embed_tokens.weight", sd["model.embed_tokens.weight"][:, 0].clone())),
        [],
        "expected a 2-D matrix",
    ),
    # --- dtype: a cast never turns a finite value into Inf
    (
        "fp16-cast-overflow-weight",
        _huge_in("model.layers.0.mlp.up_proj.weight"),
        ["--dtype", "float16"],
        "beyond the range of float16",
    ),
    ("fp16-cast-overflow-lm-head", _huge_in("lm_head.weight"), ["--dtype", "float16"], "beyond the range of float16"),
    # --- tokenizer.model must load with sentencepiece (it is copied into the output)
    ("garbage-tokenizer-model", _garbage_spm(b"garbage" * 100), [], "tokenizer.model: expected a sentencepiece model"),
    ("empty-tokenizer-model", _garbage_spm(b""), [], "tokenizer.model: expected a sentencepiece model"),
    (
        "garbage-tokenizer-model-beside-json",
        _garbage_spm(b"garbage" * 100, "phi3"),
        [],
        "tokenizer.model: expected a sentencepiece model",
    ),
    (
        "tokenizer-json-sparse-100mib",
        _big_tokenizer_json,
        [],
        "tokenizer.json: expected a tokenizer.json of at most 64.0 MiB",
    ),
    # --- names from files are printed escaped, on one line
    (
        "key-with-forged-line",
        _key_named("model.evil\nconversion finished: all checks passed"),
        [],
        "model.evil\\x0aconversion finished",
    ),
    ("key-with-escape-code", _key_named("model.evil\x1b[2J\x1b[31m"), [], "model.evil\\x1b[2J\\x1b[31m"),
    (
        "shard-name-with-newline",
        _shard_with_newline_name,
        [],
        "names shard pytorch_model-00001\\x0aconversion finished: all checks passed.bin which is missing",
    ),
    # --- verify: conversion.json read strictly, its paths confined, before anything is hashed
    (
        "verify-manifest-array",
        _repo(lambda m: "[]"),
        [],
        "conversion.json: expected a JSON object at the top level, found a JSON array",
    ),
    (
        "verify-manifest-etc-passwd",
        _outputs_add("/etc/passwd"),
        [],
        "names output file '/etc/passwd'; expected a plain file name",
    ),
    ("verify-manifest-proc-pagemap", _outputs_add("/proc/self/pagemap"), [], "names output file '/proc/self/pagemap'"),
    (
        "verify-manifest-parent-path",
        _outputs_add("../fx/original/config.json"),
        [],
        "names output file '../fx/original/config.json'",
    ),
    (
        "verify-manifest-nan",
        _repo(lambda m: json.dumps(m).replace('"seed": 0', '"seed": NaN', 1)),
        [],
        "NaN (not valid JSON",
    ),
    (
        "verify-manifest-deep",
        _repo(lambda m: json.dumps({**m, "x": "DEEP"}).replace('"DEEP"', "[" * 100 + "]" * 100)),
        [],
        "64 levels",
    ),
    (
        "verify-manifest-bad-digest",
        _repo(lambda m: m["outputs"].__setitem__("config.json", "x")),
        [],
        "expected a sha256",
    ),
    (
        "verify-manifest-outputs-list",
        _repo(lambda m: m.__setitem__("outputs", ["config.json"])),
        [],
        "expected outputs to be an object",
    ),
]


CASES = [
    # (id, setup, extra CLI args, message fragment)
    ("unmapped-key", _unmapped, [], "model.foo.weight"),
    ("plain-llava-projector", _plain_llava, [], "plain LLaVA-1.5 projector"),
    ("text-vocab-differs", _vocab_mismatch, [], "tokenizer has 997 tokens but the original embedding has 1000 rows"),
    ("vision-hidden-x5", _vision_hidden, [], "mm_hidden_size is 160 but the vision model's hidden_size 48 x 5"),
    ("vision-too-shallow", _shallow_vision, [], "the vision model has 5 layers, too few for feature layers"),
    ("missing-shard", _missing_shard, [], "pytorch_model-00002-of-00002.bin which is missing"),
    ("output-exists", _existing_output, ["-no-force"], "exists and is not empty; pass --force"),
    ("output-is-file", _output_is_file, [], "exists and is a file"),
    ("wrong-shape", _wrong_shape, [], "model.layers.1.mlp.up_proj.weight: shape (128, 63)"),
    ("nan-embedding", _nan_embedding, [], "model.embed_tokens.weight: holds NaN or Inf"),
    ("already-converted", _already_converted, [], "already a converted HF VipLlava repo"),
    ("unknown-dtype", None, ["--dtype", "int4"], "--dtype 'int4'"),
    (
        "seed-beyond-32-bits",
        None,
        ["--seed", str(2**32 + 5)],
        "--seed 4294967301: expected an integer with 0 <= seed < 2**32",
    ),
    ("malicious-pickle", _malicious_pickle, [], "pickle references builtins.exec"),
    ("unexpected-global", _unexpected_global, [], "pickle references collections.Counter"),
    ("truncated-bin", _truncated_bin, [], "pytorch_model-00002-of-00002.bin: truncated or corrupt"),
    ("corrupt-zip-directory", _corrupt_zip_directory, [], "pytorch_model-00001-of-00002.bin: truncated or corrupt"),
    ("truncated-safetensors", _truncated_safetensors, [], "model-00002-of-00002.safetensors: truncated"),
    ("flipped-header-byte", _flipped_header_byte, [], "model-00001-of-00002.safetensors"),
    ("key-in-two-shards", _key_in_two_shards, [], "present in two shards"),
    (
        "index-names-absent-key",
        _index_names_absent_key,
        [],
        "names model.layers.0.mlp.extra.weight in pytorch_model-00001-of-00002.bin but no shard holds it",
    ),
    ("empty-folder", _empty_folder, [], "config.json: missing"),
    ("inf-embedding", _inf_embedding, [], "model.embed_tokens.weight: holds NaN or Inf (first at row 0, column 0)"),
    ("unwritable-parent", _unwritable_parent, ["@ro/out"], "not writable"),
]


ROWS = CASES + ROUND2
MAX_SECONDS = 30.0  # per row, on a loaded 2-core machine (a quiet one takes 0.2-2 s)
MAX_EXTRA_RSS = 512 << 20  # peak resident memory above the interpreter's own (the pickle bomb alone expands to 1 GiB)
MEASURED: dict[str, dict] = {}


@pytest.fixture(scope="module")
def templates(tiny_fixture, backbone_pair, tmp_path_factory):
    """The fixtures every row copies from (never changes): the session's Vicuna .bin fixture and its converted repo,
    the session's Phi-3 fixture, and a Vicuna safetensors fixture built here (no other test uses that format)."""
    TEMPLATES["bin"], TEMPLATES["repo"] = backbone_pair("vicuna")
    TEMPLATES["phi3"] = tiny_fixture("phi3")
    TEMPLATES["st"] = build(tmp_path_factory.mktemp("templates") / "st", fmt="safetensors")
    yield TEMPLATES


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    r = Runner(cwd=str(tmp_path_factory.mktemp("runner")))
    yield r
    r.close()
    report = os.environ.get("BAD_INPUTS_REPORT")
    if report:
        Path(report).write_text(json.dumps(MEASURED, indent=1, sort_keys=True))


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (symlinks not followed): file contents by sha256 (a sparse giant by size and
    change times), link targets, folders, special files."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            elif stat.S_ISREG(st.st_mode) and st.st_size > 64 << 20:
                out[rel] = ("big", st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    out[rel] = ("file", hashlib.file_digest(f, "sha256").hexdigest())
            else:
                out[rel] = ("special", stat.S_IFMT(st.st_mode))
    return out


def _argv(fx: FixturePaths, tree: Path, extra: list[str]) -> tuple[list[str], bool]:
    """The CLI arguments: ``@name`` is a path in the row's folder; a leading ``@name`` is the --output;
    ``-no-force`` drops the --force every other row gets."""
    extra = list(extra)
    force = "-no-force" not in extra
    extra = [a for a in extra if a != "-no-force"]
    output = tree / "out"
    if extra and extra[0].startswith("@"):
        output, extra = tree / extra[0][1:], extra[1:]
    extra = [str(tree / a[1:]) if a.startswith("@") else a for a in extra]
    argv = [
        "--original",
        str(fx.original),
        "--text-model",
        str(fx.text_model),
        "--vision-model",
        str(fx.vision_model),
        "--output",
        str(output),
        "--quiet",
        *extra,
    ]
    return argv + (["--force"] if force else []), force


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(row, tmp_path, templates, runner):
    name, setup, extra, fragment = row
    MARKER.unlink(missing_ok=True)
    tree, io = tmp_path / "tree", tmp_path / "io"
    io.mkdir()
    shutil.copytree(templates["bin"].root, tree / "fx", symlinks=True)
    fx = _paths(tree / "fx")
    try:
        spec = setup(fx, tree) if setup else None
        spec = spec if isinstance(spec, dict) else {}
        argv, _ = _argv(fx, tree, extra)
        before = tree_state(tree)
        result = runner.run(spec.get("tool", "convert"), spec.get("argv", argv), str(io))
        after = tree_state(tree)
    finally:
        _unmount(tree)
    err = result["stderr"].strip()
    extra_rss = result["maxrss_kb"] * 1024 - result["base_kb"] * 1024  # negative when the row touched few of its pages
    MEASURED[name] = {
        "code": result["code"],
        "seconds": round(result["seconds"], 3),
        "peak_rss_mb": result["maxrss_kb"] // 1024,
        "interpreter_rss_mb": result["base_kb"] // 1024,
        "stderr": err,
    }
    assert not MARKER.exists(), "the malicious pickle ran"
    assert result["code"] == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert fragment in err, err
    assert "; " in err, f"no 'what to do' clause: {err}"
    assert after == before, "the run wrote, removed or changed something"
    assert result["seconds"] < MAX_SECONDS, result
    assert extra_rss < MAX_EXTRA_RSS, result


ST_ROWS = [r for r in ROUND2 if r[0].startswith("st-")]


@pytest.mark.parametrize("row", ST_ROWS, ids=[r[0] for r in ST_ROWS])
def test_the_safetensors_library_refuses_every_header_we_refuse(row, tmp_path, templates):
    """The header rules are the library's: each hostile shard of the table is refused by safetensors itself."""
    from safetensors import SafetensorError, safe_open

    shutil.copytree(templates["bin"].root, tmp_path / "fx", symlinks=True)
    fx = _paths(tmp_path / "fx")
    row[1](fx, tmp_path)
    with pytest.raises(SafetensorError):
        with safe_open(str(fx.original / ST1), "pt") as f:
            for k in f.keys():
                f.get_tensor(k)


def _positive(runner, tmp_path, fx, output, *extra):
    io = tmp_path / "io"
    io.mkdir(exist_ok=True)
    argv = [
        "--original",
        str(fx.original),
        "--text-model",
        str(fx.text_model),
        "--vision-model",
        str(fx.vision_model),
        "--output",
        str(output),
        "--quiet",
        *extra,
    ]
    result = runner.run("convert", argv, str(io))
    assert result["code"] == 0 and result["stderr"] == "", result
    return result


def test_negative_bit_tensor_is_resolved(tmp_path, templates, runner):
    """torch.save of a negated view (``torch._neg_view``) stores the un-negated bytes and a flag: the output holds
    the values torch loads, not the raw bytes."""
    from safetensors.torch import load_file

    fx = build(tmp_path / "fx")  # its own: the shards are rewritten below
    shard = fx.original / "pytorch_model-00001-of-00002.bin"
    sd = torch.load(shard, weights_only=True)
    key = next(k for k in sd if k.endswith("mlp.up_proj.weight"))
    want = sd[key].clone()
    sd[key] = torch._neg_view(-want)
    assert sd[key].is_neg()
    torch.save(sd, shard)
    _positive(runner, tmp_path, fx, tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))[
        key.replace("model.layers", "language_model.model.layers")
    ]
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_lm_head_keeps_its_dtype(tmp_path, templates, runner):
    """An fp16 embedding and a bf16 lm_head holding 1e38: --dtype auto keeps the head in bf16, 1e38 stays finite."""
    from safetensors.torch import load_file

    fx = build(tmp_path / "fx")  # its own: the shards are rewritten below

    def m(sd):
        sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"].to(torch.float16)
        sd["lm_head.weight"][3, 5] = 1e38

    _rewrite_original(fx, m)
    head = original_state_dict(TinySpec(), seed=0)["lm_head.weight"]
    head[3, 5] = 1e38
    _positive(runner, tmp_path, fx, tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert out["language_model.model.embed_tokens.weight"].dtype == torch.float16
    got = out["language_model.lm_head.weight"]
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert torch.equal(got[: head.shape[0]].view(torch.int16), head.view(torch.int16))


def test_symlinked_output_to_a_full_folder_is_replaced_through_the_link(tmp_path, templates, runner):
    """--output a symlink to a non-empty folder, with --force: the folder it points at is replaced, the link stays,
    and no temporary folder is left anywhere."""
    fx = _paths(tmp_path / "fx")
    shutil.copytree(templates["bin"].root, fx.root, symlinks=True)
    real = tmp_path / "real"
    real.mkdir()
    (real / "old.txt").write_text("old")
    (tmp_path / "link").symlink_to(real)
    _positive(runner, tmp_path, fx, tmp_path / "link", "--force")
    assert (tmp_path / "link").is_symlink() and os.readlink(tmp_path / "link") == str(real)
    assert (real / "config.json").is_file() and not (real / "old.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".vipllava-")]


def test_a_240_character_output_name_works(tmp_path, templates, runner):
    fx = _paths(tmp_path / "fx")
    shutil.copytree(templates["bin"].root, fx.root, symlinks=True)
    out = tmp_path / ("o" * 240)
    _positive(runner, tmp_path, fx, out)
    _positive(runner, tmp_path, fx, out, "--force")  # the replacing path too (its temporary name ends in -old)
    assert (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".vipllava-")]


@pytest.mark.parametrize("entry", ["/proc/self/pagemap", "../outside.bin", "sub/x.bin", 7])
def test_verify_original_loaders_refuse_escaping_index_entries_before_opening(tmp_path, entry, monkeypatch):
    """verify's own readers of the original checkpoint: the index entry is refused before any file is opened."""
    from verify.context import OriginalTensors, VerifyUsageError
    from verify.original import OriginalLoadError, list_checkpoint_files

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": entry}}))
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])
    with pytest.raises(OriginalLoadError) as e:
        list_checkpoint_files(folder)
    assert "\n" not in str(e.value)
    with pytest.raises(VerifyUsageError):
        OriginalTensors(folder)
    assert all(p.endswith("pytorch_model.bin.index.json") for p in opened), opened


@pytest.mark.slow  # SIGKILLs converter runs (CI runs the slow tier)
@pytest.mark.parametrize("point", ["tensor_write", "before_fsync", "before_rename", "after_exchange"])
def test_inputs_byte_identical_after_a_killed_force_run(point, tmp_path, templates, runner):
    """SIGKILLed at each named point while replacing an existing output (--force): the inputs are untouched."""
    from convert.faults import FAULT_ENV

    fx = _paths(tmp_path / "fx")
    shutil.copytree(templates["bin"].root, fx.root, symlinks=True)
    shutil.copytree(templates["repo"], tmp_path / "out")
    before = tree_state(fx.root)
    io = tmp_path / "io"
    io.mkdir()
    argv = [
        "--original",
        str(fx.original),
        "--text-model",
        str(fx.text_model),
        "--vision-model",
        str(fx.vision_model),
        "--output",
        str(tmp_path / "out"),
        "--quiet",
        "--force",
        "--seed",
        "3",
    ]
    result = runner.run("convert", argv, str(io), env={FAULT_ENV: point})
    assert result["code"] == -9, result  # it really was killed there
    assert tree_state(fx.root) == before


def test_the_table_covers_every_class():
    """At least 60 rows, and every class of issue 16 has rows."""
    ids = [r[0] for r in ROWS]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)
    for prefix in (
        "output-",
        "st-",
        "config-",
        "index-",
        "pickle-",
        "fp16-cast",
        "garbage-tokenizer",
        "key-with",
        "verify-manifest",
        "layers-1e9",
        "crop-size",
        "dangling-symlink",
    ):
        assert any(i.startswith(prefix) for i in ids), prefix


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

    fx = build(tmp_path / "fx")  # its own: the shards are rewritten below
    st = build(tmp_path / "st", fmt="safetensors")  # its own: copied into fx, which is changed
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

    fx = build(tmp_path / "fx")  # its own: the shards are rewritten below
    _malicious_pickle(fx, tmp_path)
    MARKER.unlink(missing_ok=True)
    monkeypatch.setattr(sources, "_torch_version", lambda: (2, 5))
    capsys.readouterr()
    assert run_convert(fx, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "refusing .bin input on torch" in err and "CVE-2025-32434" in err and "\n" not in err.strip()
    assert not MARKER.exists() and not (tmp_path / "out").exists()
