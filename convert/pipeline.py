"""The conversion, end to end: resolve inputs, map keys, check shapes, resize, stream the repo out atomically.

The steps are small pure functions (``convert.mapping``, ``convert.config``, ``convert.resize``,
``convert.processor``); this module is the I/O edge that calls them in order and writes ``conversion.json``.
"""

from __future__ import annotations

import errno
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import MANIFEST, __version__
from .atomic import atomic_directory
from .backbones import Backbone, LayerRules, detect, shared_layer_rules
from .config import (
    build_config,
    check_original_config,
    check_preprocessor,
    generation_config,
    load_vipllava_config,
    vision_tower_config,
)
from .errors import ConversionError
from .faults import Fault, no_fault
from .format import OutTensor, ShardPlan, index_json, shard_names
from .layout import expected_shapes
from .mapping import EMBED_KEY, LM_HEAD_KEY, KeyMapping, RuleTable, table_for
from .plan import DTYPE_NAME, DTYPES, ORIGINAL_EMBED, ORIGINAL_LM_HEAD, DtypeChoice, TensorPlan, choose_dtypes, plan
from .preflight import check_no_overlap, check_output, parse_size
from .processor import TokenizerInfo, build_tokenizer, load_base_tokenizer, write_processor_files, write_tokenizer_files
from .resize import SCALE, ResizeResult, check_seed, resize
from .safejson import MAX_TOKENIZER_BYTES, load_json, read_bounded
from .sinks import DropBehind
from .sources import Checkpoint, ResolvedInput, TensorInfo, checked_sha256, open_checkpoint, resolve, sha256_file
from .stream import InputStream
from .writer import write_json, write_shard

DEFAULT_VISION_MODEL = "openai/clip-vit-large-patch14-336"


@dataclass
class Options:
    original: str
    output: Path
    text_model: str | None = None
    vision_model: str | None = None
    seed: int = 0
    dtype: str = "auto"
    max_shard_size: str | int = "5GB"
    backbone: str = "auto"
    force: bool = False
    progress: bool = True


@contextmanager
def _cancelled_at_exit(reader: InputStream):
    try:
        yield
    finally:
        reader.cancel()  # a no-op after a finished run


@dataclass
class Summary:
    output: Path
    mapped: int
    dropped: int
    rows_added: int
    rows: int
    original_rows: int
    shards: int
    output_bytes: int
    seconds: float
    dtype: str
    notes: list[str]

    def table(self) -> str:
        rows = [
            ("output", str(self.output)),
            ("tensors mapped", str(self.mapped)),
            ("keys dropped (named rules)", str(self.dropped)),
            ("embedding rows", f"{self.original_rows} -> {self.rows} (+{self.rows_added})"),
            ("dtype", self.dtype),
            ("weight shards", str(self.shards)),
            ("output size", f"{self.output_bytes / 1e6:.1f} MB"),
            ("time", f"{self.seconds:.1f} s"),
        ]
        w = max(len(k) for k, _ in rows)
        lines = [f"{k:<{w}}  {v}" for k, v in rows]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _read_json(path: Path, what: str) -> dict:
    if not os.path.lexists(path):
        raise ConversionError(f"{path}: missing; {what} needs a {path.name}")
    return load_json(path, ConversionError, dict, hint=f"pass {what} with a valid {path.name}")


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.model").is_file() or (directory / "tokenizer.json").is_file()


def _refuse_converted(original_cfg: dict, keys: list[str], where: Path) -> None:
    if original_cfg.get("model_type") == "vipllava" or any(
        k.startswith(("language_model.", "multi_modal_projector.")) for k in keys
    ):
        raise ConversionError(
            f"{where}: this is already a converted HF VipLlava repo (model_type {original_cfg.get('model_type')!r}); "
            "pass the ORIGINAL ViP-LLaVA checkpoint, or run `python -m verify` on this folder"
        )


