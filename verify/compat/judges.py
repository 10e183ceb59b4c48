"""The verdict on one environment's probe: one function per aspect judged, against the repo's files
(:func:`expected_settings`) and the reference probe (this environment's).

Each ``judge_*`` function looks at one aspect and returns a :class:`Finding`: whether it passes, and what the row
says about it (failures, notes, what the release cannot do). :func:`judge` runs them in the table's order and
makes the :class:`Row`. What a release is expected to do comes from
:func:`~verify.compat.releases.capabilities`: below 4.49 its ``AutoProcessor`` cannot pad to square, so a
processor failure there is listed under ``cannot`` and the recipe must pass instead; from 4.49 the recipe is run
and reported, not required; a release that does not know the backbone gives an N/A row that says so (when its
model load really fails).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .probing import Probe, repo_json
from .releases import BACKBONE_FROM, IGNORE_MERGES_FROM, PROCESSOR_FROM, Capabilities, capabilities
from .text import first_difference, sentence, short, squash

LOGITS_TOL = 1e-5  # fp32, same inputs, same torch: only kernel-order differences are allowed
PIXEL_TOL = 1e-5
KEY_KINDS = ("missing_keys", "unexpected_keys", "mismatched_keys")
# The dummy-prefix checks: (probe, expected pieces right after <image>: "▁" then a piece starting with "▁" ...)
DUMMY_PREFIX = {"<image>\nWhat": ["\u2581", "<0x0A>"], "<image> What": ["\u2581", "\u2581*"]}


def expected_settings(repo: Path) -> dict:
    """The values each version must read, straight from the repo's files (only keys the files have)."""
    repo = Path(repo)
    cfg, gen, tokc = (
        repo_json(repo, "config.json"),
        repo_json(repo, "generation_config.json"),
        repo_json(repo, "tokenizer_config.json"),
    )
    proc = repo_json(repo, "processor_config.json")
    pre = repo_json(repo, "preprocessor_config.json") or proc.get("image_processor") or {}
    tc, vc = cfg.get("text_config") or {}, cfg.get("vision_config") or {}
    want = {
        "config.vision_feature_layers": cfg.get("vision_feature_layers"),
        "config.image_seq_length": cfg.get("image_seq_length"),
        "config.image_token_index": cfg.get("image_token_index", cfg.get("image_token_id")),
        "config.pad_token_id": cfg.get("pad_token_id"),
        "config.projector_hidden_act": cfg.get("projector_hidden_act"),
        "config.projector_layernorm_eps": cfg.get("projector_layernorm_eps"),
        "text_config.pad_token_id": tc.get("pad_token_id"),
        "text_config.vocab_size": tc.get("vocab_size"),
        "text_config.rms_norm_eps": tc.get("rms_norm_eps"),
        "text_config.rope_theta": tc.get("rope_theta", (tc.get("rope_parameters") or {}).get("rope_theta")),
        "text_config.max_position_embeddings": tc.get("max_position_embeddings"),
        "vision_config.image_size": vc.get("image_size"),
        "vision_config.patch_size": vc.get("patch_size"),
        "vision_config.hidden_act": vc.get("hidden_act"),
        "generation_config.bos_token_id": gen.get("bos_token_id"),
        "generation_config.eos_token_id": gen.get("eos_token_id"),
        "generation_config.pad_token_id": gen.get("pad_token_id"),
        "model.dtype": "float32",
        "tokenizer.pad_token_id": cfg.get("pad_token_id"),
        "tokenizer.image_token_id": cfg.get("image_token_index", cfg.get("image_token_id")),
        "tokenizer.bos_token_id": gen.get("bos_token_id") if isinstance(gen.get("bos_token_id"), int) else None,
        "tokenizer.eos_token_id": gen.get("eos_token_id") if isinstance(gen.get("eos_token_id"), int) else None,
        "tokenizer.padding_side": tokc.get("padding_side"),
        "tokenizer.model_max_length": tokc.get("model_max_length"),
    }
    for k in ("patch_size", "num_additional_image_tokens", "vision_feature_select_strategy", "image_token"):
        want[f"processor.{k}"] = proc.get(k)
    for k in (
        "do_pad",
        "do_resize",
        "size",
        "resample",
        "do_center_crop",
        "crop_size",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "do_convert_rgb",
    ):
        want[f"image_processor.{k}"] = pre.get(k)
    try:
        bpe = json.loads((repo / "tokenizer.json").read_text(encoding="utf-8")).get("model") or {}
    except (OSError, ValueError, AttributeError):
        bpe = {}
    want["tokenizer_json.ignore_merges"] = bpe.get("ignore_merges") if isinstance(bpe, dict) else None
    return {k: v for k, v in want.items() if v is not None}


