"""``python -m convert``: the command line around :func:`convert.pipeline.convert`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ConversionError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert an original ViP-LLaVA checkpoint into a canonical Hugging Face VipLlava repo.",
    )
    p.add_argument("--original", "--old_state_dict_id", dest="original", metavar="PATH|HUB_ID",
                   help="folder or weights file of the original checkpoint, or a Hub id (owner/name[@revision])")
    p.add_argument("--text-model", "--text_model_id", dest="text_model", metavar="PATH|HUB_ID",
                   help="base text model holding the tokenizer (optional when the original folder has one)")
    p.add_argument("--vision-model", "--vision_model_id", dest="vision_model", metavar="PATH|HUB_ID",
                   help="CLIP vision model: its config and image-processor settings (default openai/clip-vit-large-patch14-336)")
    p.add_argument("--output", "--output_hub_path", dest="output", metavar="DIR", help="folder to write (must not exist or be empty)")
    p.add_argument("--seed", type=int, default=0, help="seed for the new embedding rows (default 0)")
    p.add_argument("--dtype", default="auto", help="auto (keep the source dtype), bfloat16, float16 or float32")
    p.add_argument("--max-shard-size", default="5GB", help="largest weight shard (default 5GB)")
    p.add_argument("--backbone", default="auto", choices=["auto", "vicuna", "llama3", "phi3"],
                   help="text backbone (default: detected from the original config.json and the tokenizer)")
    p.add_argument("--force", action="store_true", help="replace an existing output (only after the new one is complete)")
    p.add_argument("--demo", metavar="DIR", help="convert the bundled tiny fixture into DIR (with --backbone llama3|phi3: that backbone's fixture)")
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON to FILE")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    hub = p.add_argument_group("publishing (see README, Publishing)")
    hub.add_argument("--push-to-hub", metavar="REPO_ID",
                     help="after converting, run the full verification and, only if every check passes, upload the folder "
                          "with a model card (README.md) and the report (verification.json) to REPO_ID in one commit; "
                          "exit 1 and send nothing when a check fails")
    hub.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    hub.add_argument("--revision", metavar="BRANCH", help="with --push-to-hub: push to this branch (created when missing)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.private or args.revision) and not args.push_to_hub:
        parser.print_usage(sys.stderr)
        print("error: --private and --revision only apply with --push-to-hub REPO_ID", file=sys.stderr)
        return 2
    if args.push_to_hub:
        from .publish import preflight

        problem = preflight(args.push_to_hub)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    from .pipeline import Options, convert

    try:
        if args.demo:
            from verify.fixtures.build import demo_fixture

            fx = demo_fixture("vicuna" if args.backbone == "auto" else args.backbone)  # --backbone picks the tiny fixture
            opts = Options(original=str(fx.original), text_model=str(fx.text_model), vision_model=str(fx.vision_model),
                           output=Path(args.demo), seed=args.seed, dtype=args.dtype, max_shard_size=args.max_shard_size, backbone=args.backbone,
                           force=args.force, progress=not args.quiet)
        else:
            if not args.original or not args.output:
                parser.print_usage(sys.stderr)
                print("error: --original and --output are required (or use --demo DIR)", file=sys.stderr)
                return 2
            opts = Options(original=args.original, text_model=args.text_model, vision_model=args.vision_model,
                           output=Path(args.output), seed=args.seed, dtype=args.dtype, max_shard_size=args.max_shard_size, backbone=args.backbone,
                           force=args.force, progress=not args.quiet)
        summary = convert(opts)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130
    print(summary.table())
    if args.json:
        data = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(summary).items()}
        Path(args.json).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    if args.push_to_hub:
        from .publish import run

        return run(summary.output, args.push_to_hub, private=args.private, revision=args.revision, progress=not args.quiet)
    return 0