def _check_shapes(
    ckpt: Checkpoint, mapping: KeyMapping, expected: dict[str, tuple[int, ...]], vocab: int, table: RuleTable
) -> None:
    produced = set(mapping.mapped.values())
    missing = sorted(set(expected) - produced)
    if missing:
        sources = []
        for t in missing[:5]:
            try:
                sources.append(table.inverse_key(t))
            except ConversionError:
                sources.append(t)
        raise ConversionError(
            f"original checkpoint lacks {len(missing)} tensor(s) the config needs: {', '.join(sources)}"
            + (" ..." if len(missing) > 5 else "")
            + "; the checkpoint is incomplete or its config.json does not match it"
        )
    extra = sorted(produced - set(expected))
    if extra:
        src = mapping.inverse()[extra[0]]
        raise ConversionError(
            f"{src}: not expected for this config (maps to {extra[0]}, which the model does not have); "
            "config.json (num_hidden_layers?) and the weights disagree"
        )
    for src, tgt in mapping.mapped.items():
        want = expected[tgt]
        if tgt in (EMBED_KEY, LM_HEAD_KEY):
            want = (vocab,) + want[1:]
        got = ckpt.info(src).shape
        if tuple(got) != tuple(want):
            raise ConversionError(
                f"{src}: shape {tuple(got)} but the config implies {tuple(want)}; the checkpoint and its config.json "
                "disagree"
            )


def output_path(given: Path) -> Path:
    """The absolute --output; a symlink to a folder is followed (the new output replaces the folder it points at,
    the link stays valid); a dangling symlink is refused before any work."""
    path = Path(given).expanduser().absolute()
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if not target.exists():
            raise ConversionError(
                f"{path}: --output is a symlink to {target}, which does not exist; remove the link or "
                "pass the folder's real path"
            )
        return target
    return path


def convert(opts: Options, fault: Fault = no_fault) -> Summary:
    """read -> map -> resize -> assemble -> write, each a named stage below; ``fault`` is the test hook of
    :mod:`convert.faults` (the command line builds it from the environment)."""
    start = time.perf_counter()
    inputs = _open_inputs(opts)
    # The input weight files are read from here on (the disk starts on the first ones while the tokenizer, config
    # and plan are built); whatever stops the run stops the reader too.
    reader = InputStream(inputs.ckpt.files)
    reader.keep(_resize_sources(inputs.ckpt, reader)).start()
    with _cancelled_at_exit(reader):
        layout = _read_layout(opts, inputs)
        # The tokenizer, the configs and the shape check (seconds of imports and tokenizer conversion) are read on
        # a thread while the shards that need none of them are written.
        tokens_job, resize_job, model_job = _start_read_model(opts, inputs, layout)
        small_digests = _hash_small_inputs(inputs, reader)
        ckpt = inputs.ckpt
        provisional = []
        if layout.mapping is not None:  # the resized matrices as placeholders of the original row count
            provisional = plan(
                layout.mapping,
                _infos(ckpt, layout.mapping),
                _spans(ckpt, layout.mapping, reader),
                layout.dtypes,
                layout.vocab,
            )

        def late_tensors() -> list[OutTensor]:
            """Once the tokenizer is read: the resized matrices (everything, where no mapping was known early)."""
            rows = tokens_job.result().rows
            mapping = layout.mapping if layout.mapping is not None else model_job.result().mapping
            final = plan(mapping, _infos(ckpt, mapping), _spans(ckpt, mapping, reader), layout.dtypes, rows)
            if provisional:
                final = [t for t in final if t.how == "resized"]
            return _out_tensors(final, ckpt, resize_job)

        shards = ShardPlan(_out_tensors(provisional, ckpt, None), inputs.max_bytes, late_tensors)

        def input_records() -> dict:
            return _input_records(inputs, {**small_digests.result(), **reader.finish()})

        with _write_errors(inputs.output, reader):
            _write_repo(
                inputs.output,
                opts,
                shards,
                lambda folder: _write_text_files(folder, inputs, model_job.result()),
                lambda: _manifest(opts, inputs, model_job.result()),
                reader,
                input_records,
                fault,
                watch=lambda: _raise_if_failed(tokens_job, resize_job, model_job),
            )
    model = model_job.result()
    return Summary(
        output=inputs.output,
        mapped=len(model.mapping.mapped),
        dropped=len(model.mapping.dropped),
        rows_added=model.rows - model.vocab,
        rows=model.rows,
        original_rows=model.vocab,
        shards=len(shards.shards),
        output_bytes=sum(p.stat().st_size for p in inputs.output.iterdir()),
        seconds=time.perf_counter() - start,
        dtype=DTYPE_NAME[model.dtypes.embed],
        notes=model.notes,
    )