def same(a, b) -> bool:
    """Equal as settings: numbers numerically (floats to 1e-6 relative), lists and dicts element-wise."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@dataclass
class Row:
    label: str
    transformers: str | None
    env: dict
    load_ok: bool
    missing: int | None
    unexpected: int | None
    mismatched: int | None
    settings_ok: bool
    tokenizer_ok: bool
    processor_ok: bool
    image_tokens: list[int]
    image_tokens_ok: bool
    logits_max_diff: float | None
    logits_ok: bool
    pixel_max_diff: float | None
    passed: bool
    details: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth knowing, not failures
    loading_info: dict = field(default_factory=dict)  # the full missing / unexpected / mismatched key lists
    classes: dict = field(default_factory=dict)
    seconds: float = 0.0
    greedy_ok: bool = False  # the same NEW_TOKENS greedy tokens as the reference on every prompt
    recipe_ok: bool = False  # the recipe gives the reference's ids (expanded), pixel_values and logits
    recipe_logits_max_diff: float | None = None
    recipe_pixel_max_diff: float | None = None
    processor_required: bool = True  # False below 4.49: its processor's failure is a "cannot", not a FAIL
    needs_eager: bool | None = None  # the default attention fails to load or run, eager works
    applicable: bool = True  # False: the release does not know the backbone (the row says so; not a failure)
    cannot: list[str] = field(default_factory=list)  # what this release cannot do, measured (not failures)

    @property
    def verdict(self) -> str:
        return "N/A" if not self.applicable else "PASS" if self.passed else "FAIL"


def _runs(ids: np.ndarray, token: int) -> list[int]:
    runs, n = [], 0
    for t in list(ids) + [None]:
        if t == token:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def check_tokenizer(
    name: str,
    tok: dict | None,
    ref: dict | None,
    details: list[str],
    notes: list[str] | None = None,
    loose_decode: bool = False,
) -> bool:
    """ids and pieces must equal the reference's; decoded text too, except that with ``loose_decode`` (4.x's slow
    LlamaTokenizer, whose legacy decode drops the dummy-prefix space and respaces around special tokens) a
    whitespace-only difference is a note, not a failure."""
    ok = True
    if tok is None:
        return False
    if ref is not None:
        for mine, theirs in zip(tok.get("probes", []), ref.get("probes", []), strict=False):
            for what in ("ids", "tokens", "decoded"):
                if mine.get(what) == theirs.get(what):
                    continue
                if what == "decoded" and loose_decode and squash(mine.get(what)) == squash(theirs.get(what)):
                    if notes is not None:
                        notes.append(
                            f"{name}: decoded {mine['text'][:30]!r} differs in whitespace only "
                            f"({first_difference(mine.get(what), theirs.get(what), 12)})"
                        )
                    continue
                ok = False
                details.append(
                    f"{name}: {what} of {mine['text'][:30]!r} differ "
                    f"{first_difference(mine.get(what), theirs.get(what))}"
                )
                break
        if len(tok.get("probes", [])) != len(ref.get("probes", [])):
            ok = False
            details.append(
                f"{name}: {len(tok.get('probes', []))} probe strings, reference {len(ref.get('probes', []))}"
            )
        if tok.get("chat") != ref.get("chat"):
            ok = False
            details.append(
                f"{name}: chat template renders {short(tok.get('chat'))}, reference {short(ref.get('chat'))}"
            )
    # sentencepiece's dummy prefix after <image> (Llama-style vocabularies only: pieces spelled with "▁")
    probes = {p["text"]: p for p in tok.get("probes", [])}
    spm = any(t.startswith("\u2581") for p in probes.values() for t in p.get("tokens") or [] if isinstance(t, str))
    if spm:
        for text, want in DUMMY_PREFIX.items():
            p = probes.get(text)
            if p is None:
                continue
            toks = p.get("tokens") or []
            after = toks[toks.index("<image>") + 1 :][: len(want)] if "<image>" in toks else []
            good = len(after) == len(want) and all(
                (t.startswith(w[:-1]) and len(t) > 1) if w.endswith("*") else t == w
                for t, w in zip(after, want, strict=True)
            )
            if not good:
                ok = False
                details.append(
                    f"{name}: {text!r} gives {after} after <image>; the original (chunked sentencepiece) gives "
                    f"{[w.replace('*', '...') for w in want]}"
                )
    return ok


def _max_diff(a, b) -> float:
    d = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
    return d if math.isfinite(d) else math.inf


def expand(ids: np.ndarray, token, n) -> np.ndarray:
    """Each ``token`` in ``ids`` repeated ``n`` times (what the model does with a collapsed <image>)."""
    return np.repeat(ids, np.where(ids == token, int(n), 1)) if token is not None and n else ids


def _shape(a):
    return None if a is None else a.shape


def _steps(probe: Probe) -> dict:
    return (probe.result or {}).get("steps", {})


def _errors(probe: Probe) -> dict:
    return (probe.result or {}).get("errors", {})


def _ran(probe: Probe, step: str) -> bool:
    """The probe ran and its ``step`` succeeded."""
    return bool(not probe.error and _steps(probe).get(step, {}).get("ok", False))


def _image_count(prompt: dict) -> int:
    return prompt["prompt"].count("<image>") if prompt.get("image") else 0


# ------------------------------------------------------------------------------------------------------------
# the aspects, one function each
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Finding:
    """One aspect's verdict: ``ok``, the failures (``details``), what is worth knowing (``notes``) and what the
    release cannot do, measured (``cannot``); notes and cannots never fail a row."""

    ok: bool
    details: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cannot: list[str] = field(default_factory=list)


@dataclass
class Load(Finding):
    """``ok``: loaded with 0 missing / unexpected / mismatched keys and no load errors."""

    loaded: bool = False  # from_pretrained returned a model
    counts: dict = field(default_factory=dict)  # KEY_KINDS -> how many (None: not reported)
    loading_info: dict = field(default_factory=dict)


@dataclass
class Inputs(Finding):
    """The processor's or the recipe's inputs (and the recipe's logits) against the reference's."""

    image_tokens_ok: bool = False
    runs: list[int] = field(default_factory=list)  # lengths of the image-token runs in its input_ids
    pixel_max_diff: float | None = None
    logits_max_diff: float | None = None


@dataclass
class Logits(Finding):
    max_diff: float | None = None


@dataclass
class Attention(Finding):
    needs_eager: bool | None = None  # None: not probed


def judge_backbone(probe: Probe, version: str, cap: Capabilities, model_type: str | None) -> Row | None:
    """The N/A row when the release does not know the backbone and its model load failed; else None."""
    if cap.backbone or probe.error or _steps(probe).get("model", {}).get("ok", False):
        return None
    return Row(
        label=probe.label,
        transformers=version,
        env=probe.env,
        load_ok=False,
        missing=None,
        unexpected=None,
        mismatched=None,
        settings_ok=False,
        tokenizer_ok=False,
        processor_ok=False,
        image_tokens=[],
        image_tokens_ok=False,
        logits_max_diff=None,
        logits_ok=False,
        pixel_max_diff=None,
        passed=True,
        applicable=False,
        seconds=round(probe.seconds, 2),
        cannot=[
            f"transformers {version} does not know {model_type} "
            f"({_errors(probe).get('model', 'the model does not load')}); "
            f"the first release that does is {'.'.join(map(str, BACKBONE_FROM[model_type or '']))}"
        ],
    )


def judge_run(probe: Probe, cap: Capabilities) -> Finding:
    """The probe ran, and each step that raised, by its error's first sentence. Below 4.49 the AutoProcessor's
    error is a ``cannot``; from 4.49 the recipe's errors are :func:`judge_recipe`'s notes; the default attention's
    is :func:`judge_attention`'s."""
    f = Finding(ok=not probe.error, details=[probe.error] if probe.error else [])
    for name, err in sorted(_errors(probe).items()):
        if name == "model_default_attention" or (cap.processor and name in ("recipe", "recipe_forward")):
            continue
        if name == "processor" and not cap.processor:
            f.cannot.append(f"AutoProcessor: {sentence(err)}")
        else:
            f.details.append(f"{name}: {sentence(err)}")
    return f


def judge_load(probe: Probe) -> Load:
    """The model loads with 0 missing / unexpected / mismatched keys and no load errors."""
    loaded = _ran(probe, "model")
    li = (probe.result or {}).get("loading_info") or {}
    counts = {k: (len(li[k]) if k in li else None) for k in KEY_KINDS}
    f = Load(ok=False, loaded=loaded, counts=counts, loading_info=li)
    for k, n in counts.items():
        if n:
            f.details.append(f"{n} {k.replace('_', ' ')}: {', '.join(li[k][:3])}{' ...' if n > 3 else ''}")
    if li.get("error_msgs"):
        f.details.append(f"load errors: {'; '.join(li['error_msgs'][:2])}")
    f.ok = loaded and all(n == 0 for n in counts.values()) and not li.get("error_msgs")
    return f


def judge_settings(probe: Probe, ref: Probe, expected: dict) -> Finding:
    """Every setting the release read equals the files, and the reference's reading of everything else."""
    got, ref_settings = (probe.result or {}).get("settings") or {}, (ref.result or {}).get("settings") or {}
    f = Finding(ok=not probe.error)
    for k, want in expected.items():
        if k in got and not same(got[k], want):
            f.ok = False
            f.details.append(f"reads {k} = {short(got[k])}, the files say {short(want)}")
    for k in sorted(set(ref_settings) & set(got) - set(expected)):
        if not same(got[k], ref_settings[k]):
            f.ok = False
            f.details.append(f"reads {k} = {short(got[k])}, reference reads {short(ref_settings[k])}")
    return f


def judge_tokenizer(probe: Probe, ref: Probe) -> Finding:
    """``AutoTokenizer`` (and ``use_fast=False`` where that is another implementation) gives the reference's ids,
    pieces, decoded text and chat template, with sentencepiece's dummy prefix after ``<image>``."""
    r = probe.result or {}
    ref_tok = (ref.result or {}).get("tokenizer")
    f = Finding(ok=False)
    ok = _ran(probe, "tokenizer")
    ok = check_tokenizer("tokenizer", r.get("tokenizer"), ref_tok, f.details) and ok
    if _steps(probe).get("tokenizer_slow", {}).get("ok") is False:
        ok = False
    if r.get("tokenizer_slow") is not None:
        slow = r["tokenizer_slow"]
        ok = check_tokenizer("tokenizer(use_fast=False)", slow, ref_tok, f.details, f.notes, loose_decode=True) and ok
    f.ok = ok
    return f


def judge_bpe_options(probe: Probe, expected: dict) -> Finding:
    """A ``cannot`` (never a failure) when the tokenizers release drops ``ignore_merges`` that tokenizer.json sets."""
    r = probe.result or {}
    f = Finding(ok=True)
    if expected.get("tokenizer_json.ignore_merges") is True and r.get("tokenizer") is not None:
        kept = (r["tokenizer"].get("bpe_options") or {}).get("ignore_merges")
        if kept is not True:
            tv = (r.get("versions") or {}).get("tokenizers")
            f.cannot.append(
                f"tokenizer: tokenizers {tv} drops the BPE option ignore_merges (tokenizer.json says true; "
                f"it arrived in {'.'.join(map(str, IGNORE_MERGES_FROM))}): a word that is in the vocabulary but "
                "not reachable by merges is split into smaller pieces (588 of the 128000 words of the real "
                "Llama-3 vocabulary, measured); transformers 4.40+ comes with tokenizers 0.19+"
            )
    return f


def judge_processor(
    probe: Probe, ref: Probe, expected: dict, prompts: list[dict], cap: Capabilities, version: str, pixel_tol: float
) -> Inputs:
    """``AutoProcessor`` gives the reference's ``input_ids``, ``pixel_values`` and chat template, and each
    ``<image>`` expands to ``image_seq_length`` tokens. Below 4.49 it cannot pad to square: whatever it gets wrong
    there is listed under ``cannot`` (the recipe carries the row)."""
    processor_ok = _ran(probe, "processor")
    f = Inputs(ok=processor_ok, image_tokens_ok=processor_ok)
    if processor_ok:
        rp = (ref.result or {}).get("processor") or {}
        mine = probe.result["processor"]
        if mine.get("chat") != rp.get("chat"):
            f.ok = False
            f.details.append(
                f"processor: chat template renders {short(mine.get('chat'))}, reference {short(rp.get('chat'))}"
            )
        f.pixel_max_diff = 0.0
        for i, p in enumerate(prompts):
            _processor_prompt(f, i, p, probe, ref, expected)
        if f.pixel_max_diff > pixel_tol:
            f.ok = False
            f.details.append(f"processor: pixel_values max |diff| {f.pixel_max_diff:.3g} > {pixel_tol:g}")
    if not cap.processor and not (f.ok and f.image_tokens_ok):
        # an AutoProcessor that loads but does not pad / expand like the reference is as unusable as one that fails
        f.cannot = [f"AutoProcessor: {d.removeprefix('processor: ')}" for d in f.details]
        f.cannot.append(
            f"AutoProcessor with pad-to-square needs transformers {'.'.join(map(str, PROCESSOR_FROM))}+ "
            f"(LlavaImageProcessor); on {version} use the recipe (pad to square with the mean colour, "
            "CLIPImageProcessor, "
            f"{'one <image> per image' if cap.collapse else 'image_seq_length <image> tokens per image'})"
        )
        f.details, f.runs = [], []
    return f


def _processor_prompt(f: Inputs, i: int, p: dict, probe: Probe, ref: Probe, expected: dict) -> None:
    image_id, seq = expected.get("config.image_token_index"), expected.get("config.image_seq_length")
    mine, theirs = probe.tensors.get(f"own_ids_{i}"), ref.tensors.get(f"own_ids_{i}")
    if mine is None:
        f.ok = False
        f.details.append(f"processor: no input_ids for {p['name']}")
        return
    if theirs is not None and (mine.shape != theirs.shape or not np.array_equal(mine, theirs)):
        f.ok = False
        f.details.append(
            f"processor: input_ids of {p['name']} differ from the reference ({len(mine)} vs {len(theirs)} tokens)"
        )
    n_img = _image_count(p)
    runs = _runs(mine, image_id) if image_id is not None else []
    f.runs.extend(runs)
    if len(runs) != n_img or (seq is not None and any(x != seq for x in runs)):
        f.image_tokens_ok = False
        f.details.append(
            f"processor: {p['name']}: {n_img} <image> became runs of {runs} image tokens, expected {n_img} x {seq}"
        )
    a, b = probe.tensors.get(f"own_pixels_{i}"), ref.tensors.get(f"own_pixels_{i}")
    if (a is None) != (b is None) or (a is not None and b is not None and a.shape != b.shape):
        f.ok = False
        f.details.append(f"processor: pixel_values of {p['name']}: shape {_shape(a)} vs reference {_shape(b)}")
    elif a is not None and b is not None:
        f.pixel_max_diff = max(f.pixel_max_diff or 0.0, _max_diff(a, b))


def judge_logits(probe: Probe, ref: Probe, prompts: list[dict], loaded: bool, tol: float) -> Logits:
    """max |logits - reference logits| <= ``tol`` on every prompt, on the reference's inputs."""
    f = Logits(ok=loaded and _ran(probe, "forward"))
    if not f.ok:
        return f
    max_diff = 0.0
    for i, p in enumerate(prompts):
        a, b = probe.tensors.get(f"logits_{i}"), ref.tensors.get(f"logits_{i}")
        if a is None or b is None or a.shape != b.shape:
            f.ok = False
            max_diff = math.inf
            f.details.append(f"logits of {p['name']}: shape {_shape(a)} vs reference {_shape(b)}")
            continue
        max_diff = max(max_diff, _max_diff(a, b))
    if max_diff > tol:
        f.ok = False
        f.details.append(f"logits max |diff| {max_diff:.3g} > {tol:g}")
    f.max_diff = max_diff
    return f


def judge_greedy(probe: Probe, ref: Probe, prompts: list[dict], loaded: bool) -> Finding:
    """The reference's greedy tokens on every prompt, on the reference's inputs."""
    f = Finding(ok=loaded and _ran(probe, "greedy"))
    if not f.ok:
        if loaded and "greedy" not in _steps(probe):
            f.details.append("greedy: not run")
        return f
    for i, p in enumerate(prompts):
        a, b = probe.tensors.get(f"greedy_{i}"), ref.tensors.get(f"greedy_{i}")
        if a is None or b is None or a.tolist() != b.tolist():
            f.ok = False
            f.details.append(
                f"greedy tokens of {p['name']}: {None if a is None else a.tolist()}, reference "
                f"{None if b is None else b.tolist()}"
            )
    return f


def judge_recipe(
    probe: Probe,
    ref: Probe,
    expected: dict,
    prompts: list[dict],
    cap: Capabilities,
    version: str,
    tol: float,
    pixel_tol: float,
) -> Inputs:
    """The recipe (pad to square, ``CLIPImageProcessor``, ``<image>`` collapsed or expanded) gives the reference's
    ids (expanded as the model does), pixel_values and logits. From 4.49 the processor is the way: what the recipe
    gets wrong there is a note, not a failure."""
    f = Inputs(ok=_ran(probe, "recipe") and _ran(probe, "recipe_forward"))
    if f.ok:
        f.logits_max_diff = f.pixel_max_diff = 0.0
        for i, p in enumerate(prompts):
            _recipe_prompt(f, i, p, probe, ref, expected, cap)
        if f.pixel_max_diff > pixel_tol:
            f.ok = False
            f.details.append(f"recipe: pixel_values max |diff| {f.pixel_max_diff:.3g} > {pixel_tol:g}")
        if f.logits_max_diff > tol:
            f.ok = False
            f.details.append(f"recipe: logits max |diff| {f.logits_max_diff:.3g} > {tol:g}")
    if cap.processor:  # the processor is the way here: the recipe is run and reported, not required
        errors = _errors(probe)
        f.notes = [f"not needed on {version}: {d}" for d in f.details]
        f.notes += [
            f"not needed on {version}: recipe: {sentence(errors[k])}"
            for k in ("recipe", "recipe_forward")
            if k in errors
        ]
        f.details = []
    return f


def _recipe_prompt(f: Inputs, i: int, p: dict, probe: Probe, ref: Probe, expected: dict, cap: Capabilities) -> None:
    image_id, seq = expected.get("config.image_token_index"), expected.get("config.image_seq_length")
    ids, want = probe.tensors.get(f"recipe_ids_{i}"), ref.tensors.get(f"own_ids_{i}")
    n_img = _image_count(p)
    runs = _runs(ids, image_id) if ids is not None and image_id is not None else []
    f.runs.extend(runs)
    if len(runs) != n_img or any(x != (1 if cap.collapse else seq) for x in runs):
        f.ok = False
        f.details.append(
            f"recipe: {p['name']}: {n_img} <image> became runs of {runs}, expected {n_img} x "
            f"{1 if cap.collapse else seq}"
        )
    if ids is None or want is None or not np.array_equal(expand(ids, image_id, seq) if cap.collapse else ids, want):
        f.ok = False
        f.details.append(
            f"recipe: input_ids of {p['name']} differ from the reference's"
            f"{' (each <image> counted as ' + str(seq) + ')' if cap.collapse else ''}"
        )
    a, b = probe.tensors.get(f"recipe_pixels_{i}"), ref.tensors.get(f"own_pixels_{i}")
    if (a is None) != (b is None) or (a is not None and b is not None and a.shape != b.shape):
        f.ok = False
        f.details.append(f"recipe: pixel_values of {p['name']}: shape {_shape(a)} vs reference {_shape(b)}")
    elif a is not None and b is not None:
        f.pixel_max_diff = max(f.pixel_max_diff or 0.0, _max_diff(a, b))
    a, b = probe.tensors.get(f"recipe_logits_{i}"), ref.tensors.get(f"logits_{i}")
    if a is None or b is None or a.shape != b.shape:
        f.ok = False
        f.logits_max_diff = math.inf
        f.details.append(f"recipe: logits of {p['name']}: shape {_shape(a)} vs reference {_shape(b)}")
    else:
        f.logits_max_diff = max(f.logits_max_diff or 0.0, _max_diff(a, b))


def judge_attention(probe: Probe, loaded: bool) -> Attention:
    """Whether the release's default attention loads and runs; when only eager does, a ``cannot``. Never fails the
    row itself (a model that does not load fails :func:`judge_load`)."""
    f = Attention(ok=True)
    steps, errors = _steps(probe), _errors(probe)
    if "model_default_attention" in steps:
        default_ok = steps["model_default_attention"].get("ok", False)
        f.needs_eager = loaded and not default_ok
        if f.needs_eager:
            f.cannot.append(
                f"default attention: {sentence(errors.get('model_default_attention'))} Load with "
                'attn_implementation="eager"'
            )
        elif not loaded and not default_ok:
            f.details.append(f"model_default_attention: {errors.get('model_default_attention')}")
    return f


# ------------------------------------------------------------------------------------------------------------
# the row
# ------------------------------------------------------------------------------------------------------------
def judge(
    probe: Probe,
    ref: Probe,
    expected: dict,
    prompts: list[dict],
    tol: float = LOGITS_TOL,
    pixel_tol: float = PIXEL_TOL,
    model_type: str | None = None,
) -> Row:
    """The verdict on one environment's probe, against the files (``expected``) and the reference probe: every
    aspect judged, in the table's order."""
    r = probe.result or {}
    version = (r.get("versions") or {}).get("transformers") or probe.label
    cap = capabilities(version, model_type)
    na = judge_backbone(probe, version, cap, model_type)
    if na is not None:
        return na
    run = judge_run(probe, cap)
    load = judge_load(probe)
    settings = judge_settings(probe, ref, expected)
    tokenizer = judge_tokenizer(probe, ref)
    bpe = judge_bpe_options(probe, expected)
    processor = judge_processor(probe, ref, expected, prompts, cap, version, pixel_tol)
    logits = judge_logits(probe, ref, prompts, load.loaded, tol)
    greedy = judge_greedy(probe, ref, prompts, load.loaded)
    recipe = judge_recipe(probe, ref, expected, prompts, cap, version, tol, pixel_tol)
    attention = judge_attention(probe, load.loaded)
    findings = (run, load, settings, tokenizer, bpe, processor, logits, greedy, recipe, attention)
    # the processor is required from 4.49, the recipe before
    inputs_ok = (processor.ok and processor.image_tokens_ok) if cap.processor else recipe.ok
    return Row(
        label=probe.label,
        transformers=(r.get("versions") or {}).get("transformers"),
        env=probe.env,
        load_ok=load.loaded,
        missing=load.counts["missing_keys"],
        unexpected=load.counts["unexpected_keys"],
        mismatched=load.counts["mismatched_keys"],
        settings_ok=settings.ok,
        tokenizer_ok=tokenizer.ok,
        processor_ok=processor.ok,
        image_tokens=processor.runs + ([] if cap.processor else recipe.runs),
        image_tokens_ok=processor.image_tokens_ok,
        logits_max_diff=logits.max_diff,
        logits_ok=logits.ok,
        pixel_max_diff=processor.pixel_max_diff,
        passed=all(f.ok for f in (run, load, settings, tokenizer, logits, greedy)) and inputs_ok,
        details=[d for f in findings for d in f.details],
        notes=[n for f in findings for n in f.notes],
        loading_info=load.loading_info,
        classes=_classes(r),
        seconds=round(probe.seconds, 2),
        greedy_ok=greedy.ok,
        recipe_ok=recipe.ok,
        recipe_logits_max_diff=recipe.logits_max_diff,
        recipe_pixel_max_diff=recipe.pixel_max_diff,
        processor_required=cap.processor,
        needs_eager=attention.needs_eager,
        cannot=[c for f in findings for c in f.cannot],
    )


def _classes(r: dict) -> dict:
    return {
        "tokenizer": (r.get("tokenizer") or {}).get("class"),
        "tokenizer_use_fast_false": (r.get("tokenizer_slow") or {}).get("class"),
        "processor": (r.get("processor") or {}).get("class"),
        "image_processor": (r.get("processor") or {}).get("image_processor_class"),
    }
