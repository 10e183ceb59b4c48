"""The checks. Each takes the shared :class:`~verify.context.Context` and returns a :class:`~verify.report.Check`.

Every check here has a test in ``tests/test_verify_mutations.py`` that plants the defect it looks for and sees
it FAIL. Tolerances and bounds are stated in the check's summary line.
"""

from __future__ import annotations

import json
import math
import re
from statistics import NormalDist
from typing import Any

import torch

from .context import MANIFEST, Context, ConvertedTensors, OriginalTensors, id_set
from .report import FAIL, NA, PASS, WARN, Check, first_difference_index

# max |logits diff| per verify --dtype: float32 arithmetic (float32-blocks computes the prompt in float32 over bf16
# weights) allows kernel-order differences only; bf16 arithmetic rounds every product to 8 bits of mantissa.
LOGITS_TOL = {"float32-blocks": 1e-4, "float32": 1e-4, "bfloat16": 5e-2}
PIXEL_TOL = 1e-5
RESIZE_SCALE = 1e-5
FAMILY_FALSE_ALARM = 1e-6  # probability that a correct conversion fails a resize bound

# An independent statement of where original tensors live in the canonical layout: prefix substitutions,
# not the converter's exact-key table. A bug in one is caught by the other.
_PREFIXES = (
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.mm_projector.clip_layernorm.", "multi_modal_projector.projector_layernorm."),
    ("model.mm_projector.final_linear.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.final_linear.2.", "multi_modal_projector.linear_2."),
    ("lm_head.", "language_model.lm_head."),
    ("model.", "language_model.model."),
)
_LEGACY_BUFFERS = re.compile(r"(rotary_emb\.inv_freq|embeddings\.position_ids)$")
EMBED, HEAD = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"
# Files a published repo carries beside what the converter wrote (model card, verification report, the Hub's
# .gitattributes): not in the manifest, not weights, not read by from_pretrained.
PUBLICATION_FILES = frozenset({"README.md", "verification.json", ".gitattributes"})