@dataclass
class _Inputs:
    """Stage "read", part 1: the inputs the command line names, resolved, opened and checked against each other."""

    output: Path
    max_bytes: int
    orig: ResolvedInput
    text: ResolvedInput
    vision: ResolvedInput
    original_cfg: dict
    ckpt: Checkpoint

    def files(self) -> dict[str, tuple[ResolvedInput, list[Path]]]:
        """Every input file the manifest names, per role."""
        orig_dir = self.orig.directory
        return {
            "original": (self.orig, [orig_dir / "config.json", *self.ckpt.files, *_index_files(orig_dir)]),
            "text_model": (self.text, _tokenizer_files(self.text.directory)),
            "vision_model": (
                self.vision,
                [self.vision.directory / "config.json", self.vision.directory / "preprocessor_config.json"],
            ),
        }


def _open_inputs(opts: Options) -> _Inputs:
    if opts.dtype != "auto" and opts.dtype not in DTYPES:
        raise ConversionError(f"--dtype {opts.dtype!r}: expected one of auto, {', '.join(DTYPES)}; pass one of them")
    check_seed(opts.seed)
    max_bytes = parse_size(opts.max_shard_size)
    output = output_path(opts.output)

    orig = resolve(opts.original, "--original", allow_patterns=["*.json", "*.bin", "*.safetensors", "*.model"])
    text = (
        orig
        if opts.text_model is None
        else resolve(opts.text_model, "--text-model", allow_patterns=["*.json", "*.model", "*.txt"])
    )
    vision = resolve(opts.vision_model or DEFAULT_VISION_MODEL, "--vision-model", allow_patterns=["*.json"])
    roles = {"--original": orig.path, "--text-model": text.path, "--vision-model": vision.path}
    check_no_overlap(output, roles)
    check_output(output, opts.force)

    orig_dir = orig.directory
    original_cfg = _read_json(orig_dir / "config.json", "the original checkpoint")
    ckpt = open_checkpoint(orig.path)
    _refuse_converted(original_cfg, ckpt.keys(), orig.path)
    check_original_config(original_cfg, str(orig_dir / "config.json"))
    if ORIGINAL_EMBED not in ckpt.weight_map or ORIGINAL_LM_HEAD not in ckpt.weight_map:
        raise ConversionError(
            f"{orig.path}: lacks {ORIGINAL_EMBED} or {ORIGINAL_LM_HEAD}; the checkpoint is incomplete"
        )
    # every file actually read, through its symlinks: none may lie in the output's way
    check_no_overlap(output, {f"--original file {f.name}": f for f in ckpt.files})
    for key in (ORIGINAL_EMBED, ORIGINAL_LM_HEAD):
        if len(ckpt.info(key).shape) != 2:
            raise ConversionError(
                f"{key}: shape {tuple(ckpt.info(key).shape)}; expected a 2-D matrix (rows x hidden_size); "
                "the checkpoint is damaged, re-download it"
            )
    return _Inputs(output, max_bytes, orig, text, vision, original_cfg, ckpt)


@dataclass
class _Layout:
    """Stage "read", part 2: what the weights, the config and the cheap checks of the small files fix without the
    tokenizer: the embedding's size, the key mapping (where every backbone the config's model_type allows maps keys
    the same way; else None) and the output dtypes."""

    vocab: int
    hidden: int
    rules: LayerRules | None
    mapping: KeyMapping | None
    dtypes: DtypeChoice
    vision_cfg: dict
    preprocessor: dict


@dataclass
class _Tokens:
    """Stage "read", part 3: the tokenizer and what follows from it alone (the backbone, the token layout and the
    row count the resize needs)."""

    backbone: Backbone
    mapping: KeyMapping
    tok: Any  # a tokenizers.Tokenizer
    tinfo: TokenizerInfo
    notes: list[str]

    @property
    def rows(self) -> int:
        return self.tinfo.ids.rows


@dataclass
class _Model:
    """Stage "read", part 4: everything, with the output config, checked against the shapes transformers'
    VipLlava expects."""

    vocab: int
    hidden: int
    backbone: Backbone
    mapping: KeyMapping
    tok: Any  # a tokenizers.Tokenizer
    tinfo: TokenizerInfo
    notes: list[str]
    vision_cfg: dict
    preprocessor: dict
    dtypes: DtypeChoice
    cfg: dict

    @property
    def rows(self) -> int:
        return self.tinfo.ids.rows


