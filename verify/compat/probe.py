"""The probe ``python -m verify.compat`` runs INSIDE each transformers version's virtual environment.

Standalone on purpose: it imports only the standard library, numpy, torch, PIL and transformers (whatever
version the interpreter running it has), never this project, so it runs under transformers 4.x as well as 5.x.

    ENV/bin/python -I verify/compat/probe.py JOB.json

JOB.json: ``{"repo", "prompts": [{"name", "prompt", "image"}], "images": {name: png path},
"token_probes": [str], "chat_probes": [[message, ...]], "inputs": NPZ or null, "out": DIR,
"collapse_image_tokens": bool, "new_tokens": int, "image_token_id": int, "image_seq_length": int}``.

It loads the repo as a user would (``from_pretrained(output_loading_info=True)`` in float32, ``AutoTokenizer``,
``AutoProcessor``), records what this version actually read (config, generation config, tokenizer, processor and
image-processor settings), runs its own processor on the prompts and images, and runs the model on the inputs in
``inputs`` (the reference environment's processor output; its own when null): logits and ``new_tokens`` greedy
tokens. With ``collapse_image_tokens`` (releases whose model expands one ``<image>`` itself, 4.37-4.47) each run of
image tokens in those inputs becomes one token; the model's output has the same length either way.

It also runs the RECIPE for releases without a pad-to-square processor (:func:`recipe_inputs`): pad the image to a
square with the mean colour, ``CLIPImageProcessor``, and the prompt with one ``<image>`` per image (collapsed) or
``image_seq_length`` of them, tokenized by ``AutoTokenizer``; and the model on the recipe's inputs.
The model is loaded a second time with the release's default attention (no ``attn_implementation``) to see
whether that release needs ``attn_implementation="eager"``.

Every step is guarded (:meth:`Run.step`): a failing step records its error and the others still run. The steps
that call transformers in release-dependent ways are left unannotated on purpose: a type checker would hold them to
the installed release's signatures, while they run on every release from 4.37 to 5.x. Writes ``DIR/result.json`` and
``DIR/tensors.npz`` (``own_ids_<i>``, ``own_pixels_<i>``, ``logits_<i>``, ``greedy_<i>``, ``recipe_ids_<i>``,
``recipe_pixels_<i>``, ``recipe_logits_<i>``).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings


def _err(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:500]


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def _jsonable(v):
    """Settings as plain JSON: size objects as dicts without None, enums as ints, tuples as lists."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v)
    if hasattr(v, "value") and isinstance(v.value, int):  # PILImageResampling and friends
        return int(v.value)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items() if x is not None}
    if hasattr(v, "__dataclass_fields__"):  # SizeDict in 5.x
        return {k: _jsonable(getattr(v, k)) for k in v.__dataclass_fields__ if getattr(v, k) is not None}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    try:
        import torch

        if isinstance(v, torch.dtype):
            return str(v).replace("torch.", "")
    except ImportError:  # pragma: no cover
        pass
    return repr(v)


def _keys(v) -> list[str]:
    out = []
    for k in v or []:
        out.append(k if isinstance(k, str) else " ".join(str(x) for x in k) if isinstance(k, (tuple, list)) else str(k))
    return sorted(out)


