"""Write a synthetic ORIGINAL-format ViP-LLaVA checkpoint at real size, with seeded random weights.

    python -m bench.make_checkpoint OUT --size 7b|13b|mini [--seed 0] [--shards N] [--check-format]

    OUT/
      original/       config.json (llava_llama, mm fields) + pytorch_model-0000k-of-0000n.bin + index
      text-model/     tokenizer.model (exactly `vocab` pieces), tokenizer_config.json, special_tokens_map.json,
                      config.json (plain Llama)
      vision-model/   config.json (full CLIP config, vision_config = CLIP-L/14-336 or the mini tower),
                      preprocessor_config.json (CLIPImageProcessor, 336)
      checkpoint.json what was built: spec, seed, shard sizes, generation time

Shapes and key names are the ORIGINAL layout (``verify.tiny.original_key_shapes``: text, CLIP tower with
``vision_model.``, ViP projector, legacy ``rotary_emb.inv_freq`` / ``position_ids`` buffers). Weights are bf16,
buffers keep their real dtypes and values (inv_freq fp32, position_ids int64).

The shards are real ``torch.save`` zip files, as ``save_pretrained`` wrote them on the Hub, but written without
ever holding a shard in memory: ``torch.save`` runs under ``torch.serialization.skip_data()`` on untouched
``torch.empty`` tensors (it lays out the zip, records at their final offsets, and leaves the storage bytes
empty); then every storage record is filled in place, chunk by chunk, from a per-tensor seeded generator, and its
CRC-32 (data descriptor and central directory) and the archive's ``serialization_id`` (20 fixed digits + the combined
record CRCs) are patched to what a plain ``torch.save`` of the same values writes. ``--check-format`` (default for
``mini``) proves that: it materialises the state dict, ``torch.save``s it, and compares the bytes.
Peak memory is a few chunks (~100 MB), whatever the size.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fixtures.build import SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, TOKENIZER_MODEL, split_into_shards
from verify.tiny import (
    TinySpec,
    base_text_config,
    buffer_value,
    clip_config,
    clip_preprocessor_config,
    is_legacy_buffer,
    original_config,
    original_key_shapes,
)

# CLIP ViT-L/14 at 336 px, the tower every ViP-LLaVA uses
CLIP_L_336 = dict(
    vision_hidden=1024, vision_intermediate=4096, vision_layers=24, vision_heads=16, image_size=336, patch_size=14
)

SIZES: dict[str, TinySpec] = {
    # Llama-2 7B (Vicuna-1.5 7B)
    "7b": TinySpec(
        vocab_size=32000,
        text_hidden=4096,
        text_intermediate=11008,
        text_layers=32,
        text_heads=32,
        text_kv_heads=32,
        max_position_embeddings=4096,
        **CLIP_L_336,
    ),
    # Llama-2 13B (Vicuna-1.5 13B)
    "13b": TinySpec(
        vocab_size=32000,
        text_hidden=5120,
        text_intermediate=13824,
        text_layers=40,
        text_heads=40,
        text_kv_heads=40,
        max_position_embeddings=4096,
        **CLIP_L_336,
    ),
    # runs end to end in about a minute: the real 336 px / 576-patch geometry, small widths
    "mini": TinySpec(
        vocab_size=997,
        text_hidden=512,
        text_intermediate=1376,
        text_layers=4,
        text_heads=8,
        text_kv_heads=8,
        vision_hidden=128,
        vision_intermediate=512,
        vision_layers=12,
        vision_heads=4,
        image_size=336,
        patch_size=14,
        max_position_embeddings=4096,
    ),
}
DEFAULT_SHARDS = {"7b": 2, "13b": 3, "mini": 2}  # as on the Hub: mucai/vip-llava-7b has 2 .bin shards, 13b has 3

CHUNK = 1 << 22  # elements generated at a time (16 MB of fp32)
INDEX = "pytorch_model.bin.index.json"


def shard_name(k: int, n: int) -> str:
    return f"pytorch_model-{k:05d}-of-{n:05d}.bin"


# ----------------------------------------------------------------------------------------------------------------
# values: one seeded generator per tensor, so a tensor's values do not depend on the shard layout
# ----------------------------------------------------------------------------------------------------------------


def tensor_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def init_rule(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(offset, scale): values are offset + scale * N(0, 1)."""
    if key.endswith(".bias"):
        return 0.0, 0.02
    if key.endswith("embed_tokens.weight") or key.endswith("lm_head.weight"):
        return 0.0, 0.02  # Llama-2's embedding rows have std ~0.02
    if key.endswith("class_embedding") or key.endswith("position_embedding.weight"):
        return 0.0, 0.02
    if key.endswith(".weight") and "norm" in key.rsplit(".", 2)[-2]:  # RMSNorm / LayerNorm gains
        return 1.0, 0.05
    if len(shape) >= 2:
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        return 0.0, fan_in**-0.5
    raise ValueError(f"no initialisation rule for {key} {shape}")


