"""Everything the checks share, loaded once and lazily: the converted repo, the original, the reference model,
the sample prompts and images.

Tensor files are read here with our own minimal readers (safetensors' ``safe_open`` for the converted repo;
``torch.load(mmap=True, weights_only=True)`` or ``safe_open`` for the original), not with the converter's code.
The data checks (files, mapping, resize) share one pass over the bytes, :attr:`Context.data_pass`
(``verify/datapass.py``: the bytes are streamed by the converter's reader, located by verify's own).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from convert.safejson import clean, confined, load_json, type_name  # noqa: F401 (clean: used by callers)
from convert.safejson import name as safe_name

from .datapass import ST_DTYPES
from .preflight import MANIFEST, VerifyUsageError, audit_inputs_problem  # noqa: F401 (VerifyUsageError: re-exported)

if TYPE_CHECKING:
    from .original import FastTokenizer, LlamaSlowTokenizer

# --dtype name -> the dtype both models' weights are held in. "float32-blocks" (the default for a bf16 checkpoint) holds
# them as stored and runs every prompt forward in float32 arithmetic, one block at a time (``verify.compute``); the
# greedy steps after the prompt run in the stored dtype.
DTYPES = {"float32-blocks": torch.bfloat16, "float32": torch.float32, "bfloat16": torch.bfloat16}
PROMPT_ARITHMETIC = {"float32-blocks": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}
DATA_CHECKS = frozenset({"files", "mapping", "resize"})  # the checks that share one pass over the bytes
GiB = 1 << 30
# Python, torch and transformers themselves, tokenizers, images, the processor: measured ~0.3 GiB, stated with room.
RUNTIME_BYTES = 1 * GiB


_HEX64 = re.compile(r"[0-9a-f]{64}")


def read_manifest(path: Path) -> dict:
    """``conversion.json``, strictly: a JSON object; ``outputs`` maps plain file names of the repo (no path, no
    '..') to sha256 digests; ``inputs`` and ``settings`` are objects of the recorded shape. Anything else is
    refused before a single listed path is looked at."""
    fix = "the manifest is corrupt or was edited; convert again"
    m = load_json(path, VerifyUsageError, dict, hint=fix)
    outputs = m.get("outputs", {})
    if not isinstance(outputs, dict):
        raise VerifyUsageError(
            f"{path}: expected outputs to be an object of file name -> sha256, found {type_name(outputs)}; {fix}"
        )
    for name, digest in outputs.items():
        confined(path.parent, name, VerifyUsageError, path, "output file")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise VerifyUsageError(
                f"{path}: outputs[{safe_name(name)!r}] is {safe_name(repr(digest))}; expected a sha256 "
                f"(64 lowercase hex digits); {fix}"
            )
    for key in ("inputs", "settings"):
        if not isinstance(m.get(key, {}), dict):
            raise VerifyUsageError(f"{path}: expected {key} to be an object, found {type_name(m[key])}; {fix}")
    for role, rec in m.get("inputs", {}).items():
        if not isinstance(rec, dict) or any(
            rec.get(k) is not None and not isinstance(rec[k], str) for k in ("path", "source")
        ):
            raise VerifyUsageError(
                f"{path}: inputs[{safe_name(role)!r}] must be an object whose path and source are strings; {fix}"
            )
    return m


@dataclass(frozen=True)
class Inputs:
    original: Path
    text_model: Path
    vision_model: Path


def _resolve(source: str, what: str) -> Path:
    p = Path(source).expanduser()
    if p.exists():
        return p
    if "/" in source and not source.startswith((".", "/")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        repo_id, _, rev = source.partition("@")
        try:
            return Path(snapshot_download(repo_id, revision=rev or None))
        except (LocalEntryNotFoundError, OSError, ValueError) as e:
            raise VerifyUsageError(f"{what} {source!r}: not available ({str(e).splitlines()[0]})") from None
    raise VerifyUsageError(f"{what} {source!r}: no such file or folder")


def default_prompts(backbone: str) -> list[dict]:
    """The bundled samples: ``prompts.json`` holds prompt strings written in the llava_v1 format, so a backbone of that
    mode (Vicuna) gets them; the others get the sample conversations (rendered later in the backbone's mode)."""
    from .original import BACKBONES
    from .samples import sample_conversations, sample_prompts

    return sample_prompts() if BACKBONES[backbone].conv_mode == "llava_v1" else sample_conversations()


def prepare_prompt(entry: dict, conv_mode: str, index: int = 0) -> dict:
    """``{name, prompt, image}`` or ``{name, turns, image}`` -> ``{name, prompt, image[, turns]}``, the prompt of a
    conversation rendered as the original ``conversation.py`` did in ``conv_mode``."""
    from .original import render_prompt

    if not isinstance(entry, dict) or ("prompt" not in entry and "turns" not in entry):
        raise VerifyUsageError(
            f"prompt #{index}: expected {{name, prompt, image}} or {{name, turns, image}}, got {entry!r}"[:300]
        )
    name = entry.get("name") or f"prompt{index}"
    out = {"name": name, "image": entry.get("image")}
    if entry.get("turns") is not None:
        turns = entry["turns"]
        if not isinstance(turns, list) or not turns:
            raise VerifyUsageError(f"prompt {name!r}: turns must be a non-empty list of {{role, text}}")
        try:
            rendered = render_prompt(turns, conv_mode)
        except ValueError as e:
            raise VerifyUsageError(f"prompt {name!r}: {e}") from None
        if entry.get("prompt") is not None and entry["prompt"] != rendered:
            raise VerifyUsageError(
                f"prompt {name!r}: gives both a prompt and turns, and the turns render differently in {conv_mode}"
            )
        out["turns"] = [
            {"role": t.get("role"), "text": t.get("text")} if isinstance(t, dict) else {"role": t[0], "text": t[1]}
            for t in turns
        ]
        out["prompt"] = rendered
    else:
        if not isinstance(entry["prompt"], str):
            raise VerifyUsageError(f"prompt {name!r}: prompt must be a string")
        out["prompt"] = entry["prompt"]
    return out


def available_memory() -> int | None:
    """``MemAvailable`` from /proc/meminfo in bytes (None where the kernel does not say)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know about one model (the original and the converted share it)."""

    parameters: int  # elements, text model + vision tower + projector
    layers: int
    hidden: int
    heads: int
    kv_dim: int  # key/value heads x head_dim
    intermediate: int
    vocab: int
    vision_layers: int
    vision_hidden: int
    vision_heads: int
    vision_intermediate: int
    vision_tokens: int  # patches + CLS
    image_tokens: int  # positions one image takes in the spliced sequence

    def sequence(self, text_ids: int, images: int) -> int:
        """Spliced length of a prompt with ``text_ids`` non-image ids and ``images`` image sentinels."""
        return text_ids + images * self.image_tokens

    def cache_bytes(self, positions: int, element: int) -> int:
        """The key/value cache of one sequence of ``positions`` with ``element``-byte entries."""
        return 2 * self.layers * positions * self.kv_dim * element


def largest_decode_batch(
    shape: ModelShape,
    ids: list[list[int]],
    images: list[str | None],
    sequences: list[int],
    max_new_tokens: int,
    dtype: torch.dtype,
) -> int:
    """Bytes of key/value cache the largest lock-step batch holds: the prompts (``ids`` with image sentinels, image
    names, spliced lengths) grouped by shared prefix and packed as verify runs them (:func:`pack_decode_batches`)."""
    w = torch.empty((), dtype=dtype).element_size()
    held = [shape.cache_bytes(s + max_new_tokens, w) for s in sequences]
    batches = pack_decode_batches(prefix_groups(list(zip(ids, images, strict=True))), held, DECODE_BATCH_BYTES)
    return max(sum(held[i] for _, members in b for i in members) for b in batches)


def estimate_memory(
    shape: ModelShape,
    dtype: torch.dtype,
    stored: tuple[torch.dtype | None, torch.dtype | None],
    sequences: list[int],
    images: list[int],
    max_new_tokens: int,
    arithmetic: torch.dtype | None = None,
    decode_caches: int = 0,
    shared_prefix: bool = False,
) -> dict:
    """Peak anonymous memory (bytes) of a verify run, by part.

    * weights: both models are read from their files in the dtype they are stored in (memory-mapped, page cache,
      measured: +0.14 GiB anonymous for a 0.85 B-parameter pair in bf16); a model whose stored dtype differs from
      ``dtype`` is copied: parameters x element size, each (``stored`` = (original, converted); None = unknown,
      counted as a copy).
    * held logits: the float32 logits of every prompt, both sides (the checks compare them after both ran).
    * one prompt in flight (one model at a time): the key/value cache over prompt + new tokens (three of them when
      prompts share a prefix: the prefix's, the copy a prompt extends, and the extended one; the system text all
      units share, tens of positions, is left to the runtime's margin), the attention scores of one layer as eager
      attention holds them (float32 softmax + the cast; SDPA, which the Llama backbones run, holds less), the MLP
      and residual activations, the last logits, the vision tower's hidden states (all layers are kept for the
      feature selection) and its attention scores.
    * float32 blocks (``arithmetic`` float32 over weights held in a smaller ``dtype``): one float32 buffer per
      distinct parameter shape (the text layer's, a vision layer's, the projector's, the embedding's, which the head
      shares; the small norm and CLIP embedding shapes are left to the runtime's margin); activations, key/value
      cache and attention in float32.
    * the lock-step decoding (:func:`pack_decode_batches`): the key/value caches of the largest batch's prompts in
      the weights' dtype, ``decode_caches`` bytes, held while its prompts' forwards run.
    * the runtime: python, torch, transformers (``RUNTIME_BYTES``).
    """
    arithmetic = arithmetic or dtype
    w = torch.empty((), dtype=dtype).element_size()
    b = torch.empty((), dtype=arithmetic).element_size()
    copies = sum(1 for s in stored if s != dtype)
    S = max(sequences, default=1) + max_new_tokens
    n_img = max(images, default=0)
    upcast = 0
    if arithmetic != dtype:
        h, vh = shape.hidden, shape.vision_hidden
        # one buffer per distinct shape (blocks run one at a time): q/o [h, h], k/v [kv, h] when that differs,
        # gate/up [i, h], down [h, i], the embedding and the head [vocab, h] (one shape); the same for a vision layer
        layer = h * h + (h * shape.kv_dim if shape.kv_dim != h else 0) + 2 * h * shape.intermediate
        vision = vh * vh + 2 * vh * shape.vision_intermediate
        projector = 5 * vh * h + h * h
        upcast = b * (layer + vision + projector + shape.vocab * h)
    parts = {
        "weights": copies * shape.parameters * w,
        "float32_blocks": upcast,
        "held_logits": 2 * sum(sequences) * shape.vocab * 4,
        "kv_cache": (3 if shared_prefix else 1) * shape.cache_bytes(S, b),
        "attention": shape.heads * S * S * (4 + b),
        "activations": S * (3 * shape.intermediate + 6 * shape.hidden) * b + S * shape.vocab * (4 + b),
        "vision": n_img
        * (
            (shape.vision_layers + 1) * shape.vision_tokens * shape.vision_hidden * b
            + shape.vision_heads * shape.vision_tokens**2 * (4 + b)
            + shape.vision_tokens * shape.vision_intermediate * b
        ),
        "decode_caches": decode_caches,
        "runtime": RUNTIME_BYTES,
    }
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "arithmetic": str(arithmetic).removeprefix("torch."),
        "weight_copies": copies,
        "longest_sequence": S,
        "parts": parts,
        "total": sum(parts.values()),
    }