def _read_layout(opts: Options, inputs: _Inputs) -> _Layout:
    ckpt, orig_dir, text = inputs.ckpt, inputs.orig.directory, inputs.text
    vocab, hidden = ckpt.info(ORIGINAL_EMBED).shape
    if inputs.original_cfg.get("vocab_size") != vocab:
        raise ConversionError(
            f"{orig_dir / 'config.json'}: vocab_size {inputs.original_cfg.get('vocab_size')} but {ORIGINAL_EMBED} has "
            f"{vocab} rows"
        )

    if opts.text_model is None and not _has_tokenizer(orig_dir):
        raise ConversionError(f"{orig_dir}: holds no tokenizer; pass --text-model (the base model with the tokenizer)")
    check_tokenizer_files(text.directory)
    vision_file = inputs.vision.directory / "config.json"
    vision_cfg = vision_tower_config(_read_json(vision_file, "--vision-model"), str(vision_file))
    preprocessor_file = inputs.vision.directory / "preprocessor_config.json"
    preprocessor = _read_json(preprocessor_file, "--vision-model (image preprocessing)")
    check_preprocessor(preprocessor, str(preprocessor_file), vision_cfg["num_channels"])

    rules = shared_layer_rules(inputs.original_cfg, opts.backbone)
    mapping = table_for(rules).map_keys(ckpt.keys()) if rules is not None else None
    dtypes = choose_dtypes(opts.dtype, ckpt.info(ORIGINAL_EMBED), ckpt.info(ORIGINAL_LM_HEAD))
    return _Layout(vocab, hidden, rules, mapping, dtypes, vision_cfg, preprocessor)


def _start_read_model(
    opts: Options, inputs: _Inputs, layout: _Layout
) -> tuple[Future[_Tokens], Future[ResizeResult], Future[_Model]]:
    """Stages "read" (parts 3 and 4) and "resize", on threads while the shards are written: the resize needs only
    the row count the tokenizer gives and starts the moment it is known, next to the config and shape check.
    Errors (a bad tokenizer, a non-finite embedding, a shape the config does not imply) surface at the writer's
    next tensor, and the output is then discarded."""
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="read-model")
    tokens = pool.submit(_read_tokenizer, opts, inputs, layout)
    resized = pool.submit(lambda: _resize(inputs.ckpt, layout, tokens.result().rows, opts.seed))
    model = pool.submit(lambda: _read_model(inputs, layout, tokens.result()))
    pool.shutdown(wait=False)
    return tokens, resized, model


def _read_tokenizer(opts: Options, inputs: _Inputs, layout: _Layout) -> _Tokens:
    ckpt, orig_dir, text = inputs.ckpt, inputs.orig.directory, inputs.text
    base_tok = load_base_tokenizer(text.directory)
    backbone = detect(inputs.original_cfg, base_tok.get_vocab(), str(orig_dir / "config.json"), opts.backbone)
    if layout.rules is not None and backbone.layer_rules != layout.rules:
        raise AssertionError(f"{backbone.name}: maps keys unlike the early plan; this is a converter bug")
    mapping = layout.mapping if layout.mapping is not None else table_for(backbone.layer_rules).map_keys(ckpt.keys())
    tok, tinfo = build_tokenizer(base_tok, text.directory, layout.vocab, backbone)
    notes = _tokenizer_notes(text.directory) if backbone.original_tokenizer == "slow" else []
    return _Tokens(backbone, mapping, tok, tinfo, notes)


def _read_model(inputs: _Inputs, layout: _Layout, tokens: _Tokens) -> _Model:
    orig_dir = inputs.orig.directory
    cfg = build_config(
        inputs.original_cfg,
        layout.vision_cfg,
        tokens.tinfo.ids,
        DTYPE_NAME[layout.dtypes.embed],
        str(orig_dir / "config.json"),
        tokens.backbone,
    )
    table = table_for(tokens.backbone.layer_rules)
    _check_shapes(inputs.ckpt, tokens.mapping, expected_shapes(load_vipllava_config(cfg)), layout.vocab, table)
    return _Model(
        layout.vocab,
        layout.hidden,
        tokens.backbone,
        tokens.mapping,
        tokens.tok,
        tokens.tinfo,
        tokens.notes,
        layout.vision_cfg,
        layout.preprocessor,
        layout.dtypes,
        cfg,
    )