def _model_settings(model) -> dict:
    c = model.config
    tc = getattr(c, "text_config", None)
    vc = getattr(c, "vision_config", None)
    rope = getattr(tc, "rope_theta", None)
    if rope is None:
        rope = (getattr(tc, "rope_parameters", None) or {}).get("rope_theta")
    gc = getattr(model, "generation_config", None)
    return {
        "config.vision_feature_layers": _jsonable(getattr(c, "vision_feature_layers", None)),
        "config.image_seq_length": _jsonable(getattr(c, "image_seq_length", None)),
        "config.image_token_index": _jsonable(getattr(c, "image_token_index", getattr(c, "image_token_id", None))),
        "config.pad_token_id": _jsonable(getattr(c, "pad_token_id", None)),
        "config.projector_hidden_act": _jsonable(getattr(c, "projector_hidden_act", None)),
        "config.projector_layernorm_eps": _jsonable(getattr(c, "projector_layernorm_eps", None)),
        "text_config.pad_token_id": _jsonable(getattr(tc, "pad_token_id", None)),
        "text_config.vocab_size": _jsonable(getattr(tc, "vocab_size", None)),
        "text_config.rms_norm_eps": _jsonable(getattr(tc, "rms_norm_eps", None)),
        "text_config.rope_theta": _jsonable(rope),
        "text_config.max_position_embeddings": _jsonable(getattr(tc, "max_position_embeddings", None)),
        "vision_config.image_size": _jsonable(getattr(vc, "image_size", None)),
        "vision_config.patch_size": _jsonable(getattr(vc, "patch_size", None)),
        "vision_config.hidden_act": _jsonable(getattr(vc, "hidden_act", None)),
        "generation_config.bos_token_id": _jsonable(getattr(gc, "bos_token_id", None)),
        "generation_config.eos_token_id": _jsonable(getattr(gc, "eos_token_id", None)),
        "generation_config.pad_token_id": _jsonable(getattr(gc, "pad_token_id", None)),
        "model.dtype": _jsonable(model.dtype),
    }


def _tokenizer_settings(tok) -> dict:
    return {
        "tokenizer.bos_token_id": tok.bos_token_id,
        "tokenizer.eos_token_id": tok.eos_token_id,
        "tokenizer.unk_token_id": tok.unk_token_id,
        "tokenizer.pad_token_id": tok.pad_token_id,
        "tokenizer.image_token_id": tok.convert_tokens_to_ids("<image>"),
        "tokenizer.len": len(tok),
        "tokenizer.padding_side": tok.padding_side,
        "tokenizer.model_max_length": _jsonable(tok.model_max_length),
    }


_IMAGE_PROCESSOR_KEYS = (
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
)


def _processor_settings(proc) -> dict:
    out = {
        f"processor.{k}": _jsonable(getattr(proc, k, "<absent>"))
        for k in ("patch_size", "num_additional_image_tokens", "vision_feature_select_strategy", "image_token")
    }
    ip = getattr(proc, "image_processor", None)
    for k in _IMAGE_PROCESSOR_KEYS:
        out[f"image_processor.{k}"] = _jsonable(getattr(ip, k, "<absent>"))
    return out


def _token_probe(tok, text: str) -> dict:
    ids = [int(i) for i in tok(text)["input_ids"]]
    return {
        "text": text,
        "ids": ids,
        "tokens": tok.convert_ids_to_tokens(ids),
        "decoded": tok.decode(ids, skip_special_tokens=True),
    }