DECODE_BATCH_BYTES = 3 * GiB  # the key/value caches one lock-step batch of prompts may hold, in the weights' dtype
DECODE_STEP_BYTES = 256 << 20  # a greedy step's activations, logits and float32 product slabs, with room to spare


def prefix_groups(prompts: list[tuple[list[int], str | None]]) -> list[tuple[int, list[int]]]:
    """How the prompts' forwards are scheduled, from each prompt's (ids with image sentinels, image name):
    ``(k, members)`` per group, in order of first appearance. Prompts whose ids agree up to and including their last
    image (the system text and the same image) form a group that computes those ``k`` ids once and extends them per
    prompt (each side with its own model and its own key/value cache); ``k`` 0: one prompt, run whole. The same
    schedule serves both sides, so their logits are computed alike; a prompt that ends at its image runs whole."""
    groups: dict[tuple, list[int]] = {}
    order: list[tuple] = []
    for i, (ids, image) in enumerate(prompts):
        last = max((j for j, t in enumerate(ids) if t < 0), default=None)
        key: tuple = ("whole", i) if last is None or last == len(ids) - 1 else (image, tuple(ids[: last + 1]))
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(i)
    plan: list[tuple[int, list[int]]] = []
    for key in order:
        members = groups[key]
        if key[0] == "whole" or len(members) == 1:
            plan.extend((0, [i]) for i in members)
        else:
            plan.append((len(key[1]), members))
    return plan


