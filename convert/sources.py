"""Inputs: resolve a local path or a Hub id, then open an original checkpoint lazily.

Tensors are never loaded into anonymous memory here: pickles go through ``torch.load(mmap=True,
weights_only=True)`` and safetensors are parsed from their header and viewed through a read-only memory map,
so a 14 GB checkpoint costs page cache, not RAM. Every inconsistency between an index and its shards is an
error that names the file.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import pickletools
import re
import struct
import sys
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConversionError
from .safejson import MAX_JSON_BYTES, confined, load_json, parse_json, type_name
from .safejson import name as safe_name

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_SINGLE = "pytorch_model.bin"

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_./-]+)?$")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class ResolvedInput:
    """Where an input came from and where it is on disk."""

    source: str  # what the user passed
    path: Path  # local directory or file
    repo_id: str | None = None
    revision: str | None = None  # resolved commit for hub inputs

    @property
    def directory(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def describe(self) -> dict:
        return {"source": self.source, "path": str(self.path), "repo_id": self.repo_id, "revision": self.revision}


def resolve(source: str | os.PathLike, what: str, allow_patterns: list[str] | None = None) -> ResolvedInput:
    """A local file or folder as is; otherwise ``owner/name[@revision]`` through huggingface_hub (its cache and
    ``HF_HUB_OFFLINE`` are honoured)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        return ResolvedInput(source=text, path=path.resolve())
    if not _HUB_ID.match(text):
        raise ConversionError(f"{what} {text!r}: no such file or folder, and not a Hub id (owner/name[@revision])")
    repo_id, _, revision = text.partition("@")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = snapshot_download(repo_id, revision=revision or None, allow_patterns=allow_patterns)
    except LocalEntryNotFoundError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        hint = (
            "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" if offline else str(e).splitlines()[0]
        )
        raise ConversionError(
            f"{what} {text!r}: Hub repo unavailable ({hint}); download it once with network access, "
            "or pass a local folder"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ConversionError(f"{what} {text!r}: could not fetch from the Hub ({str(e).splitlines()[0]})") from None
    local_path = Path(local).resolve()
    commit = local_path.name if re.fullmatch(r"[0-9a-f]{40}", local_path.name) else None
    return ResolvedInput(source=text, path=local_path, repo_id=repo_id, revision=commit)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hub_sha256(path: Path) -> str | None:
    """The sha256 the Hub published for a cached file: LFS blobs are stored under their sha256."""
    if not path.is_symlink():
        return None
    name = Path(os.readlink(path)).name
    return name if re.fullmatch(r"[0-9a-f]{64}", name) else None


def checked_sha256(path: Path, digest: str | None = None) -> str:
    """sha256 of a file (``digest`` if the caller already hashed it); for a Hub LFS file, also compared with the
    sha256 the Hub published."""
    digest = digest or sha256_file(path)
    expected = hub_sha256(path)
    if expected is not None and digest != expected:
        raise ConversionError(
            f"{path}: sha256 {digest[:12]}... but the Hub published {expected[:12]}...; the download is corrupt, "
            "delete it from the Hugging Face cache and download it again"
        )
    return digest


# ----------------------------------------------------------------------------------------------------------------
# safetensors, parsed by hand so that tensors stay file-backed
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """The parsed header (tensor entries only) and the byte offset where the data starts, validated as strictly
    as the safetensors library does: strict JSON with unique names; each entry with ``dtype``, ``shape`` and
    ``data_offsets``; integers only, non-negative; byte lengths matching dtype x shape; the tensors' byte ranges
    neither overlapping nor leaving gaps, and covering the data section exactly."""
    size = path.stat().st_size
    fix = "the file is corrupt or not written by safetensors; re-download it"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{path}: truncated safetensors file ({size} bytes); re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, SAFETENSORS_MAX_HEADER):
            raise ConversionError(
                f"{path}: corrupt safetensors header (claims {n} bytes, expected at most "
                f"{min(size - 8, SAFETENSORS_MAX_HEADER)}); re-download it"
            )
        raw = f.read(n)
    header = parse_json(raw, f"{path} (safetensors header)", ConversionError, dict, hint=fix)
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ConversionError(
            f"{path}: safetensors __metadata__ must map names to strings, found {type_name(meta)}; {fix}"
        )
    data_start = 8 + n
    data_len = size - data_start
    spans = []
    for key, entry in header.items():
        where = f"{path}: tensor {safe_name(key)!r}"
        if not isinstance(entry, dict) or not _ENTRY_KEYS <= set(entry):  # other keys are ignored, as the library does
            found = sorted(entry) if isinstance(entry, dict) else type_name(entry)
            raise ConversionError(
                f"{where}: expected a header entry with dtype, shape and data_offsets, found {safe_name(found)}; {fix}"
            )
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
            raise ConversionError(
                f"{where}: dtype {safe_name(dtype)!r} is not one of {', '.join(_SAFETENSORS_DTYPES)}; {fix}"
            )
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise ConversionError(
                f"{where}: expected a shape of non-negative integers, found {safe_name(shape)}; {fix}"
            )
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_int(x) and x >= 0 for x in offsets)
            and offsets[0] <= offsets[1]
        ):
            raise ConversionError(
                f"{where}: expected data_offsets [begin, end] of integers with 0 <= begin <= end, "
                f"found {safe_name(offsets)}; {fix}"
            )
        begin, stop = offsets
        expected = TensorInfo(_SAFETENSORS_DTYPES[dtype], tuple(shape)).nbytes
        if stop - begin != expected:
            raise ConversionError(f"{where}: spans {stop - begin} bytes but its dtype and shape need {expected}; {fix}")
        spans.append((begin, stop, key))
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            what = "overlaps the previous tensor" if begin < end else f"leaves a gap of {begin - end} bytes before it"
            raise ConversionError(f"{path}: tensor {safe_name(key)!r} at bytes [{begin}, {stop}) {what}; {fix}")
        end = stop
    if end > data_len:
        raise ConversionError(
            f"{path}: truncated (header needs {data_start + end} bytes, file has {size}); re-download it"
        )
    if end != data_len:
        raise ConversionError(
            f"{path}: {data_len - end} bytes after the last tensor that the header does not cover; {fix}"
        )
    return header, data_start


