"""Reading hostile input files: bounded size, strict JSON, names made safe to print.

Plumbing shared by ``convert`` and ``verify`` (it judges nothing about models): every JSON input (configs,
indexes, tokenizer configs, ``conversion.json``) goes through :func:`load_json`, and every file read whole goes
through :func:`read_bounded`. Each refusal is raised as the caller's own error type, one line, naming the file,
what was expected, what was found and what to do.

JSON is parsed strictly: UTF-8 only, at most :data:`MAX_DEPTH` levels of nesting, numbers of at most
:data:`MAX_NUMBER_CHARS` characters, no ``NaN``/``Infinity`` (nor a float that overflows to one), no key given twice
in one object, no lone surrogates in strings, and the top level of the expected type.
"""

from __future__ import annotations

import json
import math
import os
import stat
import unicodedata
from pathlib import Path

MAX_DEPTH = 64
MAX_NUMBER_CHARS = 64
MAX_JSON_BYTES = 16 << 20  # configs, indexes, manifests: real ones are kilobytes (a 10k-tensor index ~1 MB)
MAX_TOKENIZER_BYTES = 64 << 20  # tokenizer.model / tokenizer.json: real ones are 0.5-35 MB
MAX_PRINTED = 200  # characters of one attacker-controlled name in a message


class InputFileError(ValueError):
    """The default error type; callers pass their own (``ConversionError``, ``VerifyUsageError``)."""


def clean(text: object, limit: int | None = None) -> str:
    """``text`` made safe for a one-line message: control, format and line/paragraph separator characters are
    shown as escapes (a newline cannot split the line, an escape code cannot reach the terminal)."""
    s = str(text)
    out = []
    for ch in s:
        if _printable(ch):
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    s = "".join(out)
    if limit is not None and len(s) > limit:
        s = s[:limit] + "..."
    return s


def _printable(ch: str) -> bool:
    return unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


def name(text: object) -> str:
    """An attacker-controlled name (a key, a shard file name) for a message: escaped and length-bounded."""
    return clean(text, MAX_PRINTED)


def _size(n: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} bytes"


def read_bounded(path: Path, limit: int, error: type[Exception] = InputFileError, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (a FIFO, device or /proc file is refused before it
    is opened; a file that grows while being read is refused too)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise error(f"{clean(path)}: cannot read the {what} ({e.strerror}); check the path") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{clean(path)}: expected a regular {what}, found a special file; pass the real file")
    if st.st_size > limit:
        raise error(
            f"{clean(path)}: expected a {what} of at most {_size(limit)}, found {_size(st.st_size)}; "
            "this is not the right file, or it is corrupt"
        )
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"{clean(path)}: cannot read the {what} ({e.strerror}); check the file") from None
    if len(data) > limit:
        raise error(
            f"{clean(path)}: expected a {what} of at most {_size(limit)}, found more (it grew while read); "
            "this is not the right file"
        )
    return data


class _Refused(Exception):
    pass


def _int(s: str) -> int:
    if len(s) > MAX_NUMBER_CHARS:
        raise _Refused(f"an integer of {len(s)} digits (at most {MAX_NUMBER_CHARS})")
    return int(s)


def _float(s: str) -> float:
    if len(s) > MAX_NUMBER_CHARS:
        raise _Refused(f"a number of {len(s)} characters (at most {MAX_NUMBER_CHARS})")
    v = float(s)
    if not math.isfinite(v):
        raise _Refused(f"the number {s[:40]} which overflows to {v}")
    return v


def _constant(s: str):
    raise _Refused(f"{s} (not valid JSON; only finite numbers are allowed)")


