"""The original checkpoint: its files, its tensors, and their strict placement into the restated model.

Restates the checkpoint as saved by ``LlavaLlamaForCausalLM`` / ``LlavaPhi3ForCausalLM``
(``llava/model/language_model/llava_llama.py``, ``llava_phi3.py``) + ``llava/model/llava_arch.py``:
``model.vision_tower.vision_tower.*`` is the frozen CLIP tower, ``model.mm_projector.*`` the projector, the rest a
plain Llama or Phi-3 with its fused ``qkv_proj`` / ``gate_up_proj``.  Shards are read with our own loader
(``.bin`` only through ``torch.load(..., mmap=True, weights_only=True)``), and placement is strict: an original key
we cannot place, or a module parameter left unloaded, is an error.

Memory: with ``dtype=torch.bfloat16`` and bf16 storages, ``.bin`` tensors stay memory-mapped and are assigned
without a copy; float32 needs 4 bytes per parameter in RAM.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel

from convert.safejson import clean, confined, load_json  # file-reading plumbing only, no model facts

from .errors import OriginalLoadError

VISION_PREFIX = "model.vision_tower.vision_tower."
PROJECTOR_PREFIX = "model.mm_projector."
PROJECTOR_KEYS = (
    "clip_layernorm.weight",
    "clip_layernorm.bias",
    "final_linear.0.weight",
    "final_linear.0.bias",
    "final_linear.2.weight",
    "final_linear.2.bias",
)
_LEGACY_ROTARY = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_LEGACY_POSITION_IDS = re.compile(r"^model\.vision_tower\.vision_tower\.(vision_model\.)?embeddings\.position_ids$")


_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def list_checkpoint_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """Shard files of an original checkpoint folder, and the index's weight map if sharded.

    Prefers safetensors over pickles and an index over a single file, like the original's
    ``from_pretrained`` would have found them.
    """
    folder = Path(folder)
    for name in _INDEX_FILES:
        index_path = folder / name
        if index_path.is_file():
            # plumbing shared with the converter on purpose (bounded, strict JSON; names confined to the folder
            # before anything is opened): it judges no model fact
            index = load_json(index_path, OriginalLoadError, dict, hint="re-download the checkpoint's index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise OriginalLoadError(
                    f"{index_path}: expected a weight_map of tensor name -> shard file name; re-download the index"
                )
            files = sorted(set(weight_map.values()))
            paths = [confined(folder, f, OriginalLoadError, index_path, "shard") for f in files]
            missing = [f for f, p in zip(files, paths, strict=True) if not p.is_file()]
            if missing:
                raise OriginalLoadError(
                    f"{index_path} names shard(s) that do not exist: {[clean(m, 100) for m in missing[:5]]}"
                )
            return paths, dict(weight_map)
    for name in _SINGLE_FILES:
        if (folder / name).is_file():
            return [folder / name], None
    raise OriginalLoadError(f"no checkpoint in {folder}: expected one of {list(_INDEX_FILES) + list(_SINGLE_FILES)}")


def _read_shard(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".safetensors"):
        from safetensors import safe_open

        out = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
        return out
    if path.name.endswith(".bin"):
        # Never unpickle arbitrary objects: weights_only=True.
        obj = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise OriginalLoadError(f"{path} is not a flat state dict of tensors")
        return obj
    raise OriginalLoadError(f"unsupported shard format: {path}")


def load_original_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an original checkpoint folder, keys exactly as stored."""
    files, weight_map = list_checkpoint_files(Path(folder))
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for path in files:
        for key, tensor in _read_shard(path).items():
            if key in state:
                raise OriginalLoadError(f"key {key!r} appears in both {origin[key]} and {path.name}")
            if weight_map is not None and weight_map.get(key) != path.name:
                raise OriginalLoadError(
                    f"key {key!r} found in {path.name} but the index puts it in {weight_map.get(key)!r}"
                )
            state[key] = tensor
            origin[key] = path.name
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(state))
        if absent:
            raise OriginalLoadError(f"index names key(s) absent from the shards: {absent[:10]}")
    return state


def _materialize_meta_buffers(model: torch.nn.Module, name: str) -> None:
    """Non-persistent buffers (rotary inv_freq, CLIP position_ids) of a meta-built model are
    rebuilt by constructing their owning module again on CPU from the same config."""
    todo = []
    for mod_name, module in model.named_modules():
        redo = [b for b, t in module.named_buffers(recurse=False) if t is not None and t.is_meta]
        if redo:
            todo.append((mod_name, module, redo))
    for mod_name, module, redo in todo:
        try:
            fresh = type(module)(module.config if hasattr(module, "config") else model.config)
        except Exception as exc:  # pragma: no cover - depends on transformers internals
            raise OriginalLoadError(f"cannot rebuild buffers {redo} of {name}.{mod_name}: {exc}") from exc
        if not any(True for _ in module.parameters()) and mod_name:
            # A parameter-free module (the rotary embedding): replace it whole, so that any plain
            # attribute its constructor derived alongside the buffers is rebuilt as well.
            parent_name, _, child = mod_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, fresh)
        else:
            for b in redo:
                setattr(module, b, getattr(fresh, b))
    left = [n for n, t in model.named_buffers() if t.is_meta]
    left += [n for n, t in model.named_parameters() if t.is_meta]
    if left:
        raise OriginalLoadError(f"{name}: tensors left unloaded: {left}")