class _SafetensorsShard:
    def __init__(self, path: Path):
        self.path = path
        self.header, self.data_start = read_safetensors_header(path)
        self._map: mmap.mmap | None = None

    def keys(self) -> list[str]:
        return list(self.header)

    def info(self, key: str) -> TensorInfo:
        e = self.header[key]
        return TensorInfo(_SAFETENSORS_DTYPES[e["dtype"]], tuple(e["shape"]))

    def offset(self, key: str) -> int | None:
        """Where the tensor's bytes start in the file."""
        return self.data_start + int(self.header[key]["data_offsets"][0])

    def get(self, key: str) -> torch.Tensor:
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        info = self.info(key)
        begin, stop = self.header[key]["data_offsets"]
        if stop == begin:
            return torch.empty(info.shape, dtype=info.dtype)
        buf = memoryview(self._map)[self.data_start + begin : self.data_start + stop]
        import warnings

        with warnings.catch_warnings():  # read-only buffer: we never write through it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(buf, dtype=torch.uint8)
        return flat.view(info.dtype).reshape(info.shape)


# What a state-dict pickle written by torch.save may reference: plain containers, tensor rebuilders, storages.
_STORAGES = ("BFloat16", "Float", "Half", "Double", "Long", "Int", "Short", "Char", "Byte", "Bool")
ALLOWED_GLOBALS = frozenset(
    {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        *(f"torch.{t}Storage" for t in _STORAGES),
    }
)
_MIN_TORCH_FOR_PICKLES = (2, 6)  # weights_only=True had a bypass before 2.6 (CVE-2025-32434)


def _torch_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


MAX_PICKLE_BYTES = 8 << 20  # data.pkl of a state dict: ~100 bytes per tensor (a 13B shard's is ~50 KB)