def key_dtype(key: str) -> torch.dtype:
    if key.endswith(".rotary_emb.inv_freq"):
        return torch.float32
    if key.endswith(".embeddings.position_ids"):
        return torch.int64
    return torch.bfloat16


def value_chunks(spec: TinySpec, key: str, shape: tuple[int, ...], seed: int):
    """The tensor's bytes, in order, as a sequence of bf16 chunks (or the whole buffer for legacy buffers)."""
    if is_legacy_buffer(key):
        yield buffer_value(spec, key).reshape(-1)
        return
    numel = 1
    for d in shape:
        numel *= d
    offset, scale = init_rule(key, shape)
    g = torch.Generator().manual_seed(tensor_seed(seed, key))
    buf = torch.empty(min(CHUNK, numel), dtype=torch.float32)
    for start in range(0, numel, CHUNK):
        n = min(CHUNK, numel - start)
        x = buf[:n]
        torch.randn(n, generator=g, out=x)
        x.mul_(scale)
        if offset:
            x.add_(offset)
        yield x.to(torch.bfloat16)


def materialize(spec: TinySpec, key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The whole tensor in memory (only for --check-format on small sizes)."""
    return torch.cat(list(value_chunks(spec, key, shape, seed))).reshape(shape)


# ----------------------------------------------------------------------------------------------------------------
# torch.save zip: lay out with skip_data, then fill records in place and patch the CRCs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Record:
    name: str
    local_offset: int  # local file header
    central_offset: int  # central directory header
    data_offset: int
    size: int
    descriptor: bool  # sizes and CRC follow the data (flag bit 3, as torch.save writes); else in the local header


def zip_records(path: Path) -> list[Record]:
    """Every record of a stored (uncompressed) zip, with where its bytes and its two CRC fields are."""
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        start_dir = z.start_dir
    out = []
    with open(path, "rb") as f:
        pos = start_dir
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED:
                raise RuntimeError(f"{path}: {info.filename} is compressed; not a torch.save file")
            f.seek(pos)
            central = f.read(46)
            if central[:4] != b"PK\x01\x02":
                raise RuntimeError(f"{path}: central directory out of step at {pos}")
            n, e, c = struct.unpack("<HHH", central[28:34])
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                raise RuntimeError(f"{path}: no local header for {info.filename} at {info.header_offset}")
            ln, le = struct.unpack("<HH", local[26:30])
            rec = Record(
                info.filename,
                info.header_offset,
                pos,
                info.header_offset + 30 + ln + le,
                info.file_size,
                bool(info.flag_bits & 0x08),
            )
            if rec.descriptor:
                f.seek(rec.data_offset + rec.size)
                if f.read(4) != b"PK\x07\x08":
                    raise RuntimeError(f"{path}: {info.filename} has no signed data descriptor after its bytes")
            out.append(rec)
            pos += 46 + n + e + c
    return out


def _patch_crc(f, rec: Record, crc: int) -> None:
    packed = struct.pack("<I", crc)
    if rec.descriptor:  # the local header keeps 0, as the streaming writer leaves it
        os.pwrite(f.fileno(), packed, rec.data_offset + rec.size + 4)
    else:
        os.pwrite(f.fileno(), packed, rec.local_offset + 14)
    os.pwrite(f.fileno(), packed, rec.central_offset + 16)


def _hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64-bit size_t (boost's), as PyTorchStreamWriter folds the record CRCs."""
    m = (1 << 64) - 1
    return (seed ^ ((value + 0x9E3779B9 + ((seed << 6) & m) + (seed >> 2)) & m)) & m


def _fill_record(fd: int, rec: Record, chunks) -> int:
    crc = 0
    pos = rec.data_offset
    for chunk in chunks:
        mv = memoryview(chunk.contiguous().view(torch.uint8).numpy())
        os.pwrite(fd, mv, pos)
        crc = zlib.crc32(mv, crc)
        pos += len(mv)
    if pos - rec.data_offset != rec.size:
        raise RuntimeError(f"record {rec.name}: wrote {pos - rec.data_offset} bytes, the zip reserved {rec.size}")
    return crc


def write_shard(path: Path, spec: TinySpec, keys: list[tuple[str, tuple[int, ...]]], seed: int, workers: int) -> None:
    """One ``torch.save`` file holding ``keys`` (a plain dict in this order), filled in place."""
    skeleton = {k: torch.empty(shape, dtype=key_dtype(k)) for k, shape in keys}  # untouched: no resident pages
    with torch.serialization.skip_data():
        torch.save(skeleton, path)
    del skeleton
    records = zip_records(path)
    by_name = {r.name.split("/", 1)[1]: r for r in records}
    # torch.save numbers storages in the order it meets them: dict order, one storage per tensor
    crcs: dict[str, int] = {}
    with open(path, "r+b") as f:
        fd = f.fileno()

        def job(i: int, key: str, shape: tuple[int, ...]) -> tuple[str, int]:
            rec = by_name[f"data/{i}"]
            return rec.name, _fill_record(fd, rec, value_chunks(spec, key, shape, seed))

        with futures.ThreadPoolExecutor(max_workers=workers) as pool:
            # largest first so the two workers finish together
            order = sorted(range(len(keys)), key=lambda i: -by_name[f"data/{i}"].size)
            for name, crc in pool.map(lambda i: job(i, *keys[i]), order):
                crcs[name] = crc
        combined = 0
        sid = None
        for rec in records:
            if rec.name.endswith("/.data/serialization_id"):
                sid = rec
                break
            if rec.name in crcs:
                _patch_crc(f, rec, crcs[rec.name])
                crc = crcs[rec.name]
            else:
                f.seek(rec.data_offset)
                crc = zlib.crc32(f.read(rec.size))
            combined = _hash_combine(combined, crc)
        if sid is None or sid.size != 40:
            raise RuntimeError(
                f"{path}: no 40-byte serialization_id record; torch {torch.__version__} changed its format"
            )
        f.seek(sid.data_offset)
        new_id = f.read(20) + f"{combined:020d}".encode()
        os.pwrite(fd, new_id, sid.data_offset)
        _patch_crc(f, sid, zlib.crc32(new_id))
        f.flush()
        os.fsync(fd)


# ----------------------------------------------------------------------------------------------------------------
# tokenizer: a Llama-style sentencepiece BPE model with exactly `vocab` pieces
# ----------------------------------------------------------------------------------------------------------------


def padded_tokenizer(vocab: int) -> bytes:
    """The fixture's 997-piece BPE model (byte fallback, dummy prefix; ``fixtures/tokenizer.model``) grown to
    exactly ``vocab`` pieces by appending NORMAL pieces that are concatenations of two existing normal pieces
    (so each is a valid BPE merge), in a fixed order, with scores below every existing piece."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    model.ParseFromString(TOKENIZER_MODEL.read_bytes())
    if len(model.pieces) > vocab:
        raise ValueError(f"base tokenizer has {len(model.pieces)} pieces, more than {vocab}")
    normal = [p.piece for p in model.pieces if p.type == pb.ModelProto.SentencePiece.NORMAL]
    seen = {p.piece for p in model.pieces}
    score = min(p.score for p in model.pieces)
    need = vocab - len(model.pieces)
    for a in normal:
        if need == 0:
            break
        for b in normal:
            if need == 0:
                break
            s = a + b
            if s in seen or "\u2581" in b:  # '▁' only at the start of a piece, as Llama's are
                continue
            seen.add(s)
            score -= 1.0
            piece = model.pieces.add()
            piece.piece, piece.score, piece.type = s, score, pb.ModelProto.SentencePiece.NORMAL
            need -= 1
    if need:
        raise ValueError(f"could not reach {vocab} pieces")
    model.trainer_spec.vocab_size = vocab
    return model.SerializeToString()


# ----------------------------------------------------------------------------------------------------------------
# configs and folders
# ----------------------------------------------------------------------------------------------------------------

CLIP_L_TEXT = {
    "model_type": "clip_text_model",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
}


def full_clip_config(spec: TinySpec) -> dict:
    cfg = clip_config(spec)
    cfg["projection_dim"] = 768
    cfg["text_config"] = dict(CLIP_L_TEXT)
    cfg["vision_config"]["projection_dim"] = 768
    return cfg


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def check_format(spec: TinySpec, seed: int, original: Path, groups: list[list[str]], shapes: dict) -> None:
    """Materialise every shard, ``torch.save`` it, and require the very same bytes as the in-place file."""
    with tempfile.TemporaryDirectory() as tmp:
        for k, keys in enumerate(groups, 1):
            name = shard_name(k, len(groups))
            sd = {key: materialize(spec, key, shapes[key], seed) for key in keys}
            ref = Path(tmp) / name
            torch.save(sd, ref)
            if ref.read_bytes() != (original / name).read_bytes():
                raise RuntimeError(f"{name}: in-place file differs from torch.save of the same values")
            loaded = torch.load(original / name, weights_only=True)
            if list(loaded) != keys or not all(torch.equal(loaded[key], sd[key]) for key in keys):
                raise RuntimeError(f"{name}: does not load back to the generated values")


def build(
    out: Path,
    size: str,
    seed: int = 0,
    shards: int | None = None,
    workers: int | None = None,
    check: bool | None = None,
    log=print,
) -> dict:
    spec = SIZES[size]
    shards = DEFAULT_SHARDS[size] if shards is None else shards
    workers = workers or os.cpu_count() or 1
    check = (size == "mini") if check is None else check
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; choose a new folder")
    original, text_dir, vision_dir = out / "original", out / "text-model", out / "vision-model"
    for d in (original, text_dir, vision_dir):
        d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    shapes = original_key_shapes(spec)
    sizes = [(k, _nbytes(s, key_dtype(k))) for k, s in shapes.items()]
    groups = split_into_shards(sizes, shards)
    weight_map = {}
    shard_bytes = {}
    for k, keys in enumerate(groups, 1):
        name = shard_name(k, len(groups))
        ts = time.perf_counter()
        write_shard(original / name, spec, [(key, shapes[key]) for key in keys], seed, workers)
        shard_bytes[name] = (original / name).stat().st_size
        log(f"  {name}: {len(keys)} tensors, {shard_bytes[name] / 1e9:.2f} GB in {time.perf_counter() - ts:.1f} s")
        weight_map.update({key: name for key in keys})
    index = {"metadata": {"total_size": sum(b for _, b in sizes)}, "weight_map": dict(sorted(weight_map.items()))}
    (original / INDEX).write_bytes(_json_bytes(index))
    cfg = original_config(spec)
    cfg.update({"_name_or_path": f"synthetic/vip-llava-{size}", "transformers_version": "4.31.0"})
    (original / "config.json").write_bytes(_json_bytes(cfg))
    weights_seconds = time.perf_counter() - t0

    if spec.vocab_size == 997:
        shutil.copyfile(TOKENIZER_MODEL, text_dir / "tokenizer.model")
    else:
        (text_dir / "tokenizer.model").write_bytes(padded_tokenizer(spec.vocab_size))
    (text_dir / "tokenizer_config.json").write_bytes(_json_bytes(TOKENIZER_CONFIG))
    (text_dir / "special_tokens_map.json").write_bytes(_json_bytes(SPECIAL_TOKENS_MAP))
    (text_dir / "config.json").write_bytes(_json_bytes(base_text_config(spec)))
    (vision_dir / "config.json").write_bytes(_json_bytes(full_clip_config(spec)))
    (vision_dir / "preprocessor_config.json").write_bytes(_json_bytes(clip_preprocessor_config(spec)))
    seconds = time.perf_counter() - t0

    checked = None
    if check:
        tc = time.perf_counter()
        check_format(spec, seed, original, groups, shapes)
        checked = round(time.perf_counter() - tc, 2)
        log(f"  format check: every shard byte-identical to torch.save of the same values ({checked} s)")
    record = {
        "size": size,
        "spec": asdict(spec),
        "seed": seed,
        "tensors": len(shapes),
        "parameters": sum(_nbytes(s, torch.int8) for k, s in shapes.items() if not is_legacy_buffer(k)),
        "shards": shard_bytes,
        "original_bytes": sum(p.stat().st_size for p in original.iterdir()),
        "weights_seconds": round(weights_seconds, 2),
        "seconds": round(seconds, 2),
        "workers": workers,
        "format_check_seconds": checked,
        "torch": torch.__version__,
    }
    (out / "checkpoint.json").write_bytes(_json_bytes(record))
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", choices=sorted(SIZES), required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shards", type=int, default=None, help="number of .bin shards (default: 7b 2, 13b 3, mini 2)")
    ap.add_argument("--workers", type=int, default=None, help="threads filling tensors (default: all cores)")
    ap.add_argument(
        "--check-format",
        dest="check",
        action="store_true",
        default=None,
        help="compare every shard with torch.save of the materialised values (default for mini only)",
    )
    ap.add_argument("--no-check-format", dest="check", action="store_false")
    args = ap.parse_args(argv)
    try:
        rec = build(args.out, args.size, args.seed, args.shards, args.workers, args.check)
    except (FileExistsError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.out}: {rec['size']}, {rec['parameters'] / 1e9:.3f} B parameters, {rec['tensors']} tensors, "
        f"original {rec['original_bytes'] / 1e9:.2f} GB in {len(rec['shards'])} shards; "
        f"weights written in {rec['weights_seconds']} s, total {rec['seconds']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