def _hash_small_inputs(inputs: _Inputs, reader: InputStream) -> Future[dict[Path, str]]:
    """The sha256 of the small input files, on a thread (the weight files are hashed by the reader as they stream);
    the manifest waits for both."""
    small = [f for _, files in inputs.files().values() for f in files if f not in reader.starts]
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inputs-sha256")
    digests = pool.submit(lambda: {f: sha256_file(f) for f in small})
    pool.shutdown(wait=False)
    return digests


def _infos(ckpt: Checkpoint, mapping: KeyMapping) -> dict[str, TensorInfo]:
    return {src: ckpt.info(src) for src in mapping.mapped}


def _spans(ckpt: Checkpoint, mapping: KeyMapping, reader: InputStream) -> dict[str, tuple[int, int] | None]:
    """Where each mapped tensor's stored bytes lie in the input stream (None where they are not plain bytes)."""
    spans: dict[str, tuple[int, int] | None] = {}
    for src in mapping.mapped:
        loc = ckpt.location(src)
        if loc is None:
            spans[src] = None
        else:
            first = reader.position(*loc)
            spans[src] = (first, first + ckpt.info(src).nbytes)
    return spans


def _resize(ckpt: Checkpoint, layout: _Layout, rows: int, seed: int) -> ResizeResult:
    return resize(
        ckpt.get(ORIGINAL_EMBED),
        ckpt.get(ORIGINAL_LM_HEAD),
        rows,
        seed,
        layout.dtypes.embed,
        head_dtype=layout.dtypes.head,
    )


def _resize_sources(ckpt: Checkpoint, reader: InputStream) -> list[tuple[int, int]]:
    """Where the two resized matrices lie in the input stream (where known): the reader leaves them in the page
    cache, so the resize, which loads them through torch later, does not read them from disk again."""
    ranges = []
    for key in (ORIGINAL_EMBED, ORIGINAL_LM_HEAD):
        loc = ckpt.location(key)
        if loc is not None:
            first = reader.position(*loc)
            ranges.append((first, first + ckpt.info(key).nbytes))
    return ranges


def _out_tensors(tensors: list[TensorPlan], ckpt: Checkpoint, resized: Future[ResizeResult] | None) -> list[OutTensor]:
    """Stage "assemble": each planned tensor with the code that produces its values. The stream copies verbatim
    ones from its buffers; the loader stays as the fallback and as the check of the copied bytes. Without a resize
    job (the plan made before the tokenizer is read) the resized matrices are placeholders that only take their
    place in the shard order (see :class:`convert.format.ShardPlan`)."""
    out = []
    for t in tensors:
        if t.how == "resized":
            load = _resized_loader(resized, t.target) if resized is not None else _placeholder(t.target)
            out.append(OutTensor(t.target, t.dtype, t.shape, load, t.span, late=True))
        else:
            loader = _cast_loader(ckpt, t.source, t.dtype)
            out.append(OutTensor(t.target, t.dtype, t.shape, loader, t.span, verbatim=t.how == "verbatim"))
    return out


