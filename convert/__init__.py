"""Convert original ViP-LLaVA checkpoints into canonical Hugging Face VipLlava repos."""

__version__ = "0.1.0"

MANIFEST = "conversion.json"
"""The manifest every converted repo carries: settings, input and output hashes (written last, by the pipeline)."""