def _assign(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    expected = model.state_dict()
    for k, t in state.items():
        if k not in expected:
            raise OriginalLoadError(f"{name}: unexpected key {k!r}")
        if tuple(expected[k].shape) != tuple(t.shape):
            raise OriginalLoadError(f"{name}: {k!r} has shape {tuple(t.shape)}, model wants {tuple(expected[k].shape)}")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise OriginalLoadError(f"{name}: key(s) missing from the original checkpoint: {missing}")
    model.load_state_dict(state, strict=True, assign=True)


def _vision_key(key: str, vision_keys: set[str]) -> str:
    """The ``CLIPVisionModel`` key of an original vision-tower key, saved with or without ``vision_model.``."""
    sub = key[len(VISION_PREFIX) :]
    candidates = [sub]
    if sub.startswith("vision_model."):
        candidates.append(sub[len("vision_model.") :])
    else:
        candidates.append("vision_model." + sub)
    placed = next((c for c in candidates if c in vision_keys), None)
    if placed is None:
        raise OriginalLoadError(f"vision tower: unexpected key {key!r}")
    return placed


def split_original_state(
    raw: dict[str, torch.Tensor], vision_keys: set[str], dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The original tensors in ``dtype``, sorted into the text model's, the vision tower's (``vision_keys``: its
    state-dict keys) and the projector's state dicts; the non-persistent buffers older transformers saved are
    dropped, an unknown vision or projector key is an error."""
    llm_sd: dict[str, torch.Tensor] = {}
    vis_sd: dict[str, torch.Tensor] = {}
    proj_sd: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        if _LEGACY_ROTARY.match(key) or _LEGACY_POSITION_IDS.match(key):
            continue
        if key.startswith(VISION_PREFIX):
            vis_sd[_vision_key(key, vision_keys)] = tensor.to(dtype)
        elif key.startswith(PROJECTOR_PREFIX):
            sub = key[len(PROJECTOR_PREFIX) :]
            if sub not in PROJECTOR_KEYS:
                raise OriginalLoadError(f"projector: unexpected key {key!r}")
            proj_sd[sub] = tensor.to(dtype)
        else:
            llm_sd[key] = tensor.to(dtype)
    return llm_sd, vis_sd, proj_sd


def _check_projector(proj_sd: dict[str, torch.Tensor], mm_hidden: int, hidden: int) -> None:
    """Every projector tensor is there, in the shape ``mlp2x_gelu`` over an ``mm_hidden`` input gives it."""
    missing = [PROJECTOR_PREFIX + k for k in PROJECTOR_KEYS if k not in proj_sd]
    if missing:
        raise OriginalLoadError(f"projector: key(s) missing from the original checkpoint: {missing}")
    want = {
        "clip_layernorm.weight": (mm_hidden,),
        "clip_layernorm.bias": (mm_hidden,),
        "final_linear.0.weight": (hidden, mm_hidden),
        "final_linear.0.bias": (hidden,),
        "final_linear.2.weight": (hidden, hidden),
        "final_linear.2.bias": (hidden,),
    }
    for k, shape in want.items():
        if tuple(proj_sd[k].shape) != shape:
            raise OriginalLoadError(
                f"projector: {PROJECTOR_PREFIX + k!r} has shape {tuple(proj_sd[k].shape)}, want {shape}"
            )


def place_original(
    llm: PreTrainedModel,
    vision: PreTrainedModel,
    parts: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]],
    text_config: PretrainedConfig,
    mm_hidden: int,
) -> None:
    """Assigns the text model's and the vision tower's tensors (``parts`` from :func:`split_original_state`) to the
    meta-built ``llm`` and ``vision`` strictly, checks the projector's, rebuilds the non-persistent buffers and
    leaves both models frozen in eval mode."""
    llm_sd, vis_sd, proj_sd = parts
    tied = bool(getattr(text_config, "tie_word_embeddings", False))
    if tied and "lm_head.weight" not in llm_sd and "model.embed_tokens.weight" in llm_sd:
        llm_sd["lm_head.weight"] = llm_sd["model.embed_tokens.weight"]
    _assign(llm, llm_sd, "language model")
    _assign(vision, vis_sd, "vision tower")
    _check_projector(proj_sd, mm_hidden, text_config.hidden_size)
    if tied:
        llm.tie_weights()
    _materialize_meta_buffers(llm, "language model")
    _materialize_meta_buffers(vision, "vision tower")
    for m in (llm, vision):
        m.eval()
        m.requires_grad_(False)
    rows = llm.get_input_embeddings().weight.shape[0]  # type: ignore[index]  # an nn.Embedding: its weight
    if llm.config.vocab_size != rows:
        raise OriginalLoadError("embedding rows differ from vocab_size")