def pad_to_square(image, mean):
    """The original's ``expand2square``: the image centred on a square canvas of the mean colour (0-255 ints)."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), tuple(int(c) for c in mean))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def recipe_inputs(repo, tokenizer, prompt: str, image, collapse: bool, image_seq_length: int):
    """The recipe for releases without a pad-to-square ``AutoProcessor`` (transformers < 4.49): ``(input_ids,
    pixel_values)`` as torch tensors (pixel_values None without an image).

    Pad to a square with the mean colour, then ``CLIPImageProcessor`` (resize, centre crop, normalise); one
    ``<image>`` per image where the model expands it (``collapse``: 4.37-4.47), else ``image_seq_length`` of them
    (4.48+)."""
    from transformers import CLIPImageProcessor

    pixel_values = None
    if image is not None:
        ip = CLIPImageProcessor.from_pretrained(repo)
        square = pad_to_square(image.convert("RGB"), [int(255 * m) for m in ip.image_mean])
        pixel_values = ip(square, return_tensors="pt")["pixel_values"]
    if not collapse:
        prompt = prompt.replace("<image>", "<image>" * image_seq_length)
    return tokenizer(prompt, return_tensors="pt")["input_ids"], pixel_values


def _collapse(ids, image_id):
    """Each run of ``image_id`` in the 1-D int array ``ids`` becomes one token."""
    import numpy as np

    keep = np.ones(len(ids), dtype=bool)
    keep[1:] = ~((ids[1:] == image_id) & (ids[:-1] == image_id))
    return ids[keep]


class Run:
    """What the steps share: the job, the result and tensors being written, the settings this release read, and
    the tokenizers loaded (by ``use_fast``)."""

    def __init__(self, job: dict):
        self.job = job
        self.repo = job["repo"]
        self.result: dict = {"steps": {}, "errors": {}}
        self.tensors: dict = {}
        self.settings: dict = {}
        self.tokenizers: dict = {}
        self.dtype_kw = "torch_dtype"
        self.collapse = bool(job.get("collapse_image_tokens"))
        self.image_id, self.seq = job.get("image_token_id"), job.get("image_seq_length")  # from the repo's config.json
        self.t0 = time.perf_counter()

    def step(self, name: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, timed; a failure is recorded (error and traceback) and gives None."""
        t0 = time.perf_counter()
        try:
            value = fn(*args, **kwargs)
            ok = True
        except Exception as e:  # every failure is data for the parent's table
            value = None
            ok = False
            self.result["errors"][name] = _err(e)
            self.result.setdefault("tracebacks", {})[name] = traceback.format_exc()[-4000:]
        self.result["steps"][name] = {"ok": ok, "seconds": round(time.perf_counter() - t0, 3)}
        return value

    def feed(self) -> dict:
        """The inputs the model runs on: the reference's processor output, or this release's own."""
        import numpy as np

        return dict(np.load(self.job["inputs"])) if self.job.get("inputs") else self.tensors


def start(run: Run) -> None:
    """One torch thread, quiet transformers, and the versions this environment runs."""
    import importlib.metadata as md

    import numpy as np
    import torch
    import transformers

    # One thread: the model is tiny, and on a busy machine torch's thread pool made every step 3-8x slower (measured).
    torch.set_num_threads(int(run.job.get("threads") or 1))
    try:
        transformers.logging.set_verbosity_error()
    except Exception:  # pragma: no cover - very old releases
        pass

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    run.result["versions"] = {
        "transformers": transformers.__version__,
        "transformers_path": os.path.dirname(transformers.__file__),
        "torch": torch.__version__,
        "tokenizers": version("tokenizers"),
        "huggingface_hub": version("huggingface_hub"),
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }
    # 4.56 renamed torch_dtype; 5.x deprecates the old name
    run.dtype_kw = "dtype" if _version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
    run.result["dtype_kwarg"] = run.dtype_kw


# --- model ---------------------------------------------------------------------------------------------------------
def load_model(run):
    """The model in float32 with eager attention, and what loading it reported and read."""
    import torch
    from transformers import VipLlavaForConditionalGeneration

    model, info = VipLlavaForConditionalGeneration.from_pretrained(
        run.repo, output_loading_info=True, attn_implementation="eager", **{run.dtype_kw: torch.float32}
    )
    model.eval()
    run.result["loading_info"] = {
        "missing_keys": _keys(info.get("missing_keys")),
        "unexpected_keys": _keys(info.get("unexpected_keys")),
        "mismatched_keys": _keys(info.get("mismatched_keys")),
        "error_msgs": [str(m)[:300] for m in info.get("error_msgs") or []],
    }
    run.settings.update(_model_settings(model))
    return model


def default_attention(run):
    """The release's default attention (no attn_implementation): does it load and run?"""
    import torch
    from transformers import VipLlavaForConditionalGeneration

    m = VipLlavaForConditionalGeneration.from_pretrained(run.repo, **{run.dtype_kw: torch.float32}).eval()
    with torch.no_grad():
        m(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 3, dtype=torch.long))
    return str(getattr(m.config, "_attn_implementation", None))


