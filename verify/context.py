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

MANIFEST = "conversion.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class VerifyUsageError(Exception):
    """Bad usage or unreadable input (exit 2), as opposed to a failed check (exit 1)."""


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
        if prompts is None or images is None:
            from fixtures.build import sample_images, sample_prompts

            prompts = sample_prompts() if prompts is None else prompts
            images = sample_images() if images is None else images
        self.prompts = prompts
        self.images = images
        for p in prompts:
            if p.get("image") and p["image"] not in images:
                raise VerifyUsageError(f"prompt {p.get('name')!r} names image {p['image']!r}, which is not among the images")

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

        d = self.inputs.original if self.inputs.original.is_dir() else self.inputs.original.parent
        return OriginalVipLlava.from_dirs(d, self.inputs.text_model, self.inputs.vision_model, dtype=self.dtype)

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
