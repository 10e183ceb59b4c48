"""The converted tokenizer on the REAL vocabularies (Llama-2/Vicuna, Phi-3-mini, Llama-3; ``tests/realvocab.py``):
llama.cpp's 46 reference tokenizations, and a hypothesis property against the original pipeline over arbitrary
text. Planted defects (merges ranked by piece id, a Metaspace first-only prefix, a Llama-3 base without BOS) must
make these checks fail.

The expected side is written here from sentencepiece / tokenizers alone, restating the original (transformers
4.37.2, ``llava/mm_utils.py tokenizer_image_token``):

- Vicuna: the slow ``LlamaTokenizer`` with ``legacy: false``: ``tokenize`` prefixes "▁" to the chunk (after mapping
  literal "▁" to " "), splits it on the special tokens, encodes every text segment with sentencepiece WITHOUT dummy
  prefix (a segment starting with "▁"/" " through the ``<unk>`` trick: encode ``<unk>`` + segment, drop the unk
  pieces), and drops a lone leading "▁" before a special token.
- Phi-3: the fast tokenizer 4.37.2 built from ``tokenizer.model`` (builder.py ``use_fast=True``): split on the added
  tokens (``rstrip`` strips whitespace after the token), sentencepiece WITH dummy prefix on every segment.
- Llama-3: the base ``tokenizer.json`` as shipped (with BOS).
Each chunk between ``<image>`` markers is encoded with BOS; the first chunk's BOS is kept and every later chunk's
dropped; chunks are joined with the sentinel -200.
"""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

SENTINEL = -200
IMAGE = "<image>"
ROWS = {"vicuna": 32000, "phi3": 32064, "llama3": 128256}


# ---------------------------------------------------------------------------------------------------------------
# The original pipeline (expected side)
# ---------------------------------------------------------------------------------------------------------------


def tokenizer_image_token(prompt: str, encode, bos: int | None) -> list[int]:
    chunks = [encode(c) for c in prompt.split(IMAGE)]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == bos else 0
    out = [chunks[0][0]] if offset else []
    for i, c in enumerate(chunks):
        if i:
            out.append(SENTINEL)
        out.extend(c[offset:])
    return out


class OriginalSentencepiece:
    """4.37.2's slow LlamaTokenizer (``legacy`` False: Vicuna) or fast-from-slow (legacy semantics: Phi-3)."""

    def __init__(self, base, legacy: bool):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        self.sp = spm.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
        m = pb.ModelProto()
        m.ParseFromString((base / "tokenizer.model").read_bytes())
        m.normalizer_spec.add_dummy_prefix = False  # what 4.37.2 does to the model when legacy is false
        self.sp_noprefix = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
        self.legacy = legacy
        cfg = json.loads((base / "tokenizer_config.json").read_text())
        decoder = cfg.get("added_tokens_decoder") or {
            "0": {"content": "<unk>", "special": True},
            "1": {"content": "<s>", "special": True},
            "2": {"content": "</s>", "special": True},
        }
        self.added = {
            e["content"]: (int(i), bool(e.get("special", True)), bool(e.get("rstrip", False)))
            for i, e in decoder.items()
        }
        self.split_re = re.compile(
            "(" + "|".join(re.escape(c) for c in sorted(self.added, key=len, reverse=True)) + ")"
        )
        self.unk_len = len(self.sp_noprefix.encode("<unk>", out_type=str))
        self.bos = self.sp.piece_to_id("<s>")

    def _segment(self, text: str) -> list[str]:
        if self.legacy:
            return self.sp.encode(text, out_type=str)
        if not text.startswith(("\u2581", " ")):
            return self.sp_noprefix.encode(text, out_type=str)
        return self.sp_noprefix.encode("<unk>" + text, out_type=str)[self.unk_len :]

    def tokenize(self, text: str) -> list[str]:
        if not text:
            return []
        if not self.legacy:
            text = "\u2581" + text.replace("\u2581", " ")
        parts = [p for p in self.split_re.split(text)]
        tokens: list[str] = []
        strip_next = False
        for i, p in enumerate(parts):
            if i % 2:  # an added token
                tokens.append(p)
                strip_next = self.added[p][2]
                continue
            if strip_next:
                p = p.lstrip()
            if p:
                tokens.extend(self._segment(p))
        if (
            not self.legacy
            and len(tokens) > 1
            and tokens[0] == "\u2581"
            and tokens[1] in self.added
            and self.added[tokens[1]][1]
        ):
            tokens = tokens[1:]
        return tokens

    def encode(self, text: str) -> list[int]:
        ids = []
        for t in self.tokenize(text):
            ids.append(self.added[t][0] if t in self.added else self.sp.piece_to_id(t))
        return [self.bos] + ids

    def image_prompt(self, prompt: str) -> list[int]:
        return tokenizer_image_token(prompt, self.encode, self.bos)