def root_prefix(prompts: list[tuple[list[int], str | None]], plan: list[tuple[int, list[int]]]) -> int:
    """How many ids the first prompts of the :func:`prefix_groups` plan (``plan``) all begin with before any image
    (the system text of a conversation mode): 0 when fewer than two units share it. Each side computes these ids
    within the first unit's forward and every other unit extends a copy of them (images included), so the system
    text runs once per side instead of once per image. Each unit keeps at least one id of its own."""
    firsts = [prompts[members[0]][0] for _, members in plan]
    if len(firsts) < 2:
        return 0
    head, most = firsts[0], min(len(ids) for ids in firsts) - 1
    n = 0
    while n < most and head[n] >= 0 and all(ids[n] == head[n] for ids in firsts):
        n += 1
    return n


def pack_decode_batches(
    groups: list[tuple[int, list[int]]], cache_bytes: list[int], limit: int
) -> list[list[tuple[int, list[int]]]]:
    """``groups`` (:func:`prefix_groups`), in order, packed into lock-step batches: a batch takes whole groups while
    the key/value caches of its prompts (``cache_bytes[i]`` for prompt ``i``) stay within ``limit``; a group over the
    limit alone is a batch of its own. Every decoding step of a batch reads the weights once for all its prompts."""
    batches: list[list[tuple[int, list[int]]]] = []
    held = 0
    for group in groups:
        size = sum(cache_bytes[i] for i in group[1])
        if not batches or held + size > limit:
            batches.append([])
            held = 0
        batches[-1].append(group)
        held += size
    return batches