def _read_state_pickle(path: Path) -> bytes:
    """data.pkl of a torch.save zip, read with a bound (a zip bomb is refused, never expanded); every record must
    be stored uncompressed, as torch.save writes it."""
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        names = [i for i in infos if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
        if len(names) != 1:
            raise ConversionError(f"{path}: not a torch.save checkpoint (no single data.pkl inside); re-download it")
        info = names[0]
        if info.file_size > MAX_PICKLE_BYTES:
            raise ConversionError(
                f"{path}: data.pkl claims {info.file_size} bytes, expected at most {MAX_PICKLE_BYTES} for a state "
                "dict; "
                "this is not a weights checkpoint, refusing to read it"
            )
        packed = next((i for i in infos if i.compress_type != zipfile.ZIP_STORED), None)
        if packed is not None:
            raise ConversionError(
                f"{path}: record {safe_name(packed.filename)} is compressed; expected uncompressed records as "
                "torch.save "
                "writes them; re-save the checkpoint with torch.save or download it again"
            )
        with z.open(info) as f:
            data = f.read(MAX_PICKLE_BYTES + 1)
        if len(data) > MAX_PICKLE_BYTES:
            raise ConversionError(f"{path}: data.pkl is larger than {MAX_PICKLE_BYTES} bytes; refusing to read it")
        return data


def scan_pickle(path: Path) -> None:
    """Refuse a torch.save zip whose pickle names any global outside :data:`ALLOWED_GLOBALS`, before anything
    is unpickled, naming the global. (``weights_only=True`` still guards the actual load.) Memory and time are
    bounded by :data:`MAX_PICKLE_BYTES`."""
    try:
        data = _read_state_pickle(path)
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        NotImplementedError,
        UnicodeDecodeError,
        EOFError,
        ValueError,
        struct.error,
        OSError,
    ):
        raise ConversionError(
            f"{path}: truncated or corrupt (not a readable zip-format torch checkpoint; a legacy pre-1.6 file must be "
            "re-saved with a current torch); re-download it"
        ) from None
    last: deque[str | None] = deque([None, None], maxlen=2)  # the two most recent pushes, if strings
    memo: dict[int, str] = {}
    memo_len = 0
    kinds: set[bool] = set()
    arg: Any  # the opcode's argument: an int for the memo opcodes, a str for the string ones
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            found = None
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                module, attr = NAME_MAPPING.get((module, attr), (IMPORT_MAPPING.get(module, module), attr))
                found = f"{module}.{attr}"  # as Python 3 resolves it (__builtin__.exec -> builtins.exec)
            elif name == "STACK_GLOBAL":
                if last[0] is None or last[1] is None:
                    raise ConversionError(
                        f"{path}: pickle builds a global it does not name plainly; refusing to load it"
                    )
                found = f"{last[0]}.{last[1]}"
            if found is not None and found not in ALLOWED_GLOBALS:
                raise ConversionError(
                    f"{path}: pickle references {safe_name(found)}, which is not a tensor, storage or plain container; "
                    "refusing to load it (it could run code); get the checkpoint from a trusted source or as "
                    "safetensors"
                )
            if "UNICODE" in name or name.endswith("STRING"):
                last.append(str(arg))
            elif name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
                kinds.add(name == "MEMOIZE")
                if len(kinds) > 1:  # torch.save never mixes them; keeping track of both would cost unbounded memory
                    raise ConversionError(
                        f"{path}: pickle mixes PUT and MEMOIZE; refusing to load it, re-save it with torch.save"
                    )
                slot = memo_len if name == "MEMOIZE" else int(arg)
                memo_len += name == "MEMOIZE"
                if last[1] is not None:
                    memo[slot] = last[1]
                else:
                    memo.pop(slot, None)
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                last.append(memo.get(int(arg)))
            else:
                last.append(None)
    except ConversionError:
        raise
    except Exception as e:  # pickletools raises ValueError and friends on malformed streams
        raise ConversionError(f"{path}: corrupt pickle ({e.__class__.__name__}); re-download it") from None