def canonical(original_key: str) -> str | None:
    if _LEGACY_BUFFERS.search(original_key):
        return None
    for old, new in _PREFIXES:
        if original_key.startswith(old):
            return new + original_key[len(old) :]
    return "?" + original_key


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same bytes (so -0.0 != 0.0 and a NaN equals the same NaN), for tensors of one dtype and shape."""
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


ORIGINAL_EMBED, ORIGINAL_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def run_data_pass(ctx: Context):
    """The one pass over the bytes for the data checks that will run (``ctx.data_checks``): which converted tensor
    is compared with which original is decided here, by :func:`canonical`; ``verify.datapass`` streams them."""
    from .datapass import Pair, run_pass

    wanted = ctx.data_checks
    shards = sorted(p for p in ctx.repo.glob("*.safetensors") if p.is_file())
    hash_files = "files" in wanted and ctx.manifest is not None
    others = []
    if hash_files:
        assert ctx.manifest is not None
        listed = {n for n in ctx.manifest.get("outputs", {}) if (ctx.repo / n).is_file()}
        others = [ctx.repo / n for n in sorted(listed - {p.name for p in shards})]
    pairs = []
    if wanted & {"mapping", "resize"}:
        orig: OriginalTensors | None
        conv: ConvertedTensors | None
        try:
            orig, conv = ctx.original_tensors, ctx.converted_tensors
        except Exception:  # unreadable input: the checks that need it say so themselves
            orig = conv = None
        if orig is not None and conv is not None:
            keys = (
                orig.keys() if "mapping" in wanted else [k for k in (ORIGINAL_EMBED, ORIGINAL_HEAD) if k in orig.files]
            )
            olocs, clocs = orig.locations(), conv.locations()
            for key in keys:
                name = canonical(key)
                if name is None or name.startswith("?") or name not in clocs:
                    continue
                a_dtype, a_shape = orig.meta(key)
                b = clocs[name]
                resized = name in (EMBED, HEAD)
                fits = (
                    (b.shape[1:] == a_shape[1:] and b.shape[0] >= a_shape[0])
                    if resized and a_shape
                    else b.shape == a_shape
                )
                if not fits:
                    continue  # the checks report the shapes; nothing to compare
                o = olocs.get(key)
                if o is not None and (o.dtype, o.shape) != (a_dtype, a_shape):
                    o = None
                pairs.append(Pair(name, key, b, o, a_dtype, a_shape, keep_rest=resized, stats=key == ORIGINAL_EMBED))
    return run_pass(shards, others, pairs, hash_files, lambda k: ctx.original_tensors.get(k))


def _original_equal(ctx: Context, key: str, name: str) -> bool:
    """Converted ``name`` (its first rows, for the resized matrices) bit-identical to original ``key`` cast to the
    converted dtype: from the data pass, or read directly where the pass could not compare them."""
    data = ctx.data_pass
    if name in data.equal:
        return data.equal[name]
    a, b = ctx.original_tensors.get(key), ctx.converted_tensors.get(name)
    if b.dtype != a.dtype:
        a = a.to(b.dtype)
    if name in (EMBED, HEAD):
        b = b[: a.shape[0]]
    return a.shape == b.shape and _bits_equal(a, b)


def _max_abs_diff(ctx: Context, key: str, name: str) -> float:
    """Only for a pair that differs: read both again (the report's number)."""
    a, b = ctx.original_tensors.get(key), ctx.converted_tensors.get(name)
    if name in (EMBED, HEAD):
        b = b[: a.shape[0]]
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------------------------------------
def check_files(ctx: Context) -> Check:
    """Every output file's sha256 matches the manifest; the safetensors index covers every tensor exactly once."""
    problems: list[str] = []
    manifest = ctx.manifest
    audit = manifest is None  # a repo this tool did not write: no recorded hashes, the shard layout still checked
    outputs: dict = {} if manifest is None else manifest.get("outputs", {})
    present = set() if audit else {p.name for p in ctx.repo.iterdir() if p.is_file()} - {MANIFEST}
    published = sorted(present & PUBLICATION_FILES)  # added when publishing, after the manifest was written
    present -= PUBLICATION_FILES
    digests = ctx.data_pass.digests
    for name, digest in sorted(outputs.items()):
        p = ctx.repo / name
        if not p.is_file():
            problems.append(f"{name}: listed in {MANIFEST} but missing")
        elif digests[name] != digest:
            problems.append(f"{name}: sha256 differs from {MANIFEST} (file changed or corrupt)")
    for name in sorted(present - set(outputs)):
        problems.append(f"{name}: in the repo but not in {MANIFEST}")
    shards = sorted(p.name for p in ctx.repo.glob("*.safetensors"))
    headers: dict[str, list[str]] = {}
    from safetensors import safe_open

    for s in shards:
        try:
            with safe_open(str(ctx.repo / s), "pt") as h:
                for k in h.keys():
                    headers.setdefault(k, []).append(s)
        except Exception as e:  # a corrupt header: safetensors' own error types
            problems.append(f"{s}: unreadable safetensors header ({str(e).splitlines()[0]})")
    dup = sorted(k for k, v in headers.items() if len(v) > 1)
    problems += [f"{k}: stored in {len(headers[k])} shards ({', '.join(headers[k])})" for k in dup[:5]]
    index_path = ctx.repo / "model.safetensors.index.json"
    n_indexed = 0
    if index_path.is_file():
        wm = json.loads(index_path.read_text()).get("weight_map", {})
        n_indexed = len(wm)
        for s in sorted(set(wm.values()) - set(shards)):
            problems.append(f"{s}: named in the index but missing")
        unindexed = sorted(set(headers) - set(wm))
        problems += [f"{k}: in {headers[k][0]} but not in the index" for k in unindexed[:5]]
        phantom = sorted(set(wm) - set(headers))
        problems += [f"{k}: in the index but in no shard" for k in phantom[:5]]
        misplaced = sorted(k for k in set(wm) & set(headers) if wm[k] not in headers[k])
        problems += [f"{k}: index says {wm[k]}, stored in {headers[k][0]}" for k in misplaced[:5]]
    elif len(shards) > 1:
        problems.append(f"{len(shards)} shards but no model.safetensors.index.json")
    elif not shards:
        problems.append("no safetensors weights in the repo")
    numbers = {
        "files_hashed": len(outputs),
        "shards": len(shards),
        "tensors": len(headers),
        "indexed": n_indexed,
        "publication_files": published,
        "data_pass": ctx.data_pass.describe(),
    }
    summary = (
        f"{len(outputs)} files hashed, {len(shards)} shard(s), {len(headers)} tensors, index entries "
        f"{n_indexed or 'n/a (single file)'}"
    )
    if audit and not problems:
        return Check(
            "files",
            NA,
            f"not applicable: no {MANIFEST}, so no recorded hashes to compare the files with "
            f"(the shard layout was checked: {len(shards)} shard(s), {len(headers)} tensors, each once)",
            numbers,
        )
    return Check(
        "files",
        FAIL if problems else PASS,
        summary if not problems else f"{len(problems)} problem(s); {summary}",
        numbers,
        problems,
    )


# ------------------------------------------------------------------------------------------------------------
def check_mapping(ctx: Context) -> Check:
    """Every original tensor is present exactly once under its canonical name and bit-identical (after the
    recorded dtype cast); the resized matrices' original rows too; no extra tensors."""
    orig, conv = ctx.original_tensors, ctx.converted_tensors
    out_dtype = (ctx.manifest or {}).get("settings", {}).get("output_dtype")
    problems, identical, expected_names = [], 0, set()
    dropped = 0
    for key in orig.keys():
        name = canonical(key)
        if name is None:
            dropped += 1
            continue
        if name.startswith("?"):
            problems.append(f"{key}: not an original ViP-LLaVA key")
            continue
        expected_names.add(name)
        if name not in conv.where:
            problems.append(f"{key}: missing from the repo (expected as {name})")
            continue
        if len(conv.where[name]) > 1:
            problems.append(f"{name}: stored {len(conv.where[name])} times")
        (_, a_shape), (b_dtype, b_shape) = orig.meta(key), conv.meta(name)
        if out_dtype and str(b_dtype).removeprefix("torch.") != out_dtype and b_dtype.is_floating_point:
            problems.append(f"{name}: stored as {b_dtype}, manifest says {out_dtype}")
        if name in (EMBED, HEAD):
            if b_shape[1:] != a_shape[1:] or b_shape[0] < a_shape[0]:
                problems.append(f"{name}: shape {b_shape} cannot hold the original {a_shape}")
                continue
            b_shape = a_shape
        if a_shape != b_shape:
            problems.append(f"{name}: shape {b_shape}, original {key} has {a_shape}")
        elif not _original_equal(ctx, key, name):
            problems.append(f"{name}: values differ from {key} (max abs diff {_max_abs_diff(ctx, key, name):.3g})")
        else:
            identical += 1
    problems += ctx.data_pass.problems
    extra = sorted(set(conv.keys()) - expected_names)
    problems += [f"{k}: extra tensor with no original counterpart" for k in extra[:10]]
    numbers = {
        "original_tensors": len(orig.keys()),
        "dropped_buffers": dropped,
        "bit_identical": identical,
        "extra": len(extra),
        "output_dtype": out_dtype,
    }
    summary = (
        f"{identical}/{len(expected_names)} tensors bit-identical{f' (as {out_dtype})' if out_dtype else ''}, "
        f"{dropped} legacy buffers dropped, {len(extra)} extra"
    )
    return Check("mapping", FAIL if problems else PASS, summary, numbers, problems)


# ------------------------------------------------------------------------------------------------------------
def _special_id_problems(ctx: Context, tok: Any, gen: dict) -> tuple[list[str], dict[str, Any]]:
    """Tokenizer, config, text config and generation config agree on the pad, bos and eos ids; pad is T + 1.
    Returns the problems and the pad ids found."""
    problems = []
    lay = ctx.layout
    pads = {
        "tokenizer.pad_token_id": tok.pad_token_id,
        "config.pad_token_id": ctx.config_dict.get("pad_token_id"),
        "text_config.pad_token_id": ctx.config_dict.get("text_config", {}).get("pad_token_id"),
        "generation_config.pad_token_id": gen.get("pad_token_id"),
    }
    if len({v for v in pads.values()}) != 1:
        problems.append("pad ids disagree: " + ", ".join(f"{k}={v}" for k, v in pads.items()))
    elif tok.pad_token_id != lay["pad"]:
        problems.append(f"pad id is {tok.pad_token_id}, expected T + 1 = {lay['pad']}")
    bos = {
        "tokenizer": tok.bos_token_id,
        "generation_config": gen.get("bos_token_id"),
        "text_config": ctx.config_dict.get("text_config", {}).get("bos_token_id"),
    }
    norm = {k: (v[0] if isinstance(v, list) and len(v) == 1 else v) for k, v in bos.items()}
    if len({json.dumps(v) for v in norm.values()}) != 1:
        problems.append("bos ids disagree: " + ", ".join(f"{k}={v}" for k, v in bos.items()))
    # eos: generation_config may list several stop ids; the tokenizer's and the text config's must be among them
    gen_eos = id_set(gen.get("eos_token_id"))
    text_eos = id_set(ctx.config_dict.get("text_config", {}).get("eos_token_id"))
    if tok.eos_token_id is None or tok.eos_token_id not in gen_eos:
        problems.append(
            f"eos ids disagree: tokenizer eos {tok.eos_token_id} is not in generation_config eos_token_id "
            f"{gen.get('eos_token_id')}"
        )
    if not text_eos or not text_eos <= gen_eos:
        problems.append(
            f"eos ids disagree: text_config eos_token_id {sorted(text_eos)} not within generation_config eos_token_id "
            f"{gen.get('eos_token_id')}"
        )
    return problems, pads


def check_strict_load(ctx: Context) -> Check:
    """``from_pretrained`` reports 0 missing / unexpected / mismatched keys; the token layout is the contract's
    (T = len(base tokenizer), V = original rows: ``<image>`` = T, pad = T + 1, rows = max(V, ceil((T+2)/64)*64));
    config, tokenizer and generation config agree on the special ids; the generation config suppresses exactly the ids
    in [T, rows) (the original could never emit them); the backbone the converter recorded is the one the reference
    detects."""
    problems = []
    try:
        model, info = ctx.loaded
    except Exception as e:  # any load error is the finding
        return Check(
            "strict_load", FAIL, f"from_pretrained raised {e.__class__.__name__}: {str(e).splitlines()[0][:200]}"
        )
    counts = {k: len(info.get(k, [])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    for k, n in counts.items():
        if n:
            problems.append(f"{k}: {n} ({', '.join(sorted(map(str, info[k]))[:3])})")
    if ctx.recorded_backbone is not None and ctx.recorded_backbone != ctx.backbone:
        problems.append(f"backbone: {MANIFEST} records {ctx.recorded_backbone!r}, the original is {ctx.backbone!r}")
    lay = ctx.layout
    T, V = lay["base_tokens"], lay["original_rows"]
    cfg = model.config
    tok = ctx.tokenizer
    gen = ctx.generation_config
    image_tok = tok.convert_tokens_to_ids("<image>")
    if image_tok != cfg.image_token_index:
        problems.append(f"tokenizer maps <image> to {image_tok}, config image_token_index is {cfg.image_token_index}")
    if cfg.image_token_index != lay["image"]:
        problems.append(
            f"config image_token_index is {cfg.image_token_index}, expected T = {lay['image']} (the base tokenizer's "
            f"{T} tokens come first)"
        )
    found, pads = _special_id_problems(ctx, tok, gen)
    problems += found
    rows = model.get_input_embeddings().weight.shape[0]
    if rows != cfg.text_config.vocab_size:
        problems.append(f"embedding rows {rows} != text_config.vocab_size {cfg.text_config.vocab_size}")
    if rows != lay["rows"]:
        problems.append(f"embedding rows {rows}, expected max(V={V}, ceil((T+2)/64)*64) = {lay['rows']} for T = {T}")
    if rows < len(tok):
        problems.append(f"embedding rows {rows} < len(tokenizer) {len(tok)}")
    # The original resized its embeddings to len(tokenizer) at load (builder.py): it could never emit an id >= T.
    suppress = gen.get("suppress_tokens")
    want_suppressed = set(range(T, lay["rows"]))
    if not isinstance(suppress, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in suppress):
        problems.append(
            f"generation_config suppress_tokens is {suppress!r}; expected every id in [T={T}, rows={lay['rows']}) "
            "(the original could never emit them: it resized its embeddings to len(tokenizer))"
        )
    else:
        lacking, extra = sorted(want_suppressed - set(suppress)), sorted(set(suppress) - want_suppressed)
        if lacking:
            problems.append(
                f"generation_config suppress_tokens lacks {len(lacking)} id(s) in [T={T}, rows={lay['rows']}) "
                f"(first {lacking[:5]}): generate can emit ids the original never could"
            )
        if extra:
            problems.append(
                f"generation_config suppress_tokens holds {len(extra)} id(s) outside [T={T}, rows={lay['rows']}) "
                f"(first {extra[:5]}): the original could emit those"
            )
    numbers = {
        **counts,
        "backbone": ctx.backbone,
        "recorded_backbone": ctx.recorded_backbone,
        "base_tokens": T,
        "original_rows": V,
        "expected": lay,
        "image_token_index": cfg.image_token_index,
        "tokenizer_image_id": image_tok,
        "pad": pads,
        "rows": rows,
        "len_tokenizer": len(tok),
        "suppress_tokens": len(suppress) if isinstance(suppress, list) else None,
    }
    summary = (
        f"missing {counts['missing_keys']}, unexpected {counts['unexpected_keys']}, mismatched "
        f"{counts['mismatched_keys']}; "
        f"{ctx.backbone}: T={T}, V={V} -> <image>={image_tok} (want {lay['image']}), pad={tok.pad_token_id} (want "
        f"{lay['pad']}), "
        f"rows {rows} (want {lay['rows']}) >= len(tokenizer) {len(tok)}; "
        f"suppressed {len(suppress) if isinstance(suppress, list) else 'none'} (want [{T}, {lay['rows']}))"
    )
    return Check("strict_load", FAIL if problems else PASS, summary, numbers, problems)


# ------------------------------------------------------------------------------------------------------------
def _chi2_upper(k: int, p: float) -> float:
    """Upper p-quantile of chi-square with k dof (Wilson-Hilferty; exact via the normal for k == 1)."""
    z = NormalDist().inv_cdf(1 - p)
    if k == 1:
        z = NormalDist().inv_cdf(1 - p / 2)
        return z * z
    a = 2 / (9 * k)
    return k * (1 - a + z * math.sqrt(a)) ** 3


def _chi2_lower(k: int, p: float) -> float:
    z = NormalDist().inv_cdf(p)
    a = 2 / (9 * k)
    return max(0.0, k * (1 - a + z * math.sqrt(a)) ** 3)


def resize_bounds(added: int) -> dict:
    """Bounds on d = ||row - mu||^2 / (1e-5 tr Sigma) for ``added`` new rows of one matrix.

    d = sum_j w_j chi2_1 with w_j >= 0, sum w_j = 1 (w = eigenvalues of Sigma / tr Sigma): mean 1 whatever Sigma
    is. Its tails are widest when one eigenvalue dominates (d ~ chi2_1), so bounds from chi2_1 hold for every
    Sigma: each row's d below the chi2_1 quantile at FAMILY_FALSE_ALARM / added, and the mean of the rows'
    d (then chi2_k / k at worst) between the chi2_k quantiles at FAMILY_FALSE_ALARM.
    """
    p = FAMILY_FALSE_ALARM
    return {
        "row_max": _chi2_upper(1, p / max(added, 1)),
        "mean_low": _chi2_lower(added, p) / added if added > 1 else 0.0,
        "mean_high": _chi2_upper(added, p) / added if added > 1 else _chi2_upper(1, p),
    }


def check_resize(ctx: Context) -> Check:
    """Rows as the contract says (max(V, ceil((T+2)/64)*64)); the original rows [0, V) bit-identical; new rows
    [V, rows) near the mean (chi-square bounds stated), an empty new range passing as such; probability mass on the
    added tokens reported, WARN when above an average original token's."""
    problems, warnings = [], []
    conv = ctx.converted_tensors
    data = ctx.data_pass
    stats = data.stats
    if stats is None:  # the pass did not stream the original embedding (nothing to compare it with): read it
        from .datapass import EmbeddingStats

        E_orig = ctx.original_tensors.get(ORIGINAL_EMBED)
        stats = EmbeddingStats(hidden=E_orig.shape[-1])
        stats.add(E_orig.reshape(-1))
    n, h = ctx.original_tensors.meta(ORIGINAL_EMBED)[1]
    mu = stats.mean
    trace = stats.trace  # tr(Sigma) with the population covariance
    want_rows = ctx.layout["rows"]
    numbers: dict = {
        "original_rows": n,
        "hidden": h,
        "trace_sigma": trace,
        "expected_rows": want_rows,
        "base_tokens": ctx.layout["base_tokens"],
    }
    originals = {EMBED: ORIGINAL_EMBED, HEAD: ORIGINAL_HEAD}
    added_total = 0
    for name in (EMBED, HEAD):
        if name not in conv.where:
            problems.append(f"{name}: missing")
            continue
        _, shape = conv.meta(name)
        rows = shape[0]
        short = "embed_tokens" if name == EMBED else "lm_head"
        numbers[f"{short}_rows"] = rows
        if rows != want_rows:
            problems.append(
                f"{short}: {rows} rows, expected {want_rows} = max(V={n}, ceil((T+2)/64)*64) for "
                f"T={ctx.layout['base_tokens']}"
            )
        if rows < n:
            continue
        key = originals[name]
        if shape[1:] != ctx.original_tensors.meta(key)[1][1:] or not _original_equal(ctx, key, name):
            problems.append(f"{short}: original rows [0, {n}) are not bit-identical to the original")
        added = rows - n
        added_total = max(added_total, added)
        if added == 0:
            numbers[short] = {"added": 0}
            continue
        new = data.new_rows[name] if name in data.new_rows else conv.get(name)[n:]
        new = new.to(torch.float64)
        d = ((new - mu) ** 2).sum(1) / (RESIZE_SCALE * trace)
        b = resize_bounds(added)
        numbers[short] = {"added": added, "d_mean": d.mean().item(), "d_max": d.max().item(), **b}
        if d.max().item() > b["row_max"]:
            problems.append(f"{short}: a new row lies at d={d.max().item():.3g} (bound {b['row_max']:.3g})")
        if not b["mean_low"] <= d.mean().item() <= b["mean_high"]:
            problems.append(
                f"{short}: mean d={d.mean().item():.3g} outside [{b['mean_low']:.3g}, {b['mean_high']:.3g}]"
            )
    # probability mass on the added tokens (the lm_head rows come from the EMBEDDING statistics)
    masses = []
    if added_total:
        for logits in ctx.converted_logits:
            p = torch.softmax(logits.double(), -1)
            masses.append(p[:, n:].sum(-1))
    if masses:
        per_pos = torch.cat(masses)
        rows_total = ctx.converted_logits[0].shape[-1]
        added = rows_total - n
        per_added_token = per_pos.mean().item() / added
        average_original = (1 - per_pos.mean().item()) / n
        numbers["added_mass_mean"] = per_pos.mean().item()
        numbers["added_mass_max"] = per_pos.max().item()
        numbers["mass_per_added_token"] = per_added_token
        numbers["mass_per_original_token"] = average_original
        if per_added_token > average_original:
            warnings.append(
                f"the added tokens get {per_added_token:.3g} probability each on average, more than an average "
                f"original token ({average_original:.3g})"
            )
    e = numbers.get("embed_tokens", {})
    hd = numbers.get("lm_head", {})
    if not added_total and not problems:
        summary = (
            f"rows {numbers.get('embed_tokens_rows')} = V: no new rows (the original's {n} rows already hold "
            f"<image> {ctx.layout['image']} and <pad> {ctx.layout['pad']}); original rows bit-identical"
        )
    else:
        summary = (
            f"rows {numbers.get('embed_tokens_rows')} (want {want_rows}), original {n} rows "
            f"{'NOT ' if any('bit-identical' in q for q in problems) else ''}bit-identical, "
            f"d_max {e.get('d_max', float('nan')):.3g}/{hd.get('d_max', float('nan')):.3g} "
            f"<= {e.get('row_max', float('nan')):.3g}, d_mean "
            f"{e.get('d_mean', float('nan')):.3g}/{hd.get('d_mean', float('nan')):.3g} "
            f"in [{e.get('mean_low', float('nan')):.3g}, {e.get('mean_high', float('nan')):.3g}] "
            f"(p_false={FAMILY_FALSE_ALARM:g}); "
            f"mass on added {numbers.get('added_mass_mean', float('nan')):.3g}"
        )
    status = FAIL if problems else (WARN if warnings else PASS)
    return Check("resize", status, summary, numbers, problems + warnings)


# ------------------------------------------------------------------------------------------------------------
def check_processor(ctx: Context) -> Check:
    """input_ids from the converted processor equal the original tokenization with each sentinel expanded;
    pixel_values equal the original preprocessing."""
    problems = []
    proc = ctx.processor
    n_ids = 0
    for x, p in zip(ctx.parity_inputs, ctx.prompts, strict=False):
        kw = {"images": x["images"]} if x["images"] else {}
        got = proc(text=p["prompt"], return_tensors="pt", **kw)["input_ids"][0].tolist()
        n_ids += 1
        if got != x["expanded"]:
            i = first_difference_index(got, x["expanded"])
            problems.append(
                f"prompt {x['name']}: ids differ at position {i} (converted {got[i : i + 4]}, original "
                f"{x['expanded'][i : i + 4]}; lengths {len(got)} vs {len(x['expanded'])})"
            )
    worst = 0.0
    for name, img in sorted(ctx.images.items()):
        ref = ctx.reference.preprocess(img)
        got = proc.image_processor(images=img, return_tensors="pt")["pixel_values"][0]
        if got.shape != ref.shape:
            problems.append(f"image {name}: pixel_values shape {tuple(got.shape)}, original {tuple(ref.shape)}")
            continue
        diff = (got.float() - ref.float()).abs().max().item()
        worst = max(worst, diff)
        if diff > PIXEL_TOL:
            problems.append(
                f"image {name} ({img.size[0]}x{img.size[1]}): pixel_values differ by up to {diff:.3g} (tol "
                f"{PIXEL_TOL:g})"
            )
    numbers = {"prompts": n_ids, "images": len(ctx.images), "pixel_max_abs_diff": worst, "pixel_tol": PIXEL_TOL}
    summary = f"{n_ids} prompts' ids, {len(ctx.images)} images; pixel max |diff| {worst:.3g} (tol {PIXEL_TOL:g})"
    return Check("processor", FAIL if problems else PASS, summary, numbers, problems)


# ------------------------------------------------------------------------------------------------------------
def check_tokenizer_era(ctx: Context) -> Check:
    """Informational, never FAIL: the reference tokenizes as the original code's pin (transformers 4.37.2) does; the
    Vicuna 7B/13B checkpoints were released while the original pinned 4.31.0, whose slow LlamaTokenizer differs in
    non-legacy mode after a special token (and strips around plain-string special tokens). On the verified prompts:
    how many the other era tokenizes differently, and where first. WARN when any differ; PASS when none do or when the
    original ran the fast tokenizer (one tokenization in every era)."""
    from .original import DEFAULT_TOKENIZER_ERA

    others = ctx.era_tokenizers
    if not others:
        return Check(
            "tokenizer_era",
            NA,
            f"not applicable: the original {ctx.backbone} loaded the fast tokenizer "
            f"(use_fast=True), one tokenization in every era",
            {"applicable": False},
        )
    base = ctx.base_tokenizer
    numbers: dict = {
        "applicable": True,
        "reference_era": DEFAULT_TOKENIZER_ERA,
        "legacy": getattr(base, "legacy", None),
        "prompts": len(ctx.prompts),
    }
    details, parts = [], []
    for era, tok in others.items():
        differ = []
        for p in ctx.prompts:
            a, b = base.encode_with_images(p["prompt"]), tok.encode_with_images(p["prompt"])
            if a != b:
                i = first_difference_index(a, b)
                differ.append((p["name"], i, b[i : i + 4], a[i : i + 4]))
        numbers[era] = {"differ": len(differ), "first": list(differ[0]) if differ else None}
        if differ:
            name, i, old, new = differ[0]
            parts.append(
                f"{era}-era tokenization differs on {len(differ)} of {len(ctx.prompts)} prompts, first at "
                f"{name} position {i} ({era} {old} vs {DEFAULT_TOKENIZER_ERA} {new})"
            )
            details += [
                f"{era}: prompt {n} differs from position {k} ({era} {o} vs {DEFAULT_TOKENIZER_ERA} {w})"
                for n, k, o, w in differ
            ]
        else:
            parts.append(f"{era}-era tokenization identical on {len(ctx.prompts)} of {len(ctx.prompts)} prompts")
    summary = (
        "; ".join(parts)
        + f" (verified against {DEFAULT_TOKENIZER_ERA}, the original code's pin; legacy={numbers['legacy']})"
    )
    warned = any(numbers[era]["differ"] for era in others)
    return Check("tokenizer_era", WARN if warned else PASS, summary, numbers, details)


# ------------------------------------------------------------------------------------------------------------
IMAGE_PREFIX = "<image>\n"


def hf_messages(turns: list[dict]) -> tuple[list[dict], bool]:
    """Turns as transformers' chat messages, and whether the last (open assistant) turn is the generation prompt.

    A user text starting with ``"<image>\\n"`` becomes ``[{"type": "image"}, {"type": "text", "text": rest}]``; any
    other turn ``[{"type": "text", "text": text}]``. Only the final assistant turn may be open (text None)."""
    messages, generation_prompt = [], False
    for i, t in enumerate(turns):
        role, text = t["role"], t["text"]
        if text is None:
            if i == len(turns) - 1 and role == "assistant":
                generation_prompt = True
                continue
            raise ValueError(f"turn {i} ({role}) is open; only the final assistant turn can be (the generation prompt)")
        if role == "user" and text.startswith(IMAGE_PREFIX):
            content = [{"type": "image"}, {"type": "text", "text": text[len(IMAGE_PREFIX) :]}]
        else:
            content = [{"type": "text", "text": text}]
        messages.append({"role": role, "content": content})
    return messages, generation_prompt


def first_difference(got: str, want: str, context: int = 24) -> str:
    """Where two strings first differ, with repr() context on both sides."""
    i = first_difference_index(got, want)
    lo = max(0, i - context)
    return (
        f"first difference at char {i} (lengths {len(got)} vs {len(want)}): converted {got[lo : i + context]!r} "
        f"vs original {want[lo : i + context]!r}"
    )


def check_chat_template(ctx: Context) -> Check:
    """For every sample conversation, the converted repo's chat template (processor's and tokenizer's
    ``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``) gives the original prompt string
    (``conversation.py`` in the backbone's mode) byte for byte."""
    source, convs = ctx.conversations
    problems, matched, compared = [], 0, 0
    makers = (("processor", ctx.processor), ("tokenizer", ctx.tokenizer))
    for p in convs:
        try:
            messages, gen_prompt = hf_messages(p["turns"])
        except ValueError as e:
            problems.append(f"conversation {p['name']}: cannot be stated as chat messages ({e})")
            continue
        for who, obj in makers:
            compared += 1
            try:
                got = obj.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=False)
            except Exception as e:  # no template, a template error: transformers' and jinja's own types
                problems.append(
                    f"conversation {p['name']}: {who}.apply_chat_template raised {e.__class__.__name__}: "
                    f"{str(e).splitlines()[0][:200] if str(e) else ''}"
                )
                continue
            if isinstance(got, list) and len(got) == 1:
                got = got[0]
            if got == p["prompt"]:
                matched += 1
            else:
                problems.append(f"conversation {p['name']} ({who}): {first_difference(str(got), p['prompt'])}")
    numbers = {
        "source": source,
        "conversations": len(convs),
        "compared": compared,
        "identical": matched,
        "conv_mode": ctx.conv_mode,
    }
    where = "of the verified prompts" if source == "prompts" else "bundled (the prompts give no turns)"
    summary = (
        f"{matched}/{compared} renderings identical to the original {ctx.conv_mode} prompt ({len(convs)} conversations "
        f"{where} x processor, tokenizer)"
    )
    if not convs:
        problems.append("no conversations to compare")
    return Check("chat_template", FAIL if problems else PASS, summary, numbers, problems)


# ------------------------------------------------------------------------------------------------------------
def _module_map(model) -> dict[str, torch.nn.Module]:
    """Trace name -> module of the converted model, across transformers' module layouts."""
    pats = (
        (re.compile(r"vision_tower\.(?:vision_model\.)?pre_layrnorm$"), lambda m: "vision.embeddings"),
        (
            re.compile(r"vision_tower\.(?:vision_model\.)?encoder\.layers\.(\d+)$"),
            lambda m: f"vision.layer.{m.group(1)}",
        ),
        (re.compile(r"multi_modal_projector$"), lambda m: "projector"),
        (re.compile(r"language_model\.(?:model\.)?layers\.(\d+)$"), lambda m: f"decoder.layer.{m.group(1)}"),
        (re.compile(r"language_model\.(?:model\.)?norm$"), lambda m: "decoder.norm"),
    )
    out = {}
    for name, mod in model.named_modules():
        for pat, label in pats:
            m = pat.search(name)
            if m:
                out[label(m)] = mod
    return out


def _trace_order(names) -> list[str]:
    def key(n: str):
        parts = n.split(".")
        stage = {"vision": 0, "projector": 1, "decoder": 2, "logits": 3}[parts[0]]
        sub = (
            0
            if parts[-1] == "embeddings"
            else (10**6 if parts[-1] == "norm" else int(parts[-1]) + 1 if parts[-1].isdigit() else 0)
        )
        return (stage, sub)

    return sorted(names, key=key)


def first_divergence(ctx: Context, index: int, tol: float) -> tuple[str, float] | None:
    """Run both models with capture on prompt ``index``; the first module (in forward order) whose output differs."""
    x = ctx.parity_inputs[index]
    with ctx.arithmetic_context(ctx.reference.llm, ctx.reference.vision):
        ref = ctx.reference.forward(x["ids"], x["images"] or None, capture=True)
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for label, mod in _module_map(ctx.model).items():

        def hook(_m, _i, out, label=label):
            t = out[0] if isinstance(out, tuple) else out
            t = getattr(t, "last_hidden_state", t)
            captured[label] = t.detach().float()

        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad(), ctx.arithmetic_context(ctx.model):
            kw = {"pixel_values": x["pixels"]} if x["pixels"] is not None else {}
            captured["logits"] = (
                ctx.model(input_ids=torch.tensor([x["expanded"]]), **kw).logits[0, :, : ctx.original_vocab].float()
            )
    finally:
        for hk in hooks:
            hk.remove()
    for name in _trace_order(set(ref.trace) & set(captured)):
        a, b = ref.trace[name].float().squeeze(), captured[name].squeeze()
        if a.shape != b.shape:
            return name, float("inf")
        scale = max(1.0, a.abs().max().item())
        diff = (a - b).abs().max().item()
        if diff > tol * scale:
            return name, diff
    return None


def check_logits(ctx: Context) -> Check:
    """Max |logits diff| over the original vocabulary on every sample prompt within the dtype's tolerance, and
    100% top-1 agreement at every position whose reference top-2 margin exceeds twice the tolerance (a position
    with a smaller margin is counted as a tie, where both top-1 choices are correct within the tolerance)."""
    tol = LOGITS_TOL[ctx.dtype_name]
    V = ctx.original_vocab
    problems, worst, agree, decided, ties = [], 0.0, 0, 0, 0
    first_bad = None
    for i, (x, ref, got) in enumerate(
        zip(ctx.parity_inputs, ctx.reference_outputs, ctx.converted_logits, strict=False)
    ):
        a, b = ref.logits.float(), got[:, :V]
        if a.shape != b.shape:
            problems.append(f"prompt {x['name']}: logits shape {tuple(b.shape)} vs original {tuple(a.shape)}")
            first_bad = first_bad if first_bad is not None else i
            continue
        diff = (a - b).abs().max().item()
        worst = max(worst, diff)
        top2 = a.topk(2, -1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * tol
        same = a.argmax(-1) == b.argmax(-1)
        decided += int(clear.sum())
        agree += int((same & clear).sum())
        ties += int((~clear).sum())
        if diff > tol or not bool(same[clear].all()):
            problems.append(
                f"prompt {x['name']}: max |diff| {diff:.3g} (tol {tol:g}), top-1 agree "
                f"{int((same & clear).sum())}/{int(clear.sum())}"
            )
            first_bad = first_bad if first_bad is not None else i
    if first_bad is not None:
        where = first_divergence(ctx, first_bad, tol)
        if where:
            problems.insert(
                0,
                f"first divergence: {where[0]} (max |diff| {where[1]:.3g}) on prompt "
                f"{ctx.parity_inputs[first_bad]['name']}",
            )
    others = ", ".join(f"{k} {v:g}" for k, v in LOGITS_TOL.items() if k != ctx.dtype_name)
    numbers = {
        "max_abs_diff": worst,
        "tolerance": tol,
        "dtype": ctx.dtype_name,
        "dtype_source": ctx.dtype_source,
        "tolerance_per_dtype": dict(LOGITS_TOL),
        "top1_agree": agree,
        "top1_decided": decided,
        "near_ties": ties,
        "prompts": len(ctx.prompts),
        "seconds": _phase_seconds(ctx, "load", "forward"),
    }
    summary = (
        f"max |diff| {worst:.3g} <= {tol:g} ({ctx.dtype_name}; {others}) over {len(ctx.prompts)} prompts; "
        f"top-1 {agree}/{decided} ({ties} near-ties excluded)"
    )
    if problems:
        summary = f"max |diff| {worst:.3g} (tol {tol:g}, {ctx.dtype_name}); top-1 {agree}/{decided}"
    return Check("logits", FAIL if problems else PASS, summary, numbers, problems)


def _phase_seconds(ctx: Context, *phases: str) -> dict[str, float]:
    """The model runs' seconds per side and phase (``ctx.timings``), e.g. reference_forward, converted_decode."""
    return {k: round(v, 3) for k, v in sorted(ctx.timings.items()) if k.split("_", 1)[1] in phases}


# ------------------------------------------------------------------------------------------------------------
def check_generation(ctx: Context) -> Check:
    """The converted generation_config stops on every token the original eval stopped on (its terminators), and
    greedy generation of N tokens is identical. Nothing is masked: the converted model generates through the repo's
    own ``generation_config.json`` (which must keep it off the ids the original could never emit, e.g. with
    ``suppress_tokens``); the reference emits what the original could (ids below len(tokenizer))."""
    problems, total = [], 0
    n = ctx.max_new_tokens
    gen = ctx.generation_config
    gen_eos = id_set(gen.get("eos_token_id"))
    terminators = ctx.terminators
    T = ctx.layout["base_tokens"]
    for token, tid in terminators.items():
        if tid not in gen_eos:
            problems.append(
                f"generation_config eos_token_id {gen.get('eos_token_id')} lacks the original terminator {token} "
                f"({tid})"
            )
    if n <= 0:
        return Check("generation", FAIL, f"--max-new-tokens {n}: no tokens to compare", {"max_new_tokens": n}, problems)
    emitted_beyond = set()
    for x, ref, got in zip(ctx.parity_inputs, ctx.reference_generations, ctx.converted_generations, strict=False):
        total += len(ref)
        if got != list(ref):
            beyond = sorted({t for t in got if t >= T})
            emitted_beyond.update(beyond)
            note = (
                (
                    f"; ids {beyond} are >= len(base tokenizer) {T}, which the original could never emit "
                    f"(generation_config.json suppress_tokens should hold them)"
                )
                if beyond
                else ""
            )
            problems.append(f"prompt {x['name']}: converted {got} vs original {list(ref)}{note}")
    stops = ", ".join(f"{t} {i}" for t, i in terminators.items())
    n_bad = sum(1 for q in problems if q.startswith("prompt "))
    suppressed = id_set(gen.get("suppress_tokens"))
    numbers = {
        "prompts": len(ctx.parity_inputs),
        "max_new_tokens": n,
        "tokens_compared": total,
        "terminators": terminators,
        "generation_config_eos": sorted(gen_eos),
        "base_tokens": T,
        "suppress_tokens": len(suppressed),
        "emitted_beyond_base": sorted(emitted_beyond),
        "seconds": _phase_seconds(ctx, "decode"),
    }
    summary = (
        f"{len(ctx.parity_inputs) - n_bad}/{len(ctx.parity_inputs)} prompts identical over {n} greedy tokens ({total} "
        "tokens), "
        f"unmasked, through generation_config.json ({len(suppressed)} ids suppressed); "
        f"stops on the original's [{stops}]: {'yes' if all(i in gen_eos for i in terminators.values()) else 'NO'}"
    )
    return Check("generation", FAIL if problems else PASS, summary, numbers, problems)


ALL_CHECKS = (
    ("files", check_files),
    ("mapping", check_mapping),
    ("strict_load", check_strict_load),
    ("resize", check_resize),
    ("processor", check_processor),
    ("tokenizer_era", check_tokenizer_era),
    ("chat_template", check_chat_template),
    ("logits", check_logits),
    ("generation", check_generation),
)