class OriginalLlama3:
    def __init__(self, base):
        from tokenizers import Tokenizer

        self.tk = Tokenizer.from_file(str(base / "tokenizer.json"))
        self.bos = self.tk.token_to_id("<|begin_of_text|>")

    def image_prompt(self, prompt: str) -> list[int]:
        return tokenizer_image_token(prompt, lambda c: self.tk.encode(c).ids, self.bos)


_ORIGINAL: dict = {}


def original(rv, backbone: str, variant=None):
    if (backbone, variant) not in _ORIGINAL:
        base = rv.base_tokenizer_dir(backbone, variant)
        _ORIGINAL[backbone, variant] = (
            OriginalLlama3(base) if backbone == "llama3" else OriginalSentencepiece(base, legacy=backbone == "phi3")
        )
    return _ORIGINAL[backbone, variant]


# ---------------------------------------------------------------------------------------------------------------
# The converted side
# ---------------------------------------------------------------------------------------------------------------

_CONVERTED: dict = {}


def converted_dir(rv, backbone: str, tmp_path_factory):
    """The converter's tokenizer files for the real base (build_tokenizer + write_tokenizer_files), once per session."""
    if backbone not in _CONVERTED:
        from convert.backbones import BACKBONES
        from convert.processor import build_tokenizer, load_base_tokenizer, write_tokenizer_files

        base = rv.base_tokenizer_dir(backbone)
        bb = BACKBONES[backbone]
        tok, info = build_tokenizer(load_base_tokenizer(base), base, ROWS[backbone], bb)
        out = tmp_path_factory.mktemp(f"converted-tok-{backbone}")
        write_tokenizer_files(out, tok, info, base, 4096, bb)
        _CONVERTED[backbone] = out
    return _CONVERTED[backbone]


_LOADED: dict = {}


def load_converted(path, use_fast: bool = True):
    from transformers import AutoTokenizer

    if (path, use_fast) not in _LOADED:
        _LOADED[path, use_fast] = AutoTokenizer.from_pretrained(str(path), use_fast=use_fast)
    return _LOADED[path, use_fast]


def image_ids(tok, prompt: str) -> list[int]:
    """The converted tokenizer on the whole prompt, ``<image>`` mapped to the original's sentinel."""
    image = tok.convert_tokens_to_ids(IMAGE)
    return [SENTINEL if i == image else i for i in tok(prompt).input_ids]


# ---------------------------------------------------------------------------------------------------------------
# 46/46 reference tokenizations
# ---------------------------------------------------------------------------------------------------------------


def matched(encode, cases) -> int:
    return sum(encode(text) == ids for text, ids in cases)


@pytest.mark.parametrize("backbone", ["vicuna", "phi3"])
def test_rebuilt_sentencepiece_model_gives_the_reference_ids(realvocab, backbone):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(realvocab.base_tokenizer_dir(backbone) / "tokenizer.model"))
    cases = realvocab.reference_cases(backbone)
    assert len(cases) == 46
    assert matched(sp.encode, cases) == 46


@pytest.mark.parametrize("use_fast", [True, False], ids=["fast", "use_fast=False"])
@pytest.mark.parametrize("backbone", ["vicuna", "phi3", "llama3"])
def test_converted_tokenizer_gives_the_reference_ids(realvocab, backbone, use_fast, tmp_path_factory):
    tok = load_converted(converted_dir(realvocab, backbone, tmp_path_factory), use_fast=use_fast)
    cases = realvocab.reference_cases(backbone)
    assert matched(lambda t: tok(t, add_special_tokens=False).input_ids, cases) == 46