def _placeholder(key: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        raise AssertionError(f"{key}: a placeholder of the early plan was written; this is a converter bug")

    return load


def _raise_if_failed(*jobs: Future) -> None:
    """Between tensors: a failed read of the tokenizer/config, or resize, stops the writing at once, not when its
    result is needed."""
    for job in jobs:
        if job.done() and job.exception() is not None:
            job.result()


def _manifest(opts: Options, inputs: _Inputs, model: _Model) -> dict:
    """``conversion.json`` without its inputs and outputs (their hashes are known once everything is written)."""
    embed_dtype = inputs.ckpt.info(ORIGINAL_EMBED).dtype
    return {
        "format": 1,
        "tool": {"name": "vipllava-harness", "version": __version__},
        "environment": {
            "torch": torch.__version__.split("+")[0],
            "transformers": _transformers_version(),
            "python": platform.python_version(),
        },
        "settings": {
            "backbone": model.backbone.name,
            "seed": opts.seed,
            "dtype": opts.dtype,
            "output_dtype": DTYPE_NAME[model.dtypes.embed],
            "source_dtype": DTYPE_NAME.get(embed_dtype, str(embed_dtype)),
            "max_shard_size": inputs.max_bytes,
            "format": inputs.ckpt.format,
        },
        "mapping": {"mapped": len(model.mapping.mapped), "dropped": dict(sorted(model.mapping.dropped.items()))},
        "resize": {
            "original_rows": model.vocab,
            "rows": model.rows,
            "hidden_size": model.hidden,
            "image_token_index": model.tinfo.ids.image,
            "pad_token_id": model.tinfo.ids.pad,
            "scale": SCALE,
            "seed": opts.seed,
            "method": "mu + sqrt(scale/n) * (E - mu)^T g, g ~ N(0, I_n); float64; one generator, embed rows then "
            "lm_head rows",
            "resized": [EMBED_KEY, LM_HEAD_KEY],
        },
    }


def _input_records(inputs: _Inputs, digests: dict[Path, str]) -> dict:
    records = {}
    for role, (inp, files) in inputs.files().items():
        rec = inp.describe()
        rec["files"] = {str(f.relative_to(inp.directory)): checked_sha256(f, digests[f]) for f in sorted(files)}
        records[role] = rec
    return records


def _write_text_files(folder: Path, inputs: _Inputs, model: _Model) -> None:
    cfg = inputs.original_cfg
    max_len = cfg.get("tokenizer_model_max_length", cfg.get("max_position_embeddings", 2048))
    write_json(folder / "config.json", {**model.cfg, "transformers_version": _transformers_version()})
    write_json(
        folder / "generation_config.json",
        {**generation_config(model.tinfo.ids), "transformers_version": _transformers_version()},
    )
    write_tokenizer_files(folder, model.tok, model.tinfo, inputs.text.directory, max_len, model.backbone)
    write_processor_files(
        folder,
        model.preprocessor,
        model.vision_cfg["patch_size"],
        str(inputs.vision.directory / "preprocessor_config.json"),
        model.backbone,
    )


@contextmanager
def _write_errors(output: Path, reader: InputStream):
    """Stage "write": a failed write becomes one line naming where; whatever stops it stops the input reader."""
    try:
        yield
    except OSError as e:
        where = e.filename or output
        hint = (
            "free some space or choose another --output" if e.errno == errno.ENOSPC else "check the --output location"
        )
        raise ConversionError(
            f"{where}: writing failed ({e.strerror or e}); {hint}; no output was left behind"
        ) from None
    finally:
        reader.cancel()  # an early error stops the input reader at once (a no-op after a finished run)


def _tokenizer_notes(text_dir: Path) -> list[str]:
    """What the user should know about the tokenizer when the base says ``legacy: false``: the converted tokenizer
    reproduces transformers 4.37.2's slow tokenizer (the original's pinned HEAD; see convert/processor.py), while
    transformers 4.31 (the 7B/13B release era) treated text right after a special token such as ``</s>`` differently
    (it cut the dummy prefix off the first piece and looked the rest up, e.g. "x</s>Straße" -> ``<unk>``), which no
    tokenizer.json can express."""
    p = text_dir / "tokenizer_config.json"
    legacy = load_json(p, ConversionError).get("legacy", True) if p.is_file() else True
    if legacy is not False:
        return []
    return [
        f"{p}: legacy is false; the converted tokenizer gives transformers 4.37.2's ids (the original's pinned "
        "version: "
        "the leading piece once per <image> chunk, none after </s>). Originals run with transformers 4.31 tokenized "
        "text right after </s> differently (multi-turn prompts); run `python -m verify` with your prompts to see it"
    ]


_TOKENIZER_JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def check_tokenizer_files(text_dir: Path) -> None:
    """The tokenizer files, before any library reads them: the small JSON files strict and bounded, tokenizer.json
    bounded, and a tokenizer.model that sentencepiece loads (it is copied into the output; a garbage one would
    leave the output's slow tokenizer unloadable)."""
    for name in _TOKENIZER_JSON_FILES:
        if (text_dir / name).is_file():
            load_json(text_dir / name, ConversionError, dict, hint="fix it or re-download the tokenizer")
    if (text_dir / "tokenizer.json").is_file():
        read_bounded(text_dir / "tokenizer.json", MAX_TOKENIZER_BYTES, ConversionError, "tokenizer.json")
    model = text_dir / "tokenizer.model"
    if model.is_file():
        check_sentencepiece(model)


def check_sentencepiece(path: Path) -> None:
    import sentencepiece as spm

    data = read_bounded(path, MAX_TOKENIZER_BYTES, ConversionError, "sentencepiece model")
    sp = spm.SentencePieceProcessor()
    with _quiet_stderr():  # sentencepiece logs its refusals to fd 2 itself
        try:
            sp.LoadFromSerializedProto(data)
            pieces = sp.get_piece_size()
            problem = None if pieces > 0 else "a model with no pieces"
        except (RuntimeError, OSError, TypeError) as e:
            problem = (
                "a file sentencepiece cannot load "
                f"({str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__})"
            )
    if problem:
        raise ConversionError(
            f"{path}: expected a sentencepiece model, found {problem}; re-download the tokenizer, or "
            "remove tokenizer.model if the folder's tokenizer.json is the tokenizer"
        )


@contextmanager
def _quiet_stderr():
    """Silence fd 2 while a C++ library talks (the one-line error is ours to print)."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cast_checked(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, refused where a finite value would become Inf (bf16 or fp32 beyond float16's range)."""
    if t.dtype == dtype:
        return t
    out = t.to(dtype)
    if out.is_floating_point() and torch.isinf(out).any():
        bad = torch.isinf(out) & torch.isfinite(t)
        if bad.any():
            i = int(bad.reshape(-1).nonzero()[0])
            raise ConversionError(
                f"{name}: holds {t.reshape(-1)[i].item():.6g} (element {i}), beyond the range of "
                f"{str(dtype).removeprefix('torch.')}; "
                "it would become Inf, pass --dtype auto, bfloat16 or float32"
            )
    return out


def _cast_loader(ckpt: Checkpoint, src: str, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    return lambda: cast_checked(src, ckpt.get(src), dtype)


def _resized_loader(job: Future[ResizeResult], key: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        r = job.result()
        return r.embed if key == EMBED_KEY else r.lm_head

    return load


def _write_repo(
    output: Path,
    opts: Options,
    shards: ShardPlan,
    write_text_files: Callable[[Path], None],
    manifest: Callable[[], dict],
    reader: InputStream,
    input_records: Callable[[], dict],
    fault: Fault = no_fault,
    watch: Callable[[], None] = lambda: None,
) -> None:
    """The only place that writes: shards (streamed), index, text files, then the manifest with every hash.

    Shards are written under provisional names (their count is known only once the late tensors are planned) and
    renamed at the end; ``watch`` runs after every tensor (it raises to stop the run)."""
    from tqdm.auto import tqdm

    with atomic_directory(output, opts.force, fault) as tmp:
        digests: list[tuple[Path, str]] = []
        flusher = DropBehind()
        # The small files (config, tokenizer, processor) are written on a thread while the shards stream; leaving
        # this block waits for it, so an error never leaves it writing into a folder being removed.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="text-files") as side:
            text_files = side.submit(write_text_files, tmp)
            try:
                with tqdm(
                    total=shards.total, unit="B", unit_scale=True, desc="writing shards", disable=not opts.progress
                ) as bar:

                    def written(n: int) -> None:
                        bar.update(n)
                        watch()

                    flushed = []
                    for shard in shards:
                        path = tmp / f"shard-{len(digests) + 1:05d}.partial"
                        digest = write_shard(path, shard, on_bytes=written, stream=reader, flusher=flusher, fault=fault)
                        digests.append((path, digest))
                        flushed.append(flusher.close(path))
                        if bar.total != shards.total:
                            bar.total = shards.total
                            bar.refresh()
                    for f in flushed:
                        f.result()  # a write error surfacing at fsync (EIO, ENOSPC) stops the run here
            finally:
                flusher.shutdown()
            text_files.result()
        names = shard_names(len(shards.shards))
        outputs: dict[str, str] = {}
        for (path, digest), name in zip(digests, names, strict=True):
            path.rename(tmp / name)
            outputs[name] = digest
        if len(names) > 1:
            write_json(tmp / "model.safetensors.index.json", index_json(shards.shards, names))
        for p in sorted(tmp.iterdir()):
            if p.name not in outputs:
                outputs[p.name] = sha256_file(p)
        write_json(tmp / MANIFEST, {**manifest(), "inputs": input_records(), "outputs": dict(sorted(outputs.items()))})


def _index_files(directory: Path) -> list[Path]:
    return [
        p
        for p in (directory / "model.safetensors.index.json", directory / "pytorch_model.bin.index.json")
        if p.is_file()
    ]


def _tokenizer_files(directory: Path) -> list[Path]:
    names = (
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
    )
    return [directory / n for n in names if (directory / n).is_file()]


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