class _PickleShard:
    def __init__(self, path: Path):
        self.path = path
        if _torch_version() < _MIN_TORCH_FOR_PICKLES:
            raise ConversionError(
                f"{path}: refusing .bin input on torch {torch.__version__}: weights_only=True could be bypassed before "
                "torch 2.6 (CVE-2025-32434); upgrade torch or use safetensors input"
            )
        scan_pickle(path)
        try:
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            msg = str(e).splitlines()[0]
            if "zip archive" in msg or "central directory" in msg or "PytorchStreamReader" in msg:
                raise ConversionError(f"{path}: truncated or corrupt checkpoint file ({msg}); re-download it") from None
            raise ConversionError(f"{path}: cannot be read as a weights-only checkpoint ({msg})") from None
        except Exception as e:  # the unpickler's refusals (foreign globals) arrive as UnpicklingError
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise ConversionError(
                f"{path}: refused by the weights-only unpickler ({first}); the file holds more than tensors, "
                "do not load it with weights_only=False"
            ) from None
        if not isinstance(obj, dict):
            raise ConversionError(
                f"{path}: expected a flat dict of name -> tensor, found {type(obj).__name__}; "
                "pass a checkpoint saved from a state dict"
            )
        bad = next(((k, v) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
        if bad is not None:
            raise ConversionError(
                f"{path}: expected a flat dict of name -> tensor, found {safe_name(bad[0])!r} -> "
                f"{type(bad[1]).__name__}; pass a checkpoint saved from a state dict"
            )
        self._offsets = _record_offsets(path, obj)
        # torch.save keeps the lazy negation / conjugation bits of a view (``torch._neg_view``, ``x.conj()``): the
        # file holds the un-negated bytes. Resolve them here, and never copy such a tensor's bytes verbatim.
        for k, v in obj.items():
            if v.is_neg() or v.is_conj():
                obj[k] = v.resolve_conj().resolve_neg()
                if self._offsets is not None:
                    self._offsets.pop(k, None)
        self.tensors: dict[str, torch.Tensor] = obj

    def keys(self) -> list[str]:
        return list(self.tensors)

    def offset(self, key: str) -> int | None:
        """Where the tensor's bytes start in the file (None if the zip layout could not be matched)."""
        return None if self._offsets is None else self._offsets.get(key)

    def info(self, key: str) -> TensorInfo:
        t = self.tensors[key]
        return TensorInfo(t.dtype, tuple(t.shape))

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[key]


def _record_offsets(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, int] | None:
    """File offset of each tensor's bytes in a zip checkpoint loaded with ``mmap=True``, for the tensors whose
    bytes lie there as they are (contiguous, in the machine's byte order).

    torch maps the whole file once and slices each storage out of that map at its zip record's data offset, so
    storage pointers differ exactly as the record offsets do. The base is anchored at the first record and the
    result is accepted only if every storage lands on a record offset; otherwise None (the caller then simply
    reads the file separately). The writer copies these bytes verbatim and checks both ends of each tensor
    against what torch loads, and ``verify`` compares every tensor bit for bit."""
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        names = reader.get_all_records()
        # torch's stub for PyTorchFileReader lacks get_record_offset (present at runtime since torch 2.1)
        records = {reader.get_record_offset(n) for n in names if n.startswith("data/")}  # type: ignore[attr-defined]
        order = next((n for n in names if n.endswith("byteorder")), None)
        if order is not None and reader.get_record(order).decode().strip() != sys.byteorder:
            return None  # torch swapped the bytes while loading: the file's bytes are not the tensors'
    except Exception:  # a private torch API: if it moves, we lose an optimisation, not correctness
        return None
    ptrs = {k: t.untyped_storage().data_ptr() for k, t in tensors.items() if t.numel() > 0}
    if not ptrs or not records:
        return None
    base = min(ptrs.values()) - min(records)
    if any(p - base not in records for p in ptrs.values()):
        return None
    offsets = {k: t.data_ptr() - base for k, t in tensors.items() if t.numel() > 0 and t.is_contiguous()}
    for k, t in tensors.items():
        if t.numel() == 0:
            offsets[k] = min(records)
    return offsets


@dataclass
class Checkpoint:
    """An original checkpoint opened lazily: its files, its key -> file map and per-key tensor access."""

    directory: Path
    files: list[Path]
    weight_map: dict[str, Path]
    format: str  # "safetensors" | "bin"
    _shards: dict[Path, object] = field(default_factory=dict, repr=False)

    def _shard(self, path: Path):
        if path not in self._shards:
            self._shards[path] = _SafetensorsShard(path) if self.format == "safetensors" else _PickleShard(path)
        return self._shards[path]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def info(self, key: str) -> TensorInfo:
        return self._shard(self.weight_map[key]).info(key)

    def get(self, key: str) -> torch.Tensor:
        return self._shard(self.weight_map[key]).get(key)

    def location(self, key: str) -> tuple[Path, int] | None:
        """(file, byte offset of the tensor's data in it), or None where it cannot be told."""
        path = self.weight_map[key]
        offset = self._shard(path).offset(key)
        return None if offset is None else (path, offset)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self.weight_map:
            yield key, self.get(key)


def open_checkpoint(path: Path) -> Checkpoint:
    """Open a single weights file or a folder (single file or sharded with an index). Safetensors are preferred
    when both formats are present."""
    if path.is_file():
        if path.suffix == ".safetensors":
            files, fmt = [path], "safetensors"
        elif path.suffix in (".bin", ".pt", ".pth"):
            files, fmt = [path], "bin"
        elif path.name.endswith(".index.json"):
            return _open_indexed(path)
        else:
            raise ConversionError(f"{path}: expected a .safetensors or .bin weights file or an index .json")
        return _open_files(path.parent, files, fmt)
    directory = path
    # safetensors first: it never executes code
    for name, fmt in (
        (SAFE_INDEX, "safetensors"),
        (SAFE_SINGLE, "safetensors"),
        (BIN_INDEX, "bin"),
        (BIN_SINGLE, "bin"),
    ):
        if (directory / name).is_file():
            if name.endswith(".index.json"):
                return _open_indexed(directory / name)
            return _open_files(directory, [directory / name], fmt)
    found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    raise ConversionError(
        f"{directory}: no weights found (expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}; "
        f"found {found[:8] or 'nothing'}); pass the folder of an original ViP-LLaVA checkpoint"
    )


def _open_files(directory: Path, files: list[Path], fmt: str) -> Checkpoint:
    ckpt = Checkpoint(directory=directory, files=files, weight_map={}, format=fmt)
    for f in files:
        for key in ckpt._shard(f).keys():
            ckpt.weight_map[key] = f
    return ckpt


def _open_indexed(index_path: Path) -> Checkpoint:
    directory = index_path.parent
    fmt = "safetensors" if index_path.name == SAFE_INDEX or ".safetensors" in index_path.name else "bin"
    index = load_json(index_path, ConversionError, dict, MAX_JSON_BYTES, hint="re-download the checkpoint's index")
    raw_map = index.get("weight_map")
    if not isinstance(raw_map, dict):
        raise ConversionError(
            f"{index_path}: expected a weight_map object, found {type_name(raw_map)}; re-download the index"
        )
    bad = next(((k, v) for k, v in raw_map.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise ConversionError(
            f"{index_path}: weight_map[{safe_name(bad[0])!r}] is {type_name(bad[1])}; expected a shard "
            "file name; re-download the index"
        )
    # every shard name is confined to the folder BEFORE any file is looked at
    paths = {n: confined(directory, n, ConversionError, index_path, "shard") for n in set(raw_map.values())}
    names = sorted(paths)
    missing = [n for n in names if not paths[n].is_file()]
    if missing:
        raise ConversionError(
            f"{index_path}: names shard {safe_name(missing[0])} which is missing from {directory}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; re-download the checkpoint"
        )
    files = [paths[n] for n in names]
    ckpt = Checkpoint(directory=directory, files=files, weight_map={}, format=fmt)
    seen: dict[str, Path] = {}
    for f in files:
        for key in ckpt._shard(f).keys():
            if key in seen:
                raise ConversionError(
                    f"{safe_name(key)}: present in two shards, {seen[key].name} and {f.name}; the checkpoint is "
                    "inconsistent"
                )
            seen[key] = f
    for key, name in raw_map.items():
        if key not in seen:
            raise ConversionError(
                f"{index_path}: names {safe_name(key)} in {safe_name(name)} but no shard holds it; re-download "
                f"{safe_name(name)}"
            )
        if seen[key].name != name:
            raise ConversionError(
                f"{index_path}: places {safe_name(key)} in {safe_name(name)} but it is in {seen[key].name}"
            )
    extra = sorted(set(seen) - set(raw_map))
    if extra:
        raise ConversionError(
            f"{seen[extra[0]]}: holds {safe_name(extra[0])} which the index {index_path.name} does not list"
        )
    ckpt.weight_map = {k: seen[k] for k in raw_map}
    return ckpt