def vision_modules(model: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
    """The converted model's vision tower and projector (the outermost modules so named), which greedy steps
    after the prompt forward do not run."""
    found: dict[str, torch.nn.Module] = {}
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("vision_tower", "multi_modal_projector") and not any(
            name.startswith(f"{n}.") for n in found
        ):
            found[name] = m
    return tuple(found.values())


def id_set(value) -> set:
    """An id or a list of ids (generation_config's eos_token_id may be either) as a set; None -> empty."""
    if value is None:
        return set()
    return set(value) if isinstance(value, (list, tuple)) else {value}


def _left_padded_cache(caches: list, lengths: list[int], room: int = 0):
    """One cache for a batch from per-prompt caches (batch 1 each, ``lengths[i]`` positions): each layer's keys and
    values zero-padded on the left to the longest and stacked on the batch axis, in buffers with ``room`` more
    positions that the greedy steps write into (:func:`verify.compute.reserved_cache`). The per-prompt tensors are
    released layer by layer."""
    from .compute import reserved_cache

    longest = max(lengths)
    layers = [cache.layers for cache in caches]
    stacked = []
    for j in range(len(layers[0])):
        buffers = []
        for part in ("keys", "values"):
            first = getattr(layers[0][j], part)
            buf = first.new_zeros((len(caches), *first.shape[1:-2], longest + room, first.shape[-1]))
            for r, (per, n) in enumerate(zip(layers, lengths, strict=True)):
                t = getattr(per[j], part)
                if t.shape[-2] != n:
                    raise RuntimeError(f"a prompt cache holds {t.shape[-2]} positions, expected {n}")
                buf[r, ..., longest - n : longest, :] = t[0]
                setattr(per[j], part, None)
            buffers.append(buf)
        stacked.append((buffers[0], buffers[1]))
    return reserved_cache(stacked, longest)


def _cut_cache(cache, positions: int):
    """A new ``DynamicCache`` holding copies of the first ``positions`` keys and values of every layer of ``cache``
    (the shared prefix of a group, cut from its first prompt's cache; attention is causal)."""
    from transformers import DynamicCache

    pairs = []
    for layer in cache.layers:
        if layer.keys.shape[-2] < positions:
            raise RuntimeError(f"a prompt cache holds {layer.keys.shape[-2]} positions, cut at {positions}")
        pairs.append((layer.keys[..., :positions, :].clone(), layer.values[..., :positions, :].clone()))
    return DynamicCache(ddp_cache_data=pairs)


class OriginalTensors:
    """Lazy name -> tensor access to an original checkpoint folder (bin or safetensors, single or sharded)."""

    def __init__(self, directory: Path):
        d = directory if directory.is_dir() else directory.parent
        self.files: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        idx = next(
            (d / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json") if (d / n).is_file()), None
        )
        if idx is not None:
            wm = load_json(idx, VerifyUsageError, dict, hint="re-download the checkpoint's index").get("weight_map")
            if not isinstance(wm, dict):
                raise VerifyUsageError(
                    f"{idx}: expected a weight_map object, found {type_name(wm)}; re-download the index"
                )
            shards = {v: confined(d, v, VerifyUsageError, idx, "shard") for v in set(wm.values()) if isinstance(v, str)}
            bad = next((k for k, v in wm.items() if not isinstance(v, str)), None)
            if bad is not None:
                raise VerifyUsageError(
                    f"{idx}: weight_map[{safe_name(bad)!r}] is not a file name; re-download the index"
                )
            self.files = {k: shards[v] for k, v in wm.items()}
        else:
            single = next((d / n for n in ("model.safetensors", "pytorch_model.bin") if (d / n).is_file()), None)
            if single is None:
                raise VerifyUsageError(f"{d}: no original weights found")
            self.files = {k: single for k in self._handle(single).keys()}

    def _handle(self, path: Path):
        if path not in self._open:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                self._open[path] = safe_open(str(path), "pt")
            else:
                self._open[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._open[path]

    def keys(self) -> list[str]:
        return list(self.files)

    def get(self, key: str) -> torch.Tensor:
        h = self._handle(self.files[key])
        return h.get_tensor(key) if hasattr(h, "get_tensor") else h[key]

    def meta(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape, without reading the values (the .bin tensors are memory-mapped)."""
        h = self._handle(self.files[key])
        if hasattr(h, "get_slice"):
            s = h.get_slice(key)
            return ST_DTYPES[s.get_dtype()], tuple(s.get_shape())
        t = h[key]
        return t.dtype, tuple(t.shape)

    def locations(self) -> dict:
        """key -> where its bytes lie (``verify.datapass.Located``), for the tensors verify can stream."""
        from .datapass import locate

        out = {}
        for f in sorted(set(self.files.values())):
            for k, loc in locate(f).items():
                if self.files.get(k) == f:
                    out[k] = loc
        return out


class ConvertedTensors:
    """Lazy access to the converted repo's safetensors (every ``*.safetensors`` file in the folder)."""

    def __init__(self, repo: Path):
        from safetensors import safe_open

        self.repo = repo
        self.where: dict[str, list[str]] = {}
        self._files = {}
        for f in sorted(repo.glob("*.safetensors")):
            try:
                h = safe_open(str(f), "pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise VerifyUsageError(f"{f}: unreadable safetensors file ({str(e).splitlines()[0]})") from None
            self._files[f.name] = h
            for k in h.keys():
                self.where.setdefault(k, []).append(f.name)

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, key: str) -> torch.Tensor:
        return self._files[self.where[key][0]].get_tensor(key)

    def header_dtype(self, key: str) -> str:
        return self._files[self.where[key][0]].get_slice(key).get_dtype()

    def meta(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape from the header (nothing read)."""
        s = self._files[self.where[key][0]].get_slice(key)
        return ST_DTYPES[s.get_dtype()], tuple(s.get_shape())

    def locations(self) -> dict:
        """name -> where its bytes lie in the first file that holds it (``verify.datapass.Located``)."""
        from .datapass import safetensors_locations

        out = {}
        for fname in self._files:
            for k, loc in safetensors_locations(self.repo / fname).items():
                if self.where.get(k, [None])[0] == fname:
                    out[k] = loc
        return out


CONVERTED_EMBED = "language_model.model.embed_tokens.weight"
# checks that load a model (the converted one, the reference, or both); the others read files only
MODEL_CHECKS = frozenset({"strict_load", "resize", "processor", "logits", "generation"})
# the stored weight dtypes the dtype default and the memory estimate know (others count as unknown)
_WEIGHT_DTYPES = frozenset({torch.bfloat16, torch.float32, torch.float16})


def _safetensors_dtype(repo: Path, key: str) -> torch.dtype | None:
    """The stored dtype of ``key`` in the repo's safetensors files, from their JSON headers (None if absent or
    unreadable: the files check reports a corrupt header)."""
    for f in sorted(repo.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if not 0 < n <= 100 * 2**20:
                    continue
                header = json.loads(fh.read(n))
        except (OSError, ValueError):
            continue
        if isinstance(header.get(key), dict):
            dtype = ST_DTYPES.get(header[key].get("dtype"))
            return dtype if dtype in _WEIGHT_DTYPES else None
    return None


def _default_dtype(stored: tuple[torch.dtype | None, torch.dtype | None]) -> str:
    """The weights in the checkpoint's own dtype: the original's as stored (bf16 for every released ViP-LLaVA), else
    the converted repo's. float32 -> "float32"; bf16, float16 or unknown -> "float32-blocks" (bf16 weights, float32
    arithmetic for the prompts)."""
    for dt in stored:
        if dt is not None:
            return "float32" if dt == torch.float32 else "float32-blocks"
    return "float32-blocks"


class Context:
    def __init__(
        self,
        repo: Path,
        original: str | None = None,
        text_model: str | None = None,
        vision_model: str | None = None,
        prompts: list[dict] | None = None,
        images: dict | None = None,
        dtype: str | None = None,
        max_new_tokens: int = 8,
        only: list[str] | None = None,
        memory_limit: int | None = None,
    ):
        """``dtype`` None: the original checkpoint's own dtype (bf16 for the real ones). ``only``: the checks that
        will run (None: all), so that models are loaded (and their memory estimated) only when a check needs them,
        and generation runs only when its check does. ``memory_limit``: bytes the run may use (None: the kernel's
        MemAvailable); a run whose estimate exceeds it is refused before anything is loaded."""
        self.repo = Path(repo)
        if not self.repo.is_dir():
            raise VerifyUsageError(f"{repo}: not a folder; pass the converted repo")
        if dtype is not None and dtype not in DTYPES:
            raise VerifyUsageError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        self.max_new_tokens = max_new_tokens
        self.only = set(only) if only else None
        # which of the data checks will run: what the one pass over the bytes must serve
        self.data_checks = set(DATA_CHECKS) if self.only is None else DATA_CHECKS & self.only
        self.timings: dict[str, float] = {}  # seconds per phase of the model runs (load, forward, decode), per side
        self.page_cache: dict[str, dict] = {}  # per side: which weights stayed in the page cache (WeightStream)
        self._streams: dict[str, Any] = {}  # per side: the WeightStream while it is active
        mf = self.repo / MANIFEST
        self.manifest: dict | None = None
        if mf.is_file():
            self.manifest = read_manifest(mf)
        problem = audit_inputs_problem(self.repo, original, text_model, vision_model)
        if problem:
            raise VerifyUsageError(problem)
        recorded = (self.manifest or {}).get("inputs", {})

        def pick(given: str | None, key: str, flag: str) -> Path:
            if given:
                return _resolve(given, flag)
            rec = recorded.get(key) or {}
            if rec.get("path") and Path(rec["path"]).exists():
                return Path(rec["path"])
            if rec.get("source"):
                return _resolve(rec["source"], flag)
            raise VerifyUsageError(f"{self.repo}: {MANIFEST} does not say where the {key} is; pass {flag}")

        self.inputs = Inputs(
            original=pick(original, "original", "--original"),
            text_model=pick(text_model, "text_model", "--text-model"),
            vision_model=pick(vision_model, "vision_model", "--vision-model"),
        )
        # The backbone, told by the reference from the original files (never from the converter's record).
        from .original import BACKBONES, OriginalLoadError, detect_backbone

        try:
            self.backbone = detect_backbone(self.original_dir, self.inputs.text_model)
        except OriginalLoadError as e:
            raise VerifyUsageError(str(e)) from None
        self.conv_mode = BACKBONES[self.backbone].conv_mode
        self.recorded_backbone = ((self.manifest or {}).get("settings") or {}).get("backbone")
        if prompts is None:
            prompts = default_prompts(self.backbone)
        if images is None:
            from .samples import sample_images

            images = sample_images()
        self.prompts = [prepare_prompt(p, self.conv_mode, i) for i, p in enumerate(prompts)]
        self.images = images
        for p in self.prompts:
            if p.get("image") and p["image"] not in images:
                raise VerifyUsageError(
                    f"prompt {p.get('name')!r} names image {p['image']!r}, which is not among the images"
                )
        self.stored_dtypes = self._stored_dtypes()
        self.dtype_source = "asked" if dtype is not None else "checkpoint"
        self.dtype_name = dtype if dtype is not None else _default_dtype(self.stored_dtypes)
        self.dtype = DTYPES[self.dtype_name]  # the weights, as both models hold them
        self.arithmetic = PROMPT_ARITHMETIC[self.dtype_name]  # the prompt forwards' arithmetic
        self.memory: dict | None = None
        if self.only is None or self.only & MODEL_CHECKS:
            self.memory = self._check_memory(memory_limit)

    # --- dtype and memory, decided before anything is loaded --------------------------------------------------
    def _stored_dtypes(self) -> tuple[torch.dtype | None, torch.dtype | None]:
        """(original, converted) dtype of the token embedding as stored; None where unreadable (the checks say why)."""
        try:
            original = self.original_tensors.get("model.embed_tokens.weight").dtype
        except Exception:  # a missing or corrupt original: the mapping check reports it
            original = None
        return original, _safetensors_dtype(self.repo, CONVERTED_EMBED)

    @cached_property
    def text_attention(self) -> str:
        """The text model's attention as the original ran it (``verify.original.configs.TEXT_ATTENTION``: sdpa for
        Llama, eager for the vendored Phi-3), told from the original config.json; the vision tower runs eager on
        both sides, as the original's CLIP did. Both sides compute alike, so their logits compare like with like."""
        from .original import BACKBONES

        cfg = json.loads((self.original_dir / "config.json").read_text())
        return str(BACKBONES[self.backbone].text_config(cfg)._attn_implementation)

    @cached_property
    def model_shape(self) -> ModelShape:
        from .original import BACKBONES, clip_vision_config_from_dir

        cfg = json.loads((self.original_dir / "config.json").read_text())
        lcfg = BACKBONES[self.backbone].text_config(cfg)
        vcfg = clip_vision_config_from_dir(self.inputs.vision_model)
        heads = lcfg.num_attention_heads
        head_dim = getattr(lcfg, "head_dim", None) or lcfg.hidden_size // heads
        # transformers types CLIP's image_size and patch_size as int | list | tuple | None; they are ints here
        patches = (vcfg.image_size // vcfg.patch_size) ** 2  # type: ignore[operator]
        tensors = self.original_tensors
        return ModelShape(
            parameters=sum(tensors.get(k).numel() for k in tensors.keys()),
            layers=lcfg.num_hidden_layers,
            hidden=lcfg.hidden_size,
            heads=heads,
            kv_dim=(getattr(lcfg, "num_key_value_heads", None) or heads) * head_dim,
            intermediate=lcfg.intermediate_size,
            vocab=lcfg.vocab_size,
            vision_layers=vcfg.num_hidden_layers,
            vision_hidden=vcfg.hidden_size,
            vision_heads=vcfg.num_attention_heads,
            vision_intermediate=vcfg.intermediate_size,
            vision_tokens=patches + 1,
            image_tokens=patches,
        )

    def _check_memory(self, limit: int | None) -> dict:
        """The run's peak anonymous memory, estimated from the shapes (:func:`estimate_memory`), against ``limit``
        (default MemAvailable). Refuses (VerifyUsageError, exit 2) when it does not fit."""
        from .original import IMAGE_SENTINEL

        try:
            shape = self.model_shape
            ids = [self.base_tokenizer.encode_with_images(p["prompt"]) for p in self.prompts]
        except Exception as e:  # unreadable inputs: the checks that load them report it
            return {"error": f"{e.__class__.__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        images = [x.count(IMAGE_SENTINEL) for x in ids]
        sequences = [shape.sequence(len(x) - n, n) for x, n in zip(ids, images, strict=True)]
        generating = self.only is None or "generation" in self.only
        decode_caches = 0
        names = [p.get("image") if n else None for p, n in zip(self.prompts, images, strict=True)]
        if generating and self.max_new_tokens > 0:
            decode_caches = largest_decode_batch(shape, ids, names, sequences, self.max_new_tokens, self.dtype)
        est = estimate_memory(
            shape,
            self.dtype,
            self.stored_dtypes,
            sequences,
            images,
            self.max_new_tokens if generating else 0,
            arithmetic=self.arithmetic,
            decode_caches=decode_caches,
            shared_prefix=any(k for k, _ in prefix_groups(list(zip(ids, names, strict=True)))),
        )
        source = "given" if limit is not None else "MemAvailable"
        limit = limit if limit is not None else available_memory()
        est.update({"limit": limit, "limit_source": source, "parameters": shape.parameters})
        if limit is not None and est["total"] > limit:
            big = max(est["parts"], key=est["parts"].get)
            hint = (
                "pass --dtype float32-blocks (the weights stay as stored, read from the files; float32 arithmetic one "
                "block at a time)"
                if self.dtype != torch.bfloat16
                else "free memory or verify fewer prompts (--prompts)"
            )
            raise VerifyUsageError(
                f"{self.repo}: a {self.dtype_name} run needs about {est['total'] / GiB:.1f} GiB of memory "
                f"({big} {est['parts'][big] / GiB:.1f} GiB), {limit / GiB:.1f} GiB is available ({source}); {hint}"
            )
        return est

    @property
    def original_dir(self) -> Path:
        o = self.inputs.original
        return o if o.is_dir() else o.parent

    # --- the converted side ----------------------------------------------------------------------------------
    @cached_property
    def config_dict(self) -> dict:
        p = self.repo / "config.json"
        if not p.is_file():
            raise VerifyUsageError(f"{p}: missing; this is not a converted repo")
        return load_json(p, VerifyUsageError, dict, hint="convert again")

    @cached_property
    def converted_tensors(self) -> ConvertedTensors:
        return ConvertedTensors(self.repo)

    @cached_property
    def data_pass(self):
        """The one pass over the bytes that ``files``, ``mapping`` and ``resize`` share (``verify.datapass``)."""
        from .checks import run_data_pass

        return run_data_pass(self)

    @cached_property
    def loaded(self):
        """(model, loading_info), loaded with ``from_pretrained`` as a user would, in the requested dtype."""
        import time

        from transformers import VipLlavaForConditionalGeneration

        t0 = time.perf_counter()
        attention = {"text_config": self.text_attention, "vision_config": "eager"}
        model, info = VipLlavaForConditionalGeneration.from_pretrained(
            str(self.repo), output_loading_info=True, dtype=self.dtype, attn_implementation=attention
        )
        model.eval()
        self.timings["converted_load"] = time.perf_counter() - t0
        return model, info

    @property
    def model(self):
        return self.loaded[0]

    @cached_property
    def processor(self):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(str(self.repo))

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.repo))

    @cached_property
    def generation_config(self) -> dict:
        p = self.repo / "generation_config.json"
        return load_json(p, VerifyUsageError, dict, hint="convert again") if p.is_file() else {}

    # --- the original side -----------------------------------------------------------------------------------
    @cached_property
    def original_tensors(self) -> OriginalTensors:
        return OriginalTensors(self.inputs.original)

    @cached_property
    def reference(self):
        import time

        from .original import OriginalVipLlava

        t0 = time.perf_counter()
        ref = OriginalVipLlava.from_dirs(
            self.original_dir, self.inputs.text_model, self.inputs.vision_model, dtype=self.dtype
        )
        self.timings["reference_load"] = time.perf_counter() - t0
        return ref

    @cached_property
    def base_tokenizer(self):
        """The tokenizer the original inference used (cheap: no model weights)."""
        from .original import load_base_tokenizer

        return load_base_tokenizer(self.backbone, self.inputs.text_model)

    @cached_property
    def era_tokenizers(self) -> dict[str, LlamaSlowTokenizer | FastTokenizer]:
        """The original's tokenizer in every OTHER transformers era the reference restates ({era: tokenizer}; empty
        for the backbones the original ran with the fast tokenizer)."""
        from .original import DEFAULT_TOKENIZER_ERA, load_base_tokenizer, tokenizer_eras

        return {
            era: load_base_tokenizer(self.backbone, self.inputs.text_model, era=era)
            for era in tokenizer_eras(self.backbone)
            if era != DEFAULT_TOKENIZER_ERA
        }

    @cached_property
    def terminators(self) -> dict[str, int]:
        """The original eval's stop tokens {token: id}."""
        from .original import terminator_ids

        return terminator_ids(self.backbone, self.base_tokenizer)

    @cached_property
    def layout(self) -> dict[str, int]:
        """The converted token layout the contract prescribes: image, pad, rows, original_rows, base_tokens."""
        from .original import expected_layout

        return expected_layout(len(self.base_tokenizer), self.original_vocab)

    @cached_property
    def conversations(self) -> tuple[str, list[dict]]:
        """(source, prompts with ``turns``) for the chat-template check: the prompts given as turns, else the
        bundled sample conversations rendered in this backbone's mode."""
        given = [p for p in self.prompts if p.get("turns") is not None]
        if given:
            return "prompts", given
        from .samples import sample_conversations

        return "bundled", [prepare_prompt(c, self.conv_mode, i) for i, c in enumerate(sample_conversations())]

    @cached_property
    def original_vocab(self) -> int:
        return int(self.original_tensors.meta("model.embed_tokens.weight")[1][0])

    # --- shared computations ---------------------------------------------------------------------------------
    def prompt_images(self, prompt: dict) -> list:
        name = prompt.get("image")
        n = prompt["prompt"].count("<image>")
        return [self.images[name]] * n if name and n else []

    @cached_property
    def parity_inputs(self) -> list[dict]:
        """Per prompt: reference ids (with sentinels), the expanded ids the converted model sees, pixel values."""
        cfg = self.config_dict
        image_id = cfg["image_token_index"]
        seq = cfg.get("image_seq_length", 576)
        out = []
        for p in self.prompts:
            ids = self.reference.tokenize(p["prompt"])
            expanded = []
            for t in ids:
                expanded.extend([image_id] * seq if t < 0 else [t])
            imgs = self.prompt_images(p)
            pixels = torch.stack([self.reference.preprocess(im) for im in imgs]) if imgs else None
            out.append(
                {
                    "name": p["name"],
                    "image": p.get("image") if imgs else None,
                    "ids": ids,
                    "expanded": expanded,
                    "images": imgs,
                    "pixels": pixels,
                }
            )
        return out

    @property
    def generating(self) -> bool:
        return self.max_new_tokens > 0 and (self.only is None or "generation" in self.only)

    def _time(self, phase: str, t0: float) -> None:
        import time

        self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - t0

    @cached_property
    def reference_runs(self) -> list[tuple]:
        """Per prompt: (ReferenceOutput, greedy ids or None). One forward per prompt gives the logits AND the
        key/value cache the greedy continuation steps from; all prompts run before the converted model is touched
        (the two models are never used in turns, so a full-size pair does not fight over the page cache).
        The prompt forwards run in ``self.arithmetic`` (float32 blocks by default); their caches are cast to the
        weights' dtype and the greedy steps of each batch (:attr:`decode_batches`) run in lock step in that dtype."""
        ref = self.reference
        inputs = self.parity_inputs
        out: list = [None] * len(inputs)
        root: dict = {}  # the system text all units begin with (root_prefix), cut from the first unit's forward
        with self.weight_stream("reference", ref.vision, ref.llm):
            for batch in self.decode_batches:
                self._reference_batch(batch, out, root)
        return out

    def _reference_batch(self, batch: list[tuple[int, list[int]]], out: list, root: dict) -> None:
        import time

        from .compute import cast_cache, reserved_cache

        ref = self.reference
        inputs = self.parity_inputs
        R = self.root_prefix
        fwds: dict[int, Any] = {}
        with self.arithmetic_context(ref.llm, ref.vision):
            for k, members in batch:
                t0 = time.perf_counter()
                pre = None
                for i in members:
                    x = inputs[i]
                    if pre is None:
                        keep = self.generating or k > 0 or (R > 0 and "out" not in root)
                        if "out" in root:  # the system text computed by the first unit: extend a copy of it
                            fwd = ref.extend(root["out"], x["ids"][R:], keep_cache=keep, images=x["images"])
                        else:
                            fwd = ref.forward(x["ids"], x["images"] or None, keep_cache=keep)
                            if R:
                                root["out"] = ref.prefix(fwd, R)
                        if k:  # the group's prefix (system text and image), cut from its first prompt
                            pre = ref.prefix(fwd, k)
                        if not self.generating:
                            fwd.cache = None
                    else:
                        fwd = ref.extend(pre, x["ids"][k:], keep_cache=self.generating)
                    if self.generating:
                        cast_cache(fwd.cache, self.dtype)
                    fwds[i] = fwd
                del pre
                self._time("reference_forward", t0)
        order = [i for _, members in batch for i in members]
        tokens: list = [None] * len(order)
        if self.generating:
            t0 = time.perf_counter()
            lengths = [len(fwds[i].input_positions) for i in order]
            with self.decode_residency("reference", lengths, skip=(ref.vision,)), self.decode_context(ref.llm):
                tokens = ref.continue_greedy_batch(
                    [fwds[i] for i in order], self.max_new_tokens, reserved=reserved_cache
                )
            self._time("reference_decode", t0)
        for i, ids in zip(order, tokens, strict=True):
            out[i] = (fwds[i], ids)

    def weight_stream(self, side: str, *models):
        """:class:`verify.residency.WeightStream` over ``models`` with the page-cache budget left after the run's
        estimated anonymous memory, releasing their pages at the end when the other side has yet to run (each
        side's runs happen once: the other side's model then gets the page cache). The side that runs last leaves
        its files cached: a gated push hashes them right after. Its summary goes to ``self.page_cache[side]``."""
        import contextlib

        from .residency import WeightStream, page_cache_budget

        others_ran = bool(set(self.page_cache) - {side})

        @contextlib.contextmanager
        def run():
            budget = page_cache_budget((self.memory or {}).get("total", 0))
            ws = WeightStream(*models, budget=budget, release=not others_ran)
            self._streams[side] = ws
            try:
                with ws:
                    yield ws
            finally:
                self._streams.pop(side, None)
            self.page_cache[side] = ws.summary()

        return run()

    def decode_residency(self, side: str, lengths: list[int], skip: tuple = ()):
        """A context for the greedy steps of one lock-step batch (spliced prompt ``lengths``): the side's weight
        stream (:meth:`weight_stream`) splits again with the page-cache budget the steps leave (they hold the
        batch's caches, already allocated, plus what the steps add: :meth:`decode_growth`), the modules in ``skip``
        (the vision tower and projector: the steps do not use them) out of the head; on exit, back to the stream's
        own budget for the prompt forwards that follow. A no-op outside a weight stream."""
        import contextlib

        from .residency import page_cache_budget

        @contextlib.contextmanager
        def run():
            ws = self._streams.get(side)
            if ws is None:
                yield None
                return
            ws.set_budget(page_cache_budget(self.decode_growth(lengths)), skip=skip)
            try:
                yield ws
            finally:
                ws.set_budget(ws.budget)

        return run()

    def decode_growth(self, lengths: list[int]) -> int:
        """Bytes of anonymous memory the greedy steps of a batch add to the caches its prompts already hold (in the
        weights' dtype): the caches stacked left-padded to the longest plus ``max_new_tokens`` positions, less what
        the prompts hold; one padded layer twice (a step's concatenation); ``DECODE_STEP_BYTES`` for the rest."""
        w = torch.empty((), dtype=self.dtype).element_size()
        shape = self.model_shape
        padded = len(lengths) * shape.cache_bytes(max(lengths) + self.max_new_tokens, w)
        held = sum(shape.cache_bytes(n, w) for n in lengths)
        return max(0, padded - held) + 2 * padded // max(1, shape.layers) + DECODE_STEP_BYTES

    @cached_property
    def shared_prefixes(self) -> list[tuple[int, list[int]]]:
        """How the prompts' forwards are scheduled (:func:`prefix_groups` of the prompts' ids and images)."""
        return prefix_groups([(x["ids"], x["image"]) for x in self.parity_inputs])

    @cached_property
    def root_prefix(self) -> int:
        """The ids every unit of :attr:`shared_prefixes` begins with before its image (:func:`root_prefix`)."""
        return root_prefix([(x["ids"], x["image"]) for x in self.parity_inputs], self.shared_prefixes)

    @cached_property
    def decode_batches(self) -> list[list[tuple[int, list[int]]]]:
        """The groups of :attr:`shared_prefixes` packed into lock-step batches (:func:`pack_decode_batches`): each
        batch runs its prompt forwards, then decodes its prompts together. One batch when not generating."""
        if not self.generating:
            return [self.shared_prefixes]
        w = torch.empty((), dtype=self.dtype).element_size()
        shape = self.model_shape
        return pack_decode_batches(
            self.shared_prefixes,
            [shape.cache_bytes(len(x["expanded"]) + self.max_new_tokens, w) for x in self.parity_inputs],
            DECODE_BATCH_BYTES,
        )

    def arithmetic_context(self, *models):
        """A context in which ``models`` compute their prompt forwards in ``self.arithmetic``: Float32Blocks when
        that differs from the weights' dtype, else a no-op (yields None)."""
        import contextlib

        from .compute import Float32Blocks

        if self.arithmetic == self.dtype:
            return contextlib.nullcontext(None)
        return Float32Blocks(*models)

    def decode_context(self, *models):
        """A context for the greedy steps of ``models``: their linear layers compute float32 products over the
        stored low-precision weights (:class:`verify.compute.Float32Products`), everything else runs in the weights'
        dtype; a no-op for float32 weights."""
        import contextlib

        from .compute import Float32Products

        if self.dtype == torch.float32:
            return contextlib.nullcontext(None)
        return Float32Products(*models)

    @property
    def reference_outputs(self) -> list:
        return [fwd for fwd, _ in self.reference_runs]

    @property
    def reference_generations(self) -> list[list[int]]:
        """Greedy continuations of the reference (the original's emit limit and terminators)."""
        if not self.generating:
            raise RuntimeError("generation was not requested (max_new_tokens 0 or the check not selected)")
        return [tokens for _, tokens in self.reference_runs]

    @cached_property
    def converted_runs(self) -> list[tuple[torch.Tensor, list[int] | None]]:
        """Per prompt: (float32 logits over every position, generated ids or None).

        Generation runs through ``model.generate`` as a user runs the converted repo: its ``generation_config.json``
        (stop ids, ``suppress_tokens``, ...) as loaded by ``from_pretrained``, greedy. Per prompt, ``generate`` with
        one new token runs the prompt forward (in ``self.arithmetic``, float32 blocks by default; ``logits_to_keep=0``
        keeps its logits at every position for the logits check) and picks the first id; its cache, cast to the
        weights' dtype, is kept. Then each batch of :attr:`decode_batches` continues in ONE ``generate`` call over the
        left-padded batch (:meth:`_generate_batch`), in the weights' dtype, as the reference's steps run."""
        out: list = [None] * len(self.parity_inputs)
        root: dict = {}  # the system text all units begin with (root_prefix), cut from the first unit's cache
        with self.weight_stream("converted", self.model):
            for batch in self.decode_batches:
                self._converted_batch(batch, out, root)
        return out

    def _converted_batch(self, batch: list[tuple[int, list[int]]], out: list, root: dict) -> None:
        import copy
        import time

        from .compute import cast_cache, output_cache

        model = self.model
        inputs = self.parity_inputs
        seq = self.config_dict.get("image_seq_length", 576)
        R = self.root_prefix  # ids; the root holds no image, so as many positions
        started: dict[int, tuple] = {}  # prompt -> (cache, first id)
        with self.arithmetic_context(model) as f32:
            for k, members in batch:
                t0 = time.perf_counter()
                if f32 is not None:
                    f32.enabled = True
                pre, pre_logits, P = None, None, 0
                for i in members:
                    x = inputs[i]
                    ids = torch.tensor([x["expanded"]])
                    kw: dict = {}
                    if pre is not None:  # a group member: the group's cache holds the image, generate runs the rest
                        kw["cache"], done, done_logits = copy.deepcopy(pre), P, pre_logits
                    elif "cache" in root:  # a unit's first prompt after the first: the system text is cached
                        kw["cache"], done, done_logits = copy.deepcopy(root["cache"]), R, root["logits"]
                    else:
                        done, done_logits = 0, None
                    if x["pixels"] is not None and pre is None:
                        kw["pixel_values"] = x["pixels"]
                    if f32 is not None:
                        f32.enabled = True
                    if not self.generating:
                        use = "cache" in kw or k > 0 or (R > 0 and "cache" not in root)
                        with torch.no_grad():
                            res = model(input_ids=ids[:, done:], use_cache=use, **kw)
                        logits, cache = res.logits[0].float(), output_cache(res)
                        del res
                    else:
                        logits, cache, started[i] = self._first_step(ids, done, kw)
                    if done_logits is not None:
                        logits = torch.cat([done_logits, logits])
                    if pre is None and R and "cache" not in root:  # the system text, cut from the first unit
                        root["cache"], root["logits"] = _cut_cache(cache, R), logits[:R].clone()
                    if pre is None and k:  # the group's prefix (system text and image), cut from its first prompt
                        P = sum(seq if t < 0 else 1 for t in x["ids"][:k])
                        pre, pre_logits = _cut_cache(cache, P), logits[:P].clone()
                    if self.generating:
                        cast_cache(cache, self.dtype)  # the greedy steps run in the weights' dtype
                    out[i] = (logits, None)
                    del cache
                del pre, pre_logits
                self._time("converted_forward", t0)
        if self.generating:
            t0 = time.perf_counter()
            order = [i for _, members in batch for i in members]
            rows = [(inputs[i]["expanded"], *started.pop(i)) for i in order]
            lengths = [len(ids) for ids, _, _ in rows]
            with self.decode_residency("converted", lengths, skip=vision_modules(model)), self.decode_context(model):
                generated = self._generate_batch(rows)
            for i, new_ids in zip(order, generated, strict=True):
                out[i] = (out[i][0], new_ids)
            self._time("converted_decode", t0)

    def _first_step(self, ids: torch.Tensor, done: int, kw: dict) -> tuple[torch.Tensor, Any, tuple]:
        """``generate`` of one new id for a prompt (``ids`` [1, T]) whose first ``done`` positions are in
        ``kw["cache"]`` (0: none): the float32 logits of the positions it computed (``logits_to_keep=0``, caught by a
        forward hook), the cache after the prompt, and (that cache, the new id). It must have run the model once, over
        the ``T - done`` positions, and the projector once exactly when ``kw`` holds pixel values (the image is after
        the cached positions): a release that dropped them after a cached prefix, or recomputed the prefix, is
        refused here rather than compared."""
        from .compute import output_cache

        model = self.model
        first: list = []
        projected: list = []
        handles = [
            model.register_forward_hook(lambda _m, _a, result: first.append(result.logits[0].float())),
            next(m for n, m in model.named_modules() if n.endswith("multi_modal_projector")).register_forward_hook(
                lambda *_: projected.append(1)
            ),
        ]
        try:
            with torch.no_grad():
                res = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=1,
                    do_sample=False,
                    logits_to_keep=0,
                    return_dict_in_generate=True,
                    **kw,
                )
        finally:
            for h in handles:
                h.remove()
        if len(first) != 1:
            raise RuntimeError(f"generate of one new id ran the model {len(first)} times")
        logits, cache, saw_pixels = first[0], output_cache(res), len(projected) == 1
        if logits.shape[0] != ids.shape[1] - done:
            raise RuntimeError(
                f"generate recomputed {logits.shape[0]} positions after a cached prefix of {done}, "
                f"expected {ids.shape[1] - done}"
            )
        if saw_pixels != ("pixel_values" in kw) or len(projected) > 1:
            raise RuntimeError(
                f"generate projected {len(projected)} image(s) for a prompt whose ids after the {done} cached "
                f"positions hold {int('pixel_values' in kw)}"
            )
        return logits, cache, (cache, int(res.sequences[0, -1]))

    def _generate_batch(self, rows: list[tuple[list[int], object, int]]) -> list[list[int]]:
        """The greedy continuation of prompts whose forward ran: ``rows`` of (expanded ids, their key/value cache in
        the weights' dtype, the first new id). One ``model.generate`` call continues them all: the ids and caches
        left-padded to the longest (``attention_mask`` 0 on the pad, so each prompt attends to its own positions and
        its positions count from its own start), each prompt's first id as the one new input. Per prompt: the first
        id and what followed, up to the generation config's first stop id (included) or ``max_new_tokens``."""
        model = self.model
        n = self.max_new_tokens
        gen = model.generation_config
        stops = id_set(gen.eos_token_id)
        new = [[first] for _, _, first in rows]
        if n <= 1 or all(first in stops for _, _, first in rows):
            return new
        lengths = [len(ids) for ids, _, _ in rows]
        longest = max(lengths)
        pad = gen.pad_token_id if isinstance(gen.pad_token_id, int) else 0
        input_ids = torch.full((len(rows), longest + 1), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), longest + 1), dtype=torch.long)
        for r, (ids, _, first) in enumerate(rows):
            input_ids[r, longest - len(ids) : longest] = torch.tensor(ids)
            input_ids[r, longest] = first
            mask[r, longest - len(ids) :] = 1
        cache = _left_padded_cache([cache for _, cache, _ in rows], lengths, room=n - 1)
        del rows
        with torch.no_grad():
            res = model.generate(
                input_ids=input_ids, attention_mask=mask, cache=cache, max_new_tokens=n - 1, do_sample=False
            )
        for r, ids in enumerate(new):
            if ids[0] in stops:
                continue
            for t in res[r, longest + 1 :].tolist():
                ids.append(t)
                if t in stops or len(ids) >= n:
                    break
        return new

    @property
    def converted_logits(self) -> list[torch.Tensor]:
        return [logits for logits, _ in self.converted_runs]

    @property
    def converted_generations(self) -> list[list[int]]:
        if not self.generating:
            raise RuntimeError("generation was not requested (max_new_tokens 0 or the check not selected)")
        out = []
        for _, tokens in self.converted_runs:
            assert tokens is not None  # generating: every run generated
            out.append(tokens)
        return out
