"""The transformers releases the matrix proves a repo on, and what each is expected to do with it (measured).

Kept apart on purpose from ``convert/model_card.py``, which states the same thresholds to the card's readers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The versions a converted repo is proven on, oldest first:
# - 4.37.2: the release that added VipLlava, and the original ViP-LLaVA code's pin (with tokenizers 0.15.1);
# - 4.41.2: the first line that knows Phi-3 (4.40.2 raises KeyError 'phi3'; measured), newest patch;
# - 4.44.2: the last release on tokenizers 0.19; Phi-3 needs attn_implementation="eager" on 4.41-4.44 (their
#   VipLlava asks Phi3 for sdpa, which Phi3 refuses there);
# - 4.45.2: tokenizers 0.20 (reads merges as pairs too);
# - 4.48.3: the one line whose input_ids carry the expanded <image> run but whose AutoProcessor cannot pad (recipe);
# - 4.49.0: the first with LlavaImageProcessor (do_pad), i.e. the first whose AutoProcessor pads to square;
# - 4.51.3: newest before the VLM refactor (4.52 moved the language model under ``model.``, with a load-time key
#   mapping), the 4.x line most deployed code pins; 4.57.6: the last 4.x; 5.24.0: newest 5.x on PyPI (2026-11-24).
VERSIONS = ("4.37.2", "4.41.2", "4.44.2", "4.45.2", "4.48.3", "4.49.0", "4.51.3", "4.57.6", "5.24.0")
# Packages an environment installs next to its transformers, into the environment (shadowing this interpreter's).
# transformers' own requirements pull the rest (4.37-4.44: tokenizers < 0.20, huggingface_hub < 1.0).
PINS = {
    "4.37.2": ("tokenizers==0.15.1", "sentencepiece==0.1.99"),  # as the original's requirements pin them
    "4.42.4": ("numpy==1.26.4",),  # 4.42.x requires numpy < 2 (the only release line that does)
    # Not in the matrix (no VipLlava before 4.37): the LLaVA-1.5 code's pin, whose tokenizer the reference's 4.31.0
    # era reproduces. The tests measure it there (tests/era.py); tokenizers 0.13.3 is the newest its range allows.
    "4.31.0": ("tokenizers==0.13.3", "sentencepiece==0.1.99"),
}
# What each release can do, by version (measured 2026-11-29 on the three tiny conversions, see README):
PROCESSOR_FROM = (4, 49)  # LlavaImageProcessor (do_pad): AutoProcessor pads to square with the mean colour
EXPANDED_IDS_FROM = (4, 48)  # before: one <image> per image in input_ids, the model expands it to the features
BACKBONE_FROM = {"phi3": (4, 41)}  # text_config.model_type -> first release that has it
IGNORE_MERGES_FROM = (0, 19)  # tokenizers: BPE ``ignore_merges`` (Llama-3); older releases drop the option


class CompatUsageError(Exception):
    """Bad usage (exit 2)."""


def check_version(v: str) -> str:
    if not re.fullmatch(r"\d+\.\d+\.\d+(\.?(a|b|rc|dev|post)\d+)?", v):
        raise CompatUsageError(f"--versions: {v!r} is not a transformers release number (e.g. 4.57.6)")
    return v


def version_tuple(v: str | None) -> tuple[int, ...]:
    if not v:
        return ()
    return tuple(int("".join(ch for ch in part if ch.isdigit()) or 0) for part in v.split(".")[:3])


def pins(version: str) -> tuple[str, ...]:
    return PINS.get(version, ())


@dataclass(frozen=True)
class Capabilities:
    """What a transformers release is expected to do with a converted repo (see the thresholds above)."""

    processor: bool  # AutoProcessor pads to square (LlavaImageProcessor): required; else the recipe is the way
    collapse: bool  # input_ids carry one <image> per image and the model expands it
    backbone: bool  # the release knows the text backbone


def capabilities(version: str | None, model_type: str | None = None) -> Capabilities:
    v = version_tuple(version)
    return Capabilities(
        processor=v >= PROCESSOR_FROM,
        collapse=v < EXPANDED_IDS_FROM,
        backbone=v >= BACKBONE_FROM.get(model_type or "", ()),
    )
