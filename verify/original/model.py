"""The original ViP-LLaVA model, restated: load, preprocess, tokenize, forward, extend and greedy generation.

* :meth:`OriginalVipLlava.from_dirs`: the model ``llava/model/builder.py`` loaded, built from the original
  checkpoint (:mod:`verify.original.checkpoint`), its configs (:mod:`verify.original.configs`), the base model's
  tokenizer (:mod:`verify.original.backbones`) and the vision model's preprocessing settings.
* :meth:`OriginalVipLlava.preprocess` / :meth:`OriginalVipLlava.tokenize`: ``llava/mm_utils.py`` ``process_images``
  (:mod:`verify.original.preprocess`) and ``tokenizer_image_token`` (:mod:`verify.original.image_token`).
* :meth:`OriginalVipLlava.image_features`: the multilayer CLIP features and the projector
  (:mod:`verify.original.vision`).
* :meth:`OriginalVipLlava.forward`: ``llava/model/llava_arch.py`` ``prepare_inputs_labels_for_multimodal`` (embed
  the non-image ids, replace every -200 by the next image's features, truncate to ``tokenizer_model_max_length``,
  positions 0..T-1 over the spliced sequence) followed by the text model.  Cross-checked during development
  against transformers 4.31.0: the whole forward on a tiny checkpoint matches a 4.31 Llama + CLIP run of the
  original pipeline to ~3e-6 in fp32 logits.
* :meth:`OriginalVipLlava.generate_greedy`: ``generate`` with ``do_sample=False`` (greedy) and the eval scripts'
  terminators (:func:`verify.original.terminator_ids`).  Like the original (``llava_llama.py`` ``generate``: the
  spliced ``inputs_embeds`` are built once, then transformers' ``generate`` continues with the key/value cache),
  one forward over the prompt is followed by one cached text-model step per new token (``continue_greedy``; each
  new id embedded at the next position).  ``incremental=False`` re-runs the whole forward per token, the yardstick
  the cached path is tested against.  ``builder.py`` resized the embeddings to ``len(tokenizer)`` before
  generating, so the original could only emit ids below ``min(len(tokenizer), rows)``; the argmax is taken over
  those.
* :meth:`OriginalVipLlava.extend`: ``forward`` of a longer prompt computed from a shorter one's key/value cache (a
  shortcut for prompts that share a prefix; the function is the same).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import PIL.Image
import torch
from transformers import CLIPVisionModel, LlamaForCausalLM, Phi3ForCausalLM

from .backbones import BACKBONES, Backbone, detect_backbone, terminator_ids
from .checkpoint import load_original_state_dict, place_original, split_original_state
from .configs import check_vip_config, clip_vision_config_from_dir, multimodal_hidden_size
from .conversation import render_prompt
from .errors import OriginalLoadError
from .fast_tokenizer import FastTokenizer
from .image_token import IMAGE_SENTINEL
from .preprocess import ClipPreprocessSettings, process_image
from .slow_tokenizer import LlamaSlowTokenizer
from .vision import FEATURE_LAYERS, PROJECTOR_EPS, select_and_project, vision_hidden_states


def _cache_argument(llm: torch.nn.Module) -> str:
    """The text model's keyword for the key/value cache: ``cache`` (transformers >= 5.2x), ``past_key_values``
    before."""
    import inspect

    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


def _returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _layer_tensors(cache: Any) -> list[list[Any]]:
    """A key/value cache as ``[[keys, values], ...]`` per layer, each ``[batch, heads, positions, head_dim]``:
    transformers 5.x (``.layers``), 4.36-4.4x (``.key_cache`` / ``.value_cache``) or the legacy tuples."""
    if hasattr(cache, "layers"):
        return [[layer.keys, layer.values] for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return [[k, v] for k, v in zip(cache.key_cache, cache.value_cache, strict=True)]
    return [[k, v] for k, v in cache]


def _cache_from_layers(pairs: list[tuple[torch.Tensor, ...]]) -> Any:
    """A transformers ``DynamicCache`` holding ``pairs`` (keys, values) per layer."""
    import inspect

    from transformers import DynamicCache

    if "ddp_cache_data" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(ddp_cache_data=pairs)
    return DynamicCache.from_legacy_cache(tuple(pairs))  # type: ignore[attr-defined]  # transformers < 5


@dataclass
class ReferenceOutput:
    logits: torch.Tensor
    input_positions: list[int]
    trace: dict[str, torch.Tensor] = field(default_factory=dict)
    # the text model's key/value cache after the sequence (``forward(keep_cache=True)``), for greedy continuation
    cache: Any = None


class OriginalVipLlava:
    """The original ViP-LLaVA (Vicuna, Llama-3 or Phi-3 backbone, ``clip_4layers_336`` tower), restated."""

    feature_layers: tuple[int, ...] = FEATURE_LAYERS

    def __init__(
        self,
        config: dict[str, Any],
        llm: LlamaForCausalLM | Phi3ForCausalLM,
        vision: CLIPVisionModel,
        projector: dict[str, torch.Tensor],
        tokenizer: LlamaSlowTokenizer | FastTokenizer,
        image_settings: ClipPreprocessSettings,
        dtype: torch.dtype,
        backbone: Backbone = BACKBONES["vicuna"],
    ):
        self.config = config
        self.backbone = backbone
        self.llm = llm
        self.vision = vision
        self.projector = projector
        self.tokenizer = tokenizer
        self.sp = getattr(tokenizer, "sp", None)
        self.image_settings = image_settings
        self.dtype = dtype
        self.image_aspect_ratio = config.get("image_aspect_ratio", "square")
        self.max_length = config.get("tokenizer_model_max_length")
        self.projector_eps = PROJECTOR_EPS
        self.terminators = terminator_ids(backbone.name, tokenizer)
        self.eos_token_ids = set(self.terminators.values())
        # builder.py: model.resize_token_embeddings(len(tokenizer)) before generating
        self.emit_limit = min(len(tokenizer), llm.config.vocab_size)

    @property
    def conv_mode(self) -> str:
        return self.backbone.conv_mode

    @property
    def base_tokens(self) -> int:
        """T = len(base tokenizer), for the converted layout (``expected_layout``)."""
        return len(self.tokenizer)

    def render(self, turns: Sequence[Any]) -> str:
        """The original prompt string for ``turns`` in this backbone's conversation mode."""
        return render_prompt(turns, self.backbone.conv_mode)

    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_dirs(
        cls, original: Path, text_model: Path, vision_model: Path, dtype: torch.dtype = torch.float32
    ) -> "OriginalVipLlava":
        """The original model from its checkpoint folder, the base text model folder (tokenizer) and the vision model
        folder (CLIP config, preprocessing), every input checked at load time."""
        original, text_model, vision_model = Path(original), Path(text_model), Path(vision_model)
        backbone = BACKBONES[detect_backbone(original, text_model)]
        config = json.loads((original / "config.json").read_text())
        check_vip_config(config)
        lcfg = backbone.text_config(config)
        vcfg = clip_vision_config_from_dir(vision_model)
        mm_hidden = multimodal_hidden_size(config, vcfg)
        with torch.device("meta"):
            llm = backbone.text_model(lcfg)
            vision = CLIPVisionModel(vcfg)
        parts = split_original_state(load_original_state_dict(original), set(vision.state_dict()), dtype)
        place_original(llm, vision, parts, lcfg, mm_hidden)
        tokenizer = _base_tokenizer(backbone, text_model, lcfg.vocab_size)
        settings = ClipPreprocessSettings.from_file(vision_model / "preprocessor_config.json")
        return cls(config, llm, vision, parts[2], tokenizer, settings, dtype, backbone)

    # ---------------------------------------------------------------------------------------
    @property
    def num_patches(self) -> int:
        c = self.vision.config
        # transformers types CLIP's image_size and patch_size as int | list | tuple | None; they are ints here
        return (c.image_size // c.patch_size) ** 2  # type: ignore[operator]

    def preprocess(self, image: PIL.Image.Image) -> torch.Tensor:
        """llava/mm_utils.py process_images for one image -> [3, crop_h, crop_w] float32."""
        return process_image(image, self.image_settings, self.image_aspect_ratio)

    def tokenize(self, prompt: str) -> list[int]:
        """llava/mm_utils.py tokenizer_image_token: ids with IMAGE_SENTINEL for each <image>."""
        return self.tokenizer.encode_with_images(prompt)

    # ---------------------------------------------------------------------------------------
    def _project_images(self, images: Sequence[PIL.Image.Image]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The projected features of ``images`` and the tower's hidden states behind them."""
        hs = vision_hidden_states(self.vision, torch.stack([self.preprocess(im) for im in images]))
        return select_and_project(hs, self.projector, self.projector_eps), hs

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> projected features [B, num_patches, text_hidden] (model dtype)."""
        if pixel_values.ndim == 3:
            pixel_values = pixel_values[None]
        return select_and_project(vision_hidden_states(self.vision, pixel_values), self.projector, self.projector_eps)

    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(
        self,
        input_ids: Sequence[int],
        images: Sequence[PIL.Image.Image] | None = None,
        capture: bool = False,
        features: torch.Tensor | None = None,
        last_only: bool = False,
        keep_cache: bool = False,
    ) -> ReferenceOutput:
        """Logits of the original model over the spliced sequence.

        ``input_ids`` may hold ``IMAGE_SENTINEL``; ``images`` (PIL) are consumed in order, one per
        sentinel.  Returns float32 logits ``[T, vocab]`` with ``T = len(input_ids) +
        n_images * (num_patches - 1)`` (capped at ``tokenizer_model_max_length``) and, per spliced
        position, the index into ``input_ids`` it came from.

        ``last_only=True`` (greedy decoding): the logits of the last position only, ``[1, vocab]``.
        ``features``: the images' projected features, computed before (the vision side does not depend on the text).

        ``capture=True`` also records float32 intermediates in ``trace``:
        ``vision.embeddings`` (CLIP hidden state 0, after ``pre_layrnorm``) and
        ``vision.layer.{i}`` (output of encoder layer i), both ``[n_images, 1 + num_patches,
        vision_hidden]``; ``projector`` ``[n_images, num_patches, hidden]``;
        ``decoder.embeddings`` (the spliced input embeddings) ``[T, hidden]``;
        ``decoder.layer.{i}`` (output of decoder layer i; the last one before the final norm)
        ``[T, hidden]``; ``decoder.norm`` ``[T, hidden]``; ``logits`` ``[T, vocab]``.

        ``keep_cache=True`` keeps the text model's key/value cache in ``cache`` (the state the original's
        ``generate`` continued from after its first step); :meth:`continue_greedy` consumes it.
        """
        ids = [int(i) for i in input_ids]
        images = list(images or [])
        self._check_inputs(ids, images)
        trace: dict[str, torch.Tensor] = {}
        features = self._features_for(images, features, capture, last_only, trace)
        inputs_embeds, positions = self._splice(ids, features)
        if capture:
            trace["decoder.embeddings"] = inputs_embeds.float().clone()
        out = self._run_text_model(inputs_embeds, trace if capture else None, last_only, keep_cache)
        logits = out.logits[0].float()
        if capture:
            trace["logits"] = logits.clone()
        cache = _returned_cache(out) if keep_cache else None
        return ReferenceOutput(logits=logits, input_positions=positions, trace=trace, cache=cache)

    __call__ = forward

    def _check_inputs(self, ids: list[int], images: list[PIL.Image.Image]) -> None:
        """Every id is a row of the embedding or the image sentinel, one image per sentinel, at least one id."""
        vocab = self.llm.config.vocab_size
        bad = [i for i in ids if i != IMAGE_SENTINEL and not 0 <= i < vocab]
        if bad:
            raise ValueError(f"token ids outside [0, {vocab}) other than {IMAGE_SENTINEL}: {bad[:5]}")
        n_sentinels = ids.count(IMAGE_SENTINEL)
        if n_sentinels != len(images):
            raise ValueError(f"{n_sentinels} image sentinel(s) in input_ids but {len(images)} image(s) given")
        if not ids:
            raise ValueError("empty input_ids")

    def _features_for(
        self,
        images: list[PIL.Image.Image],
        features: torch.Tensor | None,
        capture: bool,
        last_only: bool,
        trace: dict[str, torch.Tensor],
    ) -> torch.Tensor | None:
        """The projected features of ``images``: ``features`` when computed before (``generate_greedy``), else the
        tower and the projector run now (their outputs recorded in ``trace`` when ``capture``); None without
        images."""
        if capture and last_only:
            raise ValueError("capture needs the logits of every position (last_only=False)")
        if features is not None:
            if capture or features.shape[0] != len(images):
                raise ValueError("precomputed features need one entry per image and capture=False")
            return features
        if not images:
            return None
        features, hs = self._project_images(images)
        if capture:
            trace["vision.embeddings"] = hs[0].float().clone()
            for i in range(1, len(hs)):
                trace[f"vision.layer.{i - 1}"] = hs[i].float().clone()
            trace["projector"] = features.float().clone()
        return features

    def _splice(
        self, ids: list[int], features: torch.Tensor | None, limit: bool = True
    ) -> tuple[torch.Tensor, list[int]]:
        """``prepare_inputs_labels_for_multimodal``: the text ids embedded, each sentinel replaced by the next image's
        features, truncated to ``tokenizer_model_max_length`` (``limit``; :meth:`extend` checks the whole length
        itself); with, per spliced position, its index in ``ids``."""
        embed = self.llm.get_input_embeddings()
        text_ids = torch.tensor([i for i in ids if i != IMAGE_SENTINEL], dtype=torch.long)
        text_emb = embed(text_ids)
        pieces: list[torch.Tensor] = []
        positions: list[int] = []
        t = 0
        img = 0
        for pos, tok in enumerate(ids):
            if tok == IMAGE_SENTINEL:
                assert features is not None  # computed whenever the prompt has images
                feat = features[img]
                pieces.append(feat)
                positions.extend([pos] * feat.shape[0])
                img += 1
            else:
                pieces.append(text_emb[t : t + 1])
                positions.append(pos)
                t += 1
        inputs_embeds = torch.cat(pieces, dim=0)
        if limit and self.max_length is not None and inputs_embeds.shape[0] > self.max_length:
            # prepare_inputs_labels_for_multimodal truncates to tokenizer_model_max_length.
            inputs_embeds = inputs_embeds[: self.max_length]
            positions = positions[: self.max_length]
        return inputs_embeds, positions

    def _run_text_model(
        self, inputs_embeds: torch.Tensor, trace: dict[str, torch.Tensor] | None, last_only: bool, keep_cache: bool
    ) -> Any:
        """The text model over the spliced embeddings at positions 0..T-1; with ``trace``, each decoder layer's
        output and the final norm's are recorded in it."""
        T = inputs_embeds.shape[0]
        hooks = self._capture_hooks(trace) if trace is not None else []
        try:
            return self.llm(
                inputs_embeds=inputs_embeds[None],
                position_ids=torch.arange(T, dtype=torch.long)[None],
                use_cache=keep_cache,
                # last_only: the lm_head on the last position alone (what greedy decoding reads)
                **({"logits_to_keep": 1} if last_only else {}),
            )
        finally:
            for h in hooks:
                h.remove()

    def _capture_hooks(self, trace: dict[str, torch.Tensor]) -> list[Any]:
        def make_hook(name):
            def hook(_module, _inputs, output):
                out = output[0] if isinstance(output, (tuple, list)) else output
                trace[name] = out[0].float().clone()

            return hook

        hooks = []
        for i, layer in enumerate(self.llm.model.layers):
            hooks.append(layer.register_forward_hook(make_hook(f"decoder.layer.{i}")))
        hooks.append(self.llm.model.norm.register_forward_hook(make_hook("decoder.norm")))
        return hooks

    @torch.no_grad()
    def extend(
        self,
        prefix: ReferenceOutput,
        more_ids: Sequence[int],
        keep_cache: bool = False,
        images: Sequence[PIL.Image.Image] | None = None,
    ) -> ReferenceOutput:
        """``forward(ids + more_ids)`` computed from ``forward(ids, keep_cache=True)`` = ``prefix``: ``more_ids`` are
        spliced as :meth:`forward` splices a prompt (each ``IMAGE_SENTINEL`` replaced by the next of ``images``'
        features) at the positions after the prefix's spliced sequence, and attend to a copy of its key/value cache
        (``prefix`` stays usable for the next extension). The logits are the prefix's followed by the new
        positions'. Prompts that share a prefix (the system text; the system text and an image) compute it once;
        the original's ``generate`` ran each prompt whole, and the function is the same."""
        ids = [int(i) for i in more_ids]
        images = list(images or [])
        if not ids:
            raise ValueError("extend needs at least one id")
        self._check_inputs(ids, images)
        if prefix.cache is None:
            raise ValueError("extend needs forward(..., keep_cache=True)")
        features = self._project_images(images)[0] if images else None
        start = len(prefix.input_positions)
        spliced, offsets = self._splice(ids, features, limit=False)
        if self.max_length is not None and start + spliced.shape[0] > self.max_length:
            raise ValueError(
                f"prefix + {spliced.shape[0]} spliced positions exceed tokenizer_model_max_length {self.max_length}"
            )
        first_id = (prefix.input_positions[-1] + 1) if prefix.input_positions else 0
        cache = copy.deepcopy(prefix.cache)
        out = self.llm(
            inputs_embeds=spliced[None],
            position_ids=torch.arange(start, start + spliced.shape[0], dtype=torch.long)[None],
            use_cache=True,
            **{_cache_argument(self.llm): cache},
        )
        logits = torch.cat([prefix.logits, out.logits[0].float()], dim=0)
        positions = list(prefix.input_positions) + [first_id + o for o in offsets]
        return ReferenceOutput(
            logits=logits, input_positions=positions, cache=_returned_cache(out) if keep_cache else None
        )

    def prefix(self, out: ReferenceOutput, n_ids: int) -> ReferenceOutput:
        """``forward(ids[:n_ids], keep_cache=True)`` cut from ``out`` = ``forward(ids, keep_cache=True)``: attention
        is causal, so the first positions' logits and keys/values do not depend on the ids after them (the group of
        prompts that share a prefix computes it within its first prompt's forward, then :meth:`extend` the cut for
        the others). The logits and the cache are copies: ``out`` stays as it was."""
        if out.cache is None:
            raise ValueError("prefix needs forward(..., keep_cache=True)")
        positions = [p for p in out.input_positions if p < n_ids]
        if not positions or n_ids <= 0:
            raise ValueError(f"prefix of {n_ids} ids: the output has no position before id {n_ids}")
        n = len(positions)
        pairs = [tuple(t[:, :, :n].clone() for t in layer) for layer in _layer_tensors(out.cache)]
        return ReferenceOutput(
            logits=out.logits[:n].clone(), input_positions=positions, cache=_cache_from_layers(pairs)
        )

    def _pick(self, logits_row: torch.Tensor) -> int:
        """The greedy choice among the ids the original could emit (``builder.py`` had resized the embeddings to
        ``len(tokenizer)``: ``self.emit_limit``)."""
        return int(torch.argmax(logits_row[: self.emit_limit]).item())

    @torch.no_grad()
    def continue_greedy(self, out: ReferenceOutput, max_new_tokens: int = 8) -> tuple[list[int], list[torch.Tensor]]:
        """Greedy continuation of a ``forward(..., keep_cache=True)`` result, one token per step through the text
        model with its key/value cache, as the original's ``generate`` ran after its first step: each new id is
        embedded, placed at the next position (``T``, ``T + 1``, ... over the spliced sequence) and attends to the
        cached keys/values.  Returns the new ids (a terminator included when produced) and the float32 logits row
        each was picked from.  The cache is consumed (``out.cache`` is set to None)."""
        if out.cache is None:
            raise ValueError("continue_greedy needs forward(..., keep_cache=True)")
        cache, out.cache = out.cache, None
        embed = self.llm.get_input_embeddings()
        position = len(out.input_positions)  # T, the spliced length (out.logits may hold the last row only)
        row = out.logits[-1]
        new: list[int] = []
        rows: list[torch.Tensor] = []
        for step in range(max_new_tokens):
            nxt = self._pick(row)
            new.append(nxt)
            rows.append(row)
            if nxt in self.eos_token_ids or step == max_new_tokens - 1:
                break
            step_out = self.llm(
                inputs_embeds=embed(torch.tensor([[nxt]], dtype=torch.long)),
                position_ids=torch.tensor([[position]], dtype=torch.long),
                use_cache=True,
                **{_cache_argument(self.llm): cache},
            )
            cache = _returned_cache(step_out)
            row = step_out.logits[0, -1].float()
            position += 1
        return new, rows

    @torch.no_grad()
    def continue_greedy_batch(
        self, outs: Sequence[ReferenceOutput], max_new_tokens: int = 8, reserved: Any = None
    ) -> list[list[int]]:
        """:meth:`continue_greedy` of several prompts in lock step: each step runs the text model once for all of
        them, so a model whose weights are read from disk reads them once per step, not once per prompt and step.

        The prompts' caches (``forward(..., keep_cache=True)``, all in one dtype) are stacked left-padded: prompt
        ``i`` of spliced length ``T_i`` occupies the last ``T_i`` of ``max T`` slots, the pad slots are zeros that the
        attention mask hides, and its new ids go at positions ``T_i``, ``T_i + 1``, ... as alone. Each prompt's ids
        end at its first terminator (included) or after ``max_new_tokens``; a finished prompt keeps stepping with
        the others and what it computes is dropped. The caches are consumed (``out.cache`` is set to None).

        ``reserved(pairs, filled)``, when given, makes the steps' cache from per-layer (keys, values) buffers that
        have room for the steps' positions after the first ``filled`` (``verify.compute.reserved_cache``: the steps
        write into the room instead of concatenating); by default a ``DynamicCache`` of the stacked caches."""
        if any(o.cache is None for o in outs):
            raise ValueError("continue_greedy_batch needs forward(..., keep_cache=True) for every prompt")
        new: list[list[int]] = [[self._pick(o.logits[-1])] for o in outs]
        done = [ids[0] in self.eos_token_ids or max_new_tokens <= 1 for ids in new]
        lengths = [len(o.input_positions) for o in outs]
        caches = [o.cache for o in outs]
        for o in outs:
            o.cache = None
        if all(done):
            return new
        longest = max(lengths)
        room = max_new_tokens - 1 if reserved is not None else 0
        pairs = []
        per_prompt = [_layer_tensors(c) for c in caches]
        del caches
        for layer in range(len(per_prompt[0])):
            stacked = []
            for part in (0, 1):
                rows: list[torch.Tensor] = [p[layer][part] for p in per_prompt]
                first = rows[0]
                padded = first.new_zeros((len(rows), *first.shape[1:-2], longest + room, first.shape[-1]))
                for i, t in enumerate(rows):
                    padded[i, ..., longest - t.shape[-2] : longest, :] = t[0]
                stacked.append(padded)
            for p in per_prompt:  # free each prompt's layer as soon as it is stacked
                p[layer] = []
            pairs.append(tuple(stacked))
        cache = _cache_from_layers(pairs) if reserved is None else reserved(pairs, longest)
        del pairs, per_prompt
        embed = self.llm.get_input_embeddings()
        visible = torch.zeros((len(outs), longest), dtype=torch.long)
        for i, n in enumerate(lengths):
            visible[i, longest - n :] = 1
        for step in range(1, max_new_tokens):
            visible = torch.cat([visible, torch.ones((len(outs), 1), dtype=torch.long)], dim=1)
            step_out = self.llm(
                inputs_embeds=embed(torch.tensor([[ids[-1]] for ids in new], dtype=torch.long)),
                position_ids=torch.tensor([[n + step - 1] for n in lengths], dtype=torch.long),
                attention_mask=visible,
                use_cache=True,
                **{_cache_argument(self.llm): cache},
            )
            cache = _returned_cache(step_out)
            for i in range(len(outs)):
                if not done[i]:
                    nxt = self._pick(step_out.logits[i, -1].float())
                    new[i].append(nxt)
                    done[i] = nxt in self.eos_token_ids or len(new[i]) >= max_new_tokens
            if all(done):
                break
        return new

    @torch.no_grad()
    def generate_greedy(
        self,
        input_ids: Sequence[int],
        images: Sequence[PIL.Image.Image] | None = None,
        max_new_tokens: int = 8,
        incremental: bool = True,
        return_logits: bool = False,
    ):
        """Greedy continuation (new ids only; a terminator is included when it is produced).

        Stops on the original eval's terminators (``self.terminators``); the argmax runs over the
        ids the original could emit after ``builder.py`` resized the embeddings to
        ``len(tokenizer)`` (``self.emit_limit``).  ``incremental`` (default): one forward over the prompt,
        then one cached step per token (:meth:`continue_greedy`).  ``incremental=False`` re-runs the whole
        forward for every new token (slow; the yardstick the cached path is tested against).
        ``return_logits``: also return the float32 logits row behind each new id."""
        ids = [int(i) for i in input_ids]
        features = None
        if images:  # the vision tower and projector do not depend on the text: run them once
            features, _ = self._project_images(images)
        if incremental:
            new, rows = self.continue_greedy(
                self.forward(ids, images, features=features, keep_cache=True, last_only=True), max_new_tokens
            )
            return (new, rows) if return_logits else new
        new, rows = [], []
        for _ in range(max_new_tokens):
            row = self.forward(ids + new, images, features=features, last_only=True).logits[-1]
            nxt = self._pick(row)
            new.append(nxt)
            rows.append(row)
            if nxt in self.eos_token_ids:
                break
        return (new, rows) if return_logits else new


def _base_tokenizer(backbone: Backbone, text_model: Path, rows: int) -> LlamaSlowTokenizer | FastTokenizer:
    """The tokenizer the original inference loaded for ``backbone``; it must fit the original embedding's rows."""
    tokenizer = backbone.tokenizer(text_model)
    if len(tokenizer) > rows:
        raise OriginalLoadError(
            f"{text_model}: the tokenizer has {len(tokenizer)} tokens, the original model only {rows} rows"
        )
    return tokenizer