# --- tokenizer -----------------------------------------------------------------------------------------------------
def load_tokenizer(run: Run, **kw) -> dict:
    """``AutoTokenizer`` (with ``kw``): its class, settings, the probe strings and the chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run.repo, **kw)
    probes = [_token_probe(tok, t) for t in run.job["token_probes"]]
    chats = [
        tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
        for m in run.job.get("text_chat_probes", [])
    ]
    out = {"class": type(tok).__name__, "settings": _tokenizer_settings(tok), "probes": probes, "chat": chats}
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # what this tokenizers release kept of the BPE model's options
        model_json = json.loads(backend.to_str()).get("model") or {}
        out["bpe_options"] = {k: v for k, v in model_json.items() if k not in ("vocab", "merges")}
    run.tokenizers[kw.get("use_fast", True)] = tok
    return out


def tokenizers(run: Run) -> None:
    """The steps ``tokenizer`` and ``tokenizer_slow`` (the latter kept only when ``use_fast=False`` gives a
    different implementation)."""
    tok = run.step("tokenizer", load_tokenizer, run)
    if tok is not None:
        run.result["tokenizer"] = tok
        run.settings.update(tok["settings"])
    slow = run.step("tokenizer_slow", load_tokenizer, run, use_fast=False)
    if slow is not None and (tok is None or slow["class"] != tok["class"]):
        run.result["tokenizer_slow"] = slow


# --- processor -----------------------------------------------------------------------------------------------------
def load_processor(run):
    """``AutoProcessor``: its classes and settings, its ``input_ids`` and ``pixel_values`` for every prompt, and its
    chat template."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(run.repo)
    info = {
        "class": type(proc).__name__,
        "image_processor_class": type(getattr(proc, "image_processor", None)).__name__,
        "tokenizer_class": type(getattr(proc, "tokenizer", None)).__name__,
    }
    run.settings.update(_processor_settings(proc))
    images = {}
    for name, path in run.job["images"].items():
        with Image.open(path) as im:
            images[name] = im.convert("RGB")
    per_prompt = []
    for i, p in enumerate(run.job["prompts"]):
        n = p["prompt"].count("<image>")
        imgs = [images[p["image"]]] * n if p.get("image") and n else None
        enc = proc(text=p["prompt"], images=imgs, return_tensors="pt")
        run.tensors[f"own_ids_{i}"] = enc["input_ids"][0].numpy().astype(np.int64)
        if imgs:
            run.tensors[f"own_pixels_{i}"] = enc["pixel_values"].float().numpy()
        per_prompt.append({"name": p["name"], "images": n if imgs else 0})
    info["prompts"] = per_prompt
    info["chat"] = [
        proc.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in run.job.get("chat_probes", [])
    ]
    return info


# --- recipe (no AutoProcessor needed) ------------------------------------------------------------------------------
def recipe(run):
    """The recipe's ``input_ids`` and ``pixel_values`` for every prompt (:func:`recipe_inputs`)."""
    import numpy as np
    from PIL import Image

    tok = run.tokenizers.get(True)
    if tok is None:
        raise RuntimeError("no tokenizer (the tokenizer step failed)")
    for i, p in enumerate(run.job["prompts"]):
        image = None
        if p.get("image") and "<image>" in p["prompt"]:
            with Image.open(run.job["images"][p["image"]]) as im:
                image = im.convert("RGB")
        ids, pixels = recipe_inputs(run.repo, tok, p["prompt"], image, run.collapse, int(run.seq))
        run.tensors[f"recipe_ids_{i}"] = ids[0].numpy().astype(np.int64)
        if pixels is not None:
            run.tensors[f"recipe_pixels_{i}"] = pixels.float().numpy()
    return len(run.job["prompts"])