def test_phi3_base_with_only_tokenizer_json_converts_to_the_same_file(realvocab, tmp_path, tmp_path_factory):
    import shutil

    from convert.backbones import PHI3
    from convert.processor import build_tokenizer, load_base_tokenizer, write_tokenizer_files

    base = tmp_path / "base"
    shutil.copytree(realvocab.base_tokenizer_dir("phi3"), base)
    (base / "tokenizer.model").unlink()
    tok, info = build_tokenizer(load_base_tokenizer(base), base, ROWS["phi3"], PHI3)
    write_tokenizer_files(tmp_path, tok, info, base, 4096, PHI3)
    want = converted_dir(realvocab, "phi3", tmp_path_factory) / "tokenizer.json"
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == json.loads(want.read_text())


def test_expected_side_gives_the_reference_ids(realvocab):
    """The restated originals agree with llama.cpp's references (chunk = whole text; drop the BOS)."""
    for backbone in ("vicuna", "phi3", "llama3"):
        orig = original(realvocab, backbone)
        cases = realvocab.reference_cases(backbone)
        if backbone == "vicuna":  # non-legacy: the reference texts start with text, so a chunk = sentencepiece + prefix
            assert matched(lambda t, orig=orig: orig.encode(t)[1:], cases) == 46
        else:
            assert matched(lambda t, orig=orig: orig.image_prompt(t)[1:], cases) == 46


# ---------------------------------------------------------------------------------------------------------------
# The property: arbitrary text, the converted tokenizer == the original pipeline
# ---------------------------------------------------------------------------------------------------------------

_PLAIN = st.text(alphabet=st.sampled_from(list(" \n\t  abcXYZ019.,:!?'<>|/_-▁éÄßжニ本🦙\u00a0\u3000")), max_size=12)
SPECIALS = {
    "vicuna": ["<s>", "</s>", "<unk>"],
    "phi3": ["<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>", "<|system|>"],
    "llama3": ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"],
}
WORDS = ["USER:", " ASSISTANT:", "What", " What", "  two", "Straße", "A chat", "\n"]


def prompts(backbone: str):
    piece = st.one_of(_PLAIN, st.sampled_from(SPECIALS[backbone] + [IMAGE]), st.sampled_from(WORDS))
    return st.lists(piece, max_size=8).map("".join)


EXAMPLES = [
    "<image> What",
    "<image>\nWhat is it?",
    " What",
    "Hello</s> USER: hi",
    "</s>x",
    "x</s>Straße",
    "a <image></s> b",
    "<|user|>\n<image>\nWhat?<|end|>\n<|assistant|>\n",
    "",
    "<image>",
    "  ",
    "\t\n x ",
]


def mismatch(actual, expected, prompt: str):
    a, e = actual(prompt), expected(prompt)
    return None if a == e else (prompt, a, e)


def _property(backbone):
    @settings(max_examples=max(150, settings.default.max_examples), deadline=None)  # cheap: >= 150 even in "ci"
    @given(prompt=prompts(backbone))
    def run(realvocab, tmp_path_factory, prompt):
        tok = load_converted(converted_dir(realvocab, backbone, tmp_path_factory))
        orig = original(realvocab, backbone)
        assert image_ids(tok, prompt) == orig.image_prompt(prompt), prompt

    for e in EXAMPLES:
        run = example(prompt=e)(run)
    return run


test_property_vicuna = _property("vicuna")
test_property_phi3 = _property("phi3")
test_property_llama3 = _property("llama3")


# ---------------------------------------------------------------------------------------------------------------
# Planted defects: each must make the check above fail
# ---------------------------------------------------------------------------------------------------------------


def _converted_backend(rv, tmp_path_factory, backbone="vicuna"):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(converted_dir(rv, backbone, tmp_path_factory) / "tokenizer.json"))


