"""The one error type of the reference: the original checkpoint or one of its companion folders (base text model,
vision model) does not describe the model the original ViP-LLaVA code would have loaded."""

from __future__ import annotations


class OriginalLoadError(ValueError):
    """The original checkpoint does not match the model its config describes."""
