"""The bundled sample inputs verification runs on by default: prompts, conversations and images.

The files are data of the ``verify.fixtures`` package (the repository's ``fixtures/`` folder, installed under that
name): ``prompts.json``, ``conversations.json`` and ``images/*.png``. Only their location is taken from that package;
no code of ``fixtures/`` is imported here (``fixtures/build.py`` builds tiny checkpoints with ``verify.tiny``, so it
sits above ``verify``: docs/architecture.md, Layers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import fixtures as _bundled  # the data folder only: its __init__ at most says where the folder is

DATA = Path(next(iter(_bundled.__path__)))
PROMPTS_JSON = DATA / "prompts.json"
CONVERSATIONS_JSON = DATA / "conversations.json"
IMAGES_DIR = DATA / "images"


def sample_prompts() -> list[dict]:
    """The committed prompts: ``{"name", "prompt", "image"}`` (image name or None), llava_v1 format."""
    return json.loads(PROMPTS_JSON.read_text(encoding="utf-8"))


def sample_conversations() -> list[dict]:
    """The committed conversations: ``{"name", "image", "turns": [{"role", "text"}, ...]}`` (image name or
    None; the last turn is ``{"role": "assistant", "text": None}``), to be rendered per backbone."""
    return json.loads(CONVERSATIONS_JSON.read_text(encoding="utf-8"))


def sample_images() -> dict[str, Any]:
    """The committed images by name (``square``, ``wide``, ``tall``, ``odd``, ``box``), RGB, loaded."""
    from PIL import Image

    out = {}
    for p in sorted(IMAGES_DIR.glob("*.png")):
        with Image.open(p) as im:
            out[p.stem] = im.convert("RGB")
    return out