def _as_tok(backend):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_planted_merges_by_piece_id_fail(realvocab, tmp_path_factory):
    from tokenizers import models

    backend = _converted_backend(realvocab, tmp_path_factory)
    data = json.loads(backend.to_str())
    vocab = data["model"]["vocab"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in data["model"]["merges"]]
    by_id = sorted(merges, key=lambda m: vocab[m[0] + m[1]])
    backend.model = models.BPE(
        vocab=vocab, merges=[tuple(m) for m in by_id], unk_token="<unk>", fuse_unk=True, byte_fallback=True
    )
    tok = _as_tok(backend)
    cases = realvocab.reference_cases("vicuna")
    assert matched(lambda t: tok(t, add_special_tokens=False).input_ids, cases) < 46
    orig = original(realvocab, "vicuna")
    assert mismatch(lambda p: image_ids(tok, p), orig.image_prompt, "<image> What") is not None


def test_planted_metaspace_first_only_prefix_fails(realvocab, tmp_path_factory):
    from tokenizers import normalizers, pre_tokenizers

    backend = _converted_backend(realvocab, tmp_path_factory)
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok = _as_tok(backend)
    orig = original(realvocab, "vicuna")
    assert mismatch(lambda p: image_ids(tok, p), orig.image_prompt, "What is it?") is None  # same without an image
    assert mismatch(lambda p: image_ids(tok, p), orig.image_prompt, "<image>\nWhat is it?") is not None


def test_planted_per_segment_prefix_fails_on_vicuna_two_turn(realvocab, tmp_path_factory):
    """legacy semantics (what the converter wrote before) differ from Vicuna v1.5's legacy:false after </s>."""
    from tokenizers import normalizers

    backend = _converted_backend(realvocab, tmp_path_factory)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok = _as_tok(backend)
    orig = original(realvocab, "vicuna")
    prompt = "A chat USER: <image>\nHi ASSISTANT: Hello</s>USER: And? ASSISTANT:"
    assert (
        mismatch(
            lambda p: image_ids(_as_tok(_converted_backend(realvocab, tmp_path_factory)), p), orig.image_prompt, prompt
        )
        is None
    )
    assert mismatch(lambda p: image_ids(tok, p), orig.image_prompt, prompt) is not None


def test_planted_llama3_base_without_bos_is_refused(realvocab):
    from convert.backbones import LLAMA3
    from convert.errors import ConversionError
    from convert.processor import build_tokenizer, load_base_tokenizer

    base = realvocab.base_tokenizer_dir("llama3", "no_bos")
    with pytest.raises(
        ConversionError, match=r"tokenizer\.json: its post-processor \(ByteLevel\) adds no <\|begin_of_text\|>"
    ):
        build_tokenizer(load_base_tokenizer(base), base, ROWS["llama3"], LLAMA3)
    # ... and with such a base the original really lost a token after the image (same text, both bases).
    prompt = "<|begin_of_text|>Hi<image>\nWhat is it?"
    shipped, with_bos = original(realvocab, "llama3", "no_bos"), original(realvocab, "llama3")
    after = lambda ids: ids[ids.index(SENTINEL) + 1 :]  # noqa: E731
    assert after(with_bos.image_prompt(prompt))[0] == 198  # "\n"
    assert after(shipped.image_prompt(prompt)) == after(with_bos.image_prompt(prompt))[1:]  # the "\n" is gone


def test_non_legacy_base_with_stripping_special_token_is_refused(realvocab, tmp_path):
    import shutil

    from convert.backbones import VICUNA
    from convert.errors import ConversionError
    from convert.processor import build_tokenizer, load_base_tokenizer

    base = tmp_path / "base"
    shutil.copytree(realvocab.base_tokenizer_dir("vicuna"), base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {
        "2": {
            "content": "</s>",
            "lstrip": False,
            "normalized": False,
            "rstrip": True,
            "single_word": False,
            "special": True,
        }
    }
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_base_tokenizer(base).added_tokens_decoder[2].rstrip
    with pytest.raises(ConversionError, match=r"legacy is false and </s> strips the whitespace"):
        build_tokenizer(load_base_tokenizer(base), base, ROWS["vicuna"], VICUNA)
