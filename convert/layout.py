"""What transformers itself expects: canonical serialized names and shapes for a VipLlava config.

The expectation is derived from a meta-device ``VipLlavaForConditionalGeneration`` (no memory, no weights),
not from our rule table, so the table can be checked against it. Module names differ between transformers
releases (5.x nests the language model under ``model.`` and flattens ``CLIPVisionModel.vision_model``);
:func:`canonical_name` folds every release's names onto the one serialized layout all of them load.
"""

from __future__ import annotations

import re

import torch

_RULES = (
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
    (re.compile(r"^model\.vision_tower\.(?!vision_model\.)"), "vision_tower.vision_model."),
    (re.compile(r"^model\.vision_tower\.vision_model\."), "vision_tower.vision_model."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
)


def canonical_name(module_name: str) -> str:
    """A parameter name of this transformers' VipLlava module -> its canonical serialized name."""
    for pattern, repl in _RULES:
        if pattern.match(module_name):
            return pattern.sub(repl, module_name, count=1)
    return module_name  # 4.x module names are already canonical


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every persistent tensor transformers expects for ``config``."""
    from transformers import VipLlavaForConditionalGeneration

    with torch.device("meta"):
        model = VipLlavaForConditionalGeneration(config)
    return {canonical_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
