"""Everything the checks share, loaded once and lazily: the converted repo, the original, the reference model,
the sample prompts and images.

Tensor files are read here with our own minimal readers (safetensors' ``safe_open`` for the converted repo;
``torch.load(mmap=True, weights_only=True)`` or ``safe_open`` for the original), not with the converter's code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from .preflight import VerifyUsageError, audit_inputs_problem  # noqa: F401 (VerifyUsageError: re-exported)

MANIFEST = "conversion.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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
    from verify.fixtures.build import sample_conversations, sample_prompts
    from .original import BACKBONES

    return sample_prompts() if BACKBONES[backbone].conv_mode == "llava_v1" else sample_conversations()


def prepare_prompt(entry: dict, conv_mode: str, index: int = 0) -> dict:
    """``{name, prompt, image}`` or ``{name, turns, image}`` -> ``{name, prompt, image[, turns]}``, the prompt of a
    conversation rendered as the original ``conversation.py`` did in ``conv_mode``."""
    from .original import render_prompt

    if not isinstance(entry, dict) or ("prompt" not in entry and "turns" not in entry):
        raise VerifyUsageError(f"prompt #{index}: expected {{name, prompt, image}} or {{name, turns, image}}, got {entry!r}"[:300])
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
            raise VerifyUsageError(f"prompt {name!r}: gives both a prompt and turns, and the turns render differently in {conv_mode}")
        out["turns"] = [{"role": t.get("role"), "text": t.get("text")} if isinstance(t, dict) else {"role": t[0], "text": t[1]} for t in turns]
        out["prompt"] = rendered
    else:
        if not isinstance(entry["prompt"], str):
            raise VerifyUsageError(f"prompt {name!r}: prompt must be a string")
        out["prompt"] = entry["prompt"]
    return out


class OriginalTensors:
    """Lazy name -> tensor access to an original checkpoint folder (bin or safetensors, single or sharded)."""

    def __init__(self, directory: Path):
        d = directory if directory.is_dir() else directory.parent
        self.files: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        idx = next((d / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json") if (d / n).is_file()), None)
        if idx is not None:
            wm = json.loads(idx.read_text())["weight_map"]
            self.files = {k: d / v for k, v in wm.items()}
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


class ConvertedTensors:
    """Lazy access to the converted repo's safetensors (every ``*.safetensors`` file in the folder)."""

    def __init__(self, repo: Path):
        from safetensors import safe_open

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


class Context:
    def __init__(
        self,
        repo: Path,
        original: str | None = None,
        text_model: str | None = None,
        vision_model: str | None = None,
        prompts: list[dict] | None = None,
        images: dict | None = None,
        dtype: str = "float32",
        max_new_tokens: int = 8,
    ):
        self.repo = Path(repo)
        if not self.repo.is_dir():
            raise VerifyUsageError(f"{repo}: not a folder; pass the converted repo")
        if dtype not in DTYPES:
            raise VerifyUsageError(f"--dtype {dtype!r}: expected float32 or bfloat16")
        self.dtype_name = dtype
        self.dtype = DTYPES[dtype]
        self.max_new_tokens = max_new_tokens
        mf = self.repo / MANIFEST
        self.manifest: dict | None = None
        if mf.is_file():
            try:
                self.manifest = json.loads(mf.read_text())
            except json.JSONDecodeError as e:
                raise VerifyUsageError(f"{mf}: not valid JSON ({e})") from None
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
            from verify.fixtures.build import sample_images

            images = sample_images()
        self.prompts = [prepare_prompt(p, self.conv_mode, i) for i, p in enumerate(prompts)]
        self.images = images
        for p in self.prompts:
            if p.get("image") and p["image"] not in images:
                raise VerifyUsageError(f"prompt {p.get('name')!r} names image {p['image']!r}, which is not among the images")

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
        return json.loads(p.read_text())

    @cached_property
    def converted_tensors(self) -> ConvertedTensors:
        return ConvertedTensors(self.repo)

    @cached_property
    def loaded(self):
        """(model, loading_info), loaded with ``from_pretrained`` as a user would, in the requested dtype."""
        from transformers import VipLlavaForConditionalGeneration

        model, info = VipLlavaForConditionalGeneration.from_pretrained(
            str(self.repo), output_loading_info=True, dtype=self.dtype, attn_implementation="eager"
        )
        model.eval()
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
        return json.loads(p.read_text()) if p.is_file() else {}

    # --- the original side -----------------------------------------------------------------------------------
    @cached_property
    def original_tensors(self) -> OriginalTensors:
        return OriginalTensors(self.inputs.original)

    @cached_property
    def reference(self):
        from .original import OriginalVipLlava

        return OriginalVipLlava.from_dirs(self.original_dir, self.inputs.text_model, self.inputs.vision_model, dtype=self.dtype)

    @cached_property
    def base_tokenizer(self):
        """The tokenizer the original inference used (cheap: no model weights)."""
        from .original import load_base_tokenizer

        return load_base_tokenizer(self.backbone, self.inputs.text_model)

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
        from verify.fixtures.build import sample_conversations

        return "bundled", [prepare_prompt(c, self.conv_mode, i) for i, c in enumerate(sample_conversations())]

    @cached_property
    def original_vocab(self) -> int:
        return int(self.original_tensors.get("model.embed_tokens.weight").shape[0])

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
            out.append({"name": p["name"], "ids": ids, "expanded": expanded, "images": imgs, "pixels": pixels})
        return out

    @cached_property
    def reference_outputs(self) -> list:
        return [self.reference.forward(x["ids"], x["images"] or None) for x in self.parity_inputs]

    @cached_property
    def reference_generations(self) -> list[list[int]]:
        """Greedy continuations of the reference, all prompts first (the two models are never used in turns, so a
        full-size pair does not fight over the page cache)."""
        return [list(self.reference.generate_greedy(x["ids"], x["images"] or None, max_new_tokens=self.max_new_tokens))
                for x in self.parity_inputs]

    @cached_property
    def converted_logits(self) -> list[torch.Tensor]:
        outs = []
        with torch.no_grad():
            for x in self.parity_inputs:
                kw = {}
                if x["pixels"] is not None:
                    kw["pixel_values"] = x["pixels"].to(self.dtype)
                ids = torch.tensor([x["expanded"]])
                outs.append(self.model(input_ids=ids, **kw).logits[0].float())
        return outs
