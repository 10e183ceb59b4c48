"""The image side of the original model: the multilayer CLIP features and the projector, restated.

``llava/model/multimodal_encoder/clip_4layer_encoder.py`` (``CLIPVisionTowerMultilayer.feature_select``: hidden
states [-2, -5, -8, -11, 6] of the tower run with all hidden states, CLS dropped, concatenated on channels) and
``llava/model/multimodal_projector/builder.py`` (``SimpleFeatureSingleModel``: LayerNorm(eps 1e-5) ->
``mlp2x_gelu``), the projector written with ``torch.nn.functional``.  The tower itself is transformers'
``CLIPVisionModel``, as in the original.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from transformers import CLIPVisionModel

FEATURE_LAYERS: tuple[int, ...] = (-2, -5, -8, -11, 6)
PROJECTOR_EPS = 1e-5  # nn.LayerNorm default in SimpleFeatureSingleModel


def vision_hidden_states(vision: CLIPVisionModel, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All hidden states of the CLIP tower (embeddings output + one per encoder layer)."""
    # float32 pixels: the tower's patch embedding casts them to its own weights' dtype (CLIPVisionEmbeddings)
    out = vision(pixel_values=pixel_values.float(), output_hidden_states=True)
    hs = out.hidden_states
    if hs is None or len(hs) != vision.config.num_hidden_layers + 1:
        raise RuntimeError("CLIPVisionModel did not return all hidden states")
    return tuple(hs)


def select_and_project(
    hs: Sequence[torch.Tensor], projector: Mapping[str, torch.Tensor], eps: float = PROJECTOR_EPS
) -> torch.Tensor:
    """The hidden states at :data:`FEATURE_LAYERS` without CLS, concatenated, through the projector."""
    feats = torch.cat([hs[i][:, 1:] for i in FEATURE_LAYERS], dim=-1)
    # in the dtype the tower computed in (float32 when its blocks are upcast around bf16 weights)
    p = {k: v.to(feats.dtype) for k, v in projector.items()}
    x = F.layer_norm(feats, (feats.shape[-1],), p["clip_layernorm.weight"], p["clip_layernorm.bias"], eps)
    x = F.linear(x, p["final_linear.0.weight"], p["final_linear.0.bias"])
    x = F.gelu(x)  # nn.GELU() default: exact erf form
    return F.linear(x, p["final_linear.2.weight"], p["final_linear.2.bias"])