def _pairs(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Refused(f"the key {name(k)!r} twice in one object")
        out[k] = v
    return out


def _walk(obj, max_depth: int) -> None:
    """Depth and string checks without recursion."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            if d > max_depth:
                raise _Refused(f"nesting deeper than {max_depth} levels")
            items = o.items() if isinstance(o, dict) else enumerate(o)
            for k, v in items:
                if isinstance(k, str):
                    _check_str(k)
                stack.append((v, d + 1))
        elif isinstance(o, str):
            _check_str(o)


def _check_str(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise _Refused("a string with a lone surrogate (not encodable as UTF-8)") from None


_TYPE_NAMES = {
    dict: "a JSON object",
    list: "a JSON array",
    str: "a JSON string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    type(None): "null",
}


def type_name(value: object) -> str:
    if isinstance(value, bool):
        return "true or false"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def parse_json(
    data: bytes | str,
    where: object,
    error: type[Exception] = InputFileError,
    expect: type | None = dict,
    max_depth: int = MAX_DEPTH,
    hint: str = "fix or re-download it",
):
    """Strictly parsed JSON (see the module docstring); ``where`` names the source in messages."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray, memoryview)) else data
        obj = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant, object_pairs_hook=_pairs)
        _walk(obj, max_depth)
    except UnicodeDecodeError as e:
        raise error(f"{clean(where)}: expected UTF-8 JSON, found an invalid byte at offset {e.start}; {hint}") from None
    except json.JSONDecodeError as e:
        raise error(
            f"{clean(where)}: expected JSON, found {clean(e.msg)} at line {e.lineno} column {e.colno}; {hint}"
        ) from None
    except RecursionError:
        raise error(
            f"{clean(where)}: expected JSON nested at most {max_depth} levels, found deeper nesting; {hint}"
        ) from None
    except _Refused as e:
        raise error(f"{clean(where)}: expected strict JSON, found {e}; {hint}") from None
    except ValueError as e:  # int() of a long literal and friends
        raise error(f"{clean(where)}: expected JSON, found an unreadable value ({clean(str(e), 80)}); {hint}") from None
    if expect is not None and not isinstance(obj, expect):
        raise error(
            f"{clean(where)}: expected {_TYPE_NAMES.get(expect, expect.__name__)} at the top level, found "
            f"{type_name(obj)}; {hint}"
        )
    return obj


def load_json(
    path: Path,
    error: type[Exception] = InputFileError,
    expect: type | None = dict,
    limit: int = MAX_JSON_BYTES,
    hint: str = "fix or re-download it",
):
    """A JSON file read with :func:`read_bounded` and parsed with :func:`parse_json`."""
    return parse_json(read_bounded(path, limit, error, "JSON file"), path, error, expect, hint=hint)


def confined(
    directory: Path, entry: object, error: type[Exception] = InputFileError, where: object = None, what: str = "file"
) -> Path:
    """``directory / entry`` for a file name taken from an input (an index's shard, a manifest's output), refused
    BEFORE anything is opened unless it is a plain name in ``directory``: a string, no path separator, not ``.``
    or ``..``, no NUL, and, if it is a symlink, resolving inside ``directory`` (or, for a Hugging Face cache
    snapshot, inside that repo's cache folder, where the blobs live)."""
    where = clean(where if where is not None else directory)
    if not isinstance(entry, str):
        raise error(f"{where}: expected a {what} name (a string), found {type_name(entry)}; fix or re-download it")
    if not entry or entry in (".", "..") or "/" in entry or "\\" in entry or "\x00" in entry or os.path.isabs(entry):
        raise error(
            f"{where}: names {what} {name(entry)!r}; expected a plain file name inside {clean(directory)} "
            "(no path, no '..'); refusing to open it, fix or re-download it"
        )
    path = Path(directory) / entry
    if path.is_symlink() or os.path.realpath(path) != os.path.join(os.path.realpath(directory), entry):
        root = Path(os.path.realpath(directory))
        allowed = [root]
        if root.parent.name == "snapshots":  # huggingface_hub cache: snapshots/<rev>/file -> ../../blobs/<sha>
            allowed.append(root.parent.parent / "blobs")
        target = Path(os.path.realpath(path))
        if not any(target.parent == a or a in target.parents for a in allowed):
            raise error(
                f"{where}: {what} {name(entry)!r} is a symlink to {clean(target)}, outside "
                f"{clean(directory)}; refusing to open it, copy the file into the folder"
            )
    return path
