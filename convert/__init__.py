"""Convert original ViP-LLaVA checkpoints into canonical Hugging Face VipLlava repos."""

__version__ = "0.1.0"