# --- forward -------------------------------------------------------------------------------------------------------
def _model_inputs(ids, pixels) -> dict:
    import torch

    kw = {
        "input_ids": torch.from_numpy(ids).unsqueeze(0),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
    }
    if pixels is not None:
        kw["pixel_values"] = torch.from_numpy(pixels).float()
    return kw


def forward(run: Run, model) -> int:
    """Logits for every prompt on :meth:`Run.feed` (each run of image tokens collapsed to one where the model
    expands it)."""
    import torch

    feed = run.feed()
    n = 0
    with torch.no_grad():
        for i in range(len(run.job["prompts"])):
            if f"own_ids_{i}" not in feed:
                raise RuntimeError(f"no input_ids for prompt {i} (the processor step failed)")
            ids = feed[f"own_ids_{i}"]
            if run.collapse:
                ids = _collapse(ids, run.image_id)
            logits = model(**_model_inputs(ids, feed.get(f"own_pixels_{i}")), use_cache=False).logits[0].float()
            run.tensors[f"logits_{i}"] = logits.numpy()
            n += 1
    return n


def greedy(run: Run, model) -> int:
    """``new_tokens`` greedy tokens for every prompt on :meth:`Run.feed`."""
    import numpy as np
    import torch

    feed = run.feed()
    new = int(run.job.get("new_tokens") or 0)
    with torch.no_grad():
        for i in range(len(run.job["prompts"])):
            ids = feed[f"own_ids_{i}"]
            if run.collapse:
                ids = _collapse(ids, run.image_id)
            out = model.generate(
                **_model_inputs(ids, feed.get(f"own_pixels_{i}")),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                num_beams=1,
                pad_token_id=run.settings.get("generation_config.pad_token_id"),
            )
            run.tensors[f"greedy_{i}"] = out[0, len(ids) :].numpy().astype(np.int64)
    return new


def recipe_forward(run: Run, model) -> int:
    """Logits for every prompt on the recipe's inputs."""
    import torch

    with torch.no_grad():
        for i in range(len(run.job["prompts"])):
            inputs = _model_inputs(run.tensors[f"recipe_ids_{i}"], run.tensors.get(f"recipe_pixels_{i}"))
            logits = model(**inputs, use_cache=False).logits[0]
            run.tensors[f"recipe_logits_{i}"] = logits.float().numpy()
    return len(run.job["prompts"])


def finish(run: Run) -> None:
    """``result.json`` and ``tensors.npz`` in the job's ``out`` folder."""
    import numpy as np

    run.result["settings"] = run.settings
    run.result["seconds"] = round(time.perf_counter() - run.t0, 3)
    out_dir = run.job["out"]
    np.savez(os.path.join(out_dir, "tensors.npz"), **run.tensors)
    with open(os.path.join(out_dir, "result.json"), "w", encoding="utf-8") as f:
        json.dump(run.result, f, indent=1, sort_keys=True, ensure_ascii=False)


def main(argv: list[str]) -> int:
    """The steps in order; each guarded (:meth:`Run.step`), the model's only when it loaded."""
    warnings.filterwarnings("ignore")
    with open(argv[0], encoding="utf-8") as f:
        run = Run(json.loads(f.read()))
    start(run)
    model = run.step("model", load_model, run)
    run.result["default_attention"] = run.step("model_default_attention", default_attention, run)
    tokenizers(run)
    proc = run.step("processor", load_processor, run)
    if proc is not None:
        run.result["processor"] = proc
    run.result["recipe_prompts"] = run.step("recipe", recipe, run)
    if model is not None:
        run.result["forward_prompts"] = run.step("forward", forward, run, model)
        if run.job.get("new_tokens"):
            run.result["greedy_tokens"] = run.step("greedy", greedy, run, model)
        if run.result.get("recipe_prompts"):
            run.step("recipe_forward", recipe_forward, run, model)
    finish(run)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
