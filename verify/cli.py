"""``python -m verify REPO``: exit 0 when every check passes, 1 when any fails, 2 for bad usage or input."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .context import VerifyUsageError


def _load_prompts(path: str) -> list[dict]:
    """A JSON list of ``{name, prompt, image}`` (a prompt string as the original saw it) or ``{name, turns, image}``
    (a conversation, rendered in the backbone's original mode once the backbone is known)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VerifyUsageError(f"--prompts {path}: unreadable ({e})") from None
    if not isinstance(data, list) or not all(isinstance(p, dict) and ("prompt" in p or "turns" in p) for p in data):
        raise VerifyUsageError(
            f"--prompts {path}: expected a JSON list of {{\"name\", \"prompt\", \"image\"}} or {{\"name\", \"turns\", \"image\"}} objects"
        )
    out = []
    for i, p in enumerate(data):
        entry = {"name": p.get("name", f"prompt{i}"), "image": p.get("image")}
        entry.update({k: p[k] for k in ("prompt", "turns") if k in p})
        out.append(entry)
    return out


def _load_images(path: str) -> dict:
    from PIL import Image

    d = Path(path)
    if not d.is_dir():
        raise VerifyUsageError(f"--images {path}: not a folder")
    out = {}
    for f in sorted(d.iterdir()):
        if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
            with Image.open(f) as im:
                out[f.stem] = im.convert("RGB") if im.mode not in ("RGB", "RGBA", "L", "P") else im.copy()
    if not out:
        raise VerifyUsageError(f"--images {path}: no images found")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m verify", description="Prove a converted VipLlava repo right against an independent re-implementation of the original ViP-LLaVA.")
    p.add_argument("repo", help="the converted repo (a folder written by python -m convert)")
    p.add_argument("--original", metavar="PATH|HUB_ID", help="original checkpoint (default: from conversion.json)")
    p.add_argument("--text-model", metavar="PATH|HUB_ID", help="base text model with the tokenizer (default: from conversion.json)")
    p.add_argument("--vision-model", metavar="PATH|HUB_ID", help="CLIP vision model (default: from conversion.json)")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--prompts", metavar="FILE", help="JSON list of {name, prompt, image} or {name, turns, image} (default: the bundled samples for the backbone)")
    p.add_argument("--images", metavar="DIR", help="folder of images named by the prompts (default: the bundled samples)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                   help="compute dtype of both models (default: the checkpoint's own, bfloat16 for the released ones; logits "
                        "tolerance 0.05 in bfloat16, 1e-4 in float32); float32 runs only if its estimated memory fits")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens of greedy generation to compare (default 8)")
    p.add_argument("--only", action="append", help="run only this check (repeatable)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    from .api import verify_repo

    try:
        prompts = _load_prompts(args.prompts) if args.prompts else None
        images = _load_images(args.images) if args.images else None
        report = verify_repo(args.repo, original=args.original, text_model=args.text_model, vision_model=args.vision_model,
                             prompts=prompts, images=images, dtype=args.dtype, max_new_tokens=args.max_new_tokens,
                             only=args.only, progress=not args.quiet)
    except VerifyUsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.table())
    if args.json:
        Path(args.json).write_text(report.to_json())
    return 0 if report.passed else 1
