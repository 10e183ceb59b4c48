"""The key mapping between the ORIGINAL ViP-LLaVA layout and the canonical HF VipLlava layout.

The table below is plain data. Each rule names an exact original key and the exact canonical key it becomes;
``{}`` stands for a layer index (decimal digits, captured and carried over). A rule whose target is ``None``
drops the key on purpose: those are buffers older transformers saved and current ones treat as
non-persistent. One function applies the table (:func:`map_key`), one inverts it (:func:`inverse_key`).
Every original key must be claimed by exactly one rule; anything else is an error naming the key.

Canonical layout = what ``llava-hf/vip-llava-7b-hf`` holds and every transformers release since 4.36 loads:
``language_model.model.*``, ``language_model.lm_head.weight``, ``vision_tower.vision_model.*``,
``multi_modal_projector.{projector_layernorm,linear_1,linear_2}.*``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from .backbones import LLAMA_LAYER_RULES
from .errors import ConversionError

_VISION = "model.vision_tower.vision_tower.vision_model."
_HF_VISION = "vision_tower.vision_model."
_CLIP_LAYER = "encoder.layers.{}."

# (name, original key pattern, canonical key pattern or None for "dropped on purpose")
# Shared by every backbone: embeddings, layer norms, final norm and lm_head; the decoder-layer projections
# differ per backbone (convert.backbones: Llama's q/k/v/o + gate/up/down, Phi-3's fused qkv + gate_up).
_TEXT_COMMON: tuple[tuple[str, str, str | None], ...] = (
    ("text.embed", "model.embed_tokens.weight", "language_model.model.embed_tokens.weight"),
    ("text.ln_in", "model.layers.{}.input_layernorm.weight", "language_model.model.layers.{}.input_layernorm.weight"),
    (
        "text.ln_post",
        "model.layers.{}.post_attention_layernorm.weight",
        "language_model.model.layers.{}.post_attention_layernorm.weight",
    ),
    ("text.norm", "model.norm.weight", "language_model.model.norm.weight"),
    ("text.lm_head", "lm_head.weight", "language_model.lm_head.weight"),
)
_VISION_AND_PROJECTOR: tuple[tuple[str, str, str | None], ...] = (
    # --- vision tower (CLIP ViT), saved frozen with the checkpoint ---
    ("vision.cls", _VISION + "embeddings.class_embedding", _HF_VISION + "embeddings.class_embedding"),
    (
        "vision.patch",
        _VISION + "embeddings.patch_embedding.weight",
        _HF_VISION + "embeddings.patch_embedding.weight",
    ),
    (
        "vision.pos",
        _VISION + "embeddings.position_embedding.weight",
        _HF_VISION + "embeddings.position_embedding.weight",
    ),
    ("vision.pre_ln.w", _VISION + "pre_layrnorm.weight", _HF_VISION + "pre_layrnorm.weight"),
    ("vision.pre_ln.b", _VISION + "pre_layrnorm.bias", _HF_VISION + "pre_layrnorm.bias"),
    *(
        (f"vision.{part}.{wb}", f"{_VISION}{_CLIP_LAYER}{part}.{wb}", f"{_HF_VISION}{_CLIP_LAYER}{part}.{wb}")
        for part in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "layer_norm1",
            "layer_norm2",
            "mlp.fc1",
            "mlp.fc2",
        )
        for wb in ("weight", "bias")
    ),
    ("vision.post_ln.w", _VISION + "post_layernorm.weight", _HF_VISION + "post_layernorm.weight"),
    ("vision.post_ln.b", _VISION + "post_layernorm.bias", _HF_VISION + "post_layernorm.bias"),
    # --- projector: LayerNorm -> Linear -> GELU -> Linear ---
    ("proj.ln.w", "model.mm_projector.clip_layernorm.weight", "multi_modal_projector.projector_layernorm.weight"),
    ("proj.ln.b", "model.mm_projector.clip_layernorm.bias", "multi_modal_projector.projector_layernorm.bias"),
    ("proj.fc1.w", "model.mm_projector.final_linear.0.weight", "multi_modal_projector.linear_1.weight"),
    ("proj.fc1.b", "model.mm_projector.final_linear.0.bias", "multi_modal_projector.linear_1.bias"),
    ("proj.fc2.w", "model.mm_projector.final_linear.2.weight", "multi_modal_projector.linear_2.weight"),
    ("proj.fc2.b", "model.mm_projector.final_linear.2.bias", "multi_modal_projector.linear_2.bias"),
    # --- dropped on purpose: buffers that current transformers rebuild and do not persist ---
    ("drop.rotary_inv_freq", "model.layers.{}.self_attn.rotary_emb.inv_freq", None),
    ("drop.clip_position_ids", _VISION + "embeddings.position_ids", None),
)


def rules_for(layer_rules: tuple[tuple[str, str, str | None], ...]) -> tuple[tuple[str, str, str | None], ...]:
    """The full table for a backbone: its decoder-layer rules plus the shared ones."""
    return _TEXT_COMMON[:1] + layer_rules + _TEXT_COMMON[1:] + _VISION_AND_PROJECTOR


# The Vicuna (Llama) table: the default, and the one the property tests exercise.
RULES: tuple[tuple[str, str, str | None], ...] = rules_for(LLAMA_LAYER_RULES)

# The two matrices whose rows the converter pads; their first rows are kept bit-identical.
EMBED_KEY = "language_model.model.embed_tokens.weight"
LM_HEAD_KEY = "language_model.lm_head.weight"

# Keys that mark a plain LLaVA-1.5 projector (no LayerNorm): not ViP-LLaVA.
_PLAIN_LLAVA_PROJECTOR = re.compile(r"^model\.mm_projector\.\d+\.(weight|bias)$")


@dataclass(frozen=True)
class Rule:
    name: str
    source: str
    target: str | None

    @property
    def dropped(self) -> bool:
        return self.target is None


def _compile(template: str) -> re.Pattern[str]:
    parts = [re.escape(p) for p in template.split("{}")]
    return re.compile("^" + r"(0|[1-9][0-9]*)".join(parts) + "$")


@dataclass(frozen=True)
class _Compiled:
    rule: Rule
    source_re: re.Pattern[str]
    target_re: re.Pattern[str] | None


class RuleTable:
    """An immutable, compiled rule table; the module-level :data:`TABLE` is built from :data:`RULES`."""

    def __init__(self, rules: Sequence[tuple[str, str, str | None]]):
        compiled = []
        for name, source, target in rules:
            if target is not None and source.count("{}") != target.count("{}"):
                raise ValueError(f"rule {name}: source and target have different numbers of '{{}}'")
            compiled.append(
                _Compiled(Rule(name, source, target), _compile(source), None if target is None else _compile(target))
            )
        self._rules: tuple[_Compiled, ...] = tuple(compiled)

    @property
    def rules(self) -> tuple[Rule, ...]:
        return tuple(c.rule for c in self._rules)

    def _hits(self, key: str) -> list[tuple[Rule, tuple[str, ...]]]:
        return [(c.rule, m.groups()) for c in self._rules if (m := c.source_re.match(key))]

    def match(self, key: str) -> tuple[Rule, tuple[str, ...]]:
        """The single rule claiming ``key`` and the layer indices it captured; raises if none or several."""
        hits = self._hits(key)
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise ConversionError(f"{key}: no mapping rule claims this original key")
        names = ", ".join(r.name for r, _ in hits)
        raise ConversionError(f"{key}: claimed by several mapping rules ({names}); the table is ambiguous")

    def map_key(self, key: str) -> str | None:
        """Canonical HF key for an original key, or ``None`` when a drop rule claims it."""
        rule, groups = self.match(key)
        return None if rule.target is None else rule.target.format(*groups)

    def inverse_key(self, target: str) -> str:
        """Original key for a canonical HF key (the inverse of :meth:`map_key` on mapped keys)."""
        hits = [
            (c.rule, m.groups()) for c in self._rules if c.target_re is not None and (m := c.target_re.match(target))
        ]
        if len(hits) != 1:
            what = "no rule produces" if not hits else "several rules produce"
            raise ConversionError(f"{target}: {what} this canonical key")
        rule, groups = hits[0]
        return rule.source.format(*groups)

    def map_keys(self, keys: Iterable[str]) -> "KeyMapping":
        """Map every key; collect all problems first and raise once, listing them."""
        mapped: dict[str, str] = {}
        dropped: dict[str, str] = {}
        unmapped: list[str] = []
        ambiguous: list[str] = []
        plain_llava: list[str] = []
        for key in keys:
            if _PLAIN_LLAVA_PROJECTOR.match(key):
                plain_llava.append(key)
                continue
            hits = self._hits(key)
            if len(hits) != 1:
                (ambiguous if hits else unmapped).append(key)
                continue
            rule, groups = hits[0]
            if rule.target is None:
                dropped[key] = rule.name
            else:
                mapped[key] = rule.target.format(*groups)
        if plain_llava:
            raise ConversionError(
                f"{sorted(plain_llava)[0]}: this is a plain LLaVA-1.5 projector (model.mm_projector.0/.2, no "
                "clip_layernorm), not ViP-LLaVA; there is nothing to map to projector_layernorm. "
                "Convert it as Llava, or pass a ViP-LLaVA checkpoint"
            )
        if ambiguous:
            raise ConversionError(f"keys claimed by several rules: {', '.join(sorted(ambiguous))}")
        if unmapped:
            shown = ", ".join(sorted(unmapped)[:10]) + (f" (+{len(unmapped) - 10} more)" if len(unmapped) > 10 else "")
            raise ConversionError(
                f"{len(unmapped)} original key(s) match no mapping rule: {shown}; "
                "expected the ViP-LLaVA layout (model.layers.*, model.vision_tower.vision_tower.vision_model.*, "
                "model.mm_projector.{clip_layernorm,final_linear.0,final_linear.2}.*, lm_head.weight); pass an "
                "original ViP-LLaVA checkpoint as released (mucai/vip-llava-*)"
            )
        targets: dict[str, str] = {}
        for src, tgt in mapped.items():
            if tgt in targets:
                raise ConversionError(f"{src} and {targets[tgt]} both map to {tgt}")
            targets[tgt] = src
        return KeyMapping(mapped=mapped, dropped=dropped)


@dataclass(frozen=True)
class KeyMapping:
    mapped: dict[str, str]  # original -> canonical
    dropped: dict[str, str]  # original -> name of the drop rule

    def inverse(self) -> dict[str, str]:
        return {t: s for s, t in self.mapped.items()}


@lru_cache(maxsize=None)
def table_for(layer_rules: tuple[tuple[str, str, str | None], ...] = LLAMA_LAYER_RULES) -> RuleTable:
    return RuleTable(rules_for(layer_rules))


TABLE = table_for()


def map_key(key: str) -> str | None:
    return TABLE.map_key(key)


def inverse_key(target: str) -> str:
    return TABLE.inverse_key(target)


def map_keys(keys: Iterable[str]) -> KeyMapping:
    return TABLE.map_keys(keys)
