"""``python -m convert`` (``vipllava-convert``): the command line around :func:`convert.pipeline.convert`.

The one module of ``convert`` above every package of the project (docs/architecture.md, Layers): besides the
converter it reaches the bundled fixtures (``--demo``) and the ``publish`` package (``--push-to-hub``), each
imported only when its option is given.

Every option is checked before any heavy import (torch, transformers) and before any work: a bad option is
refused in a fraction of a second with one line and exit 2. Ctrl-C at any moment ends with one line and exit 130.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ConversionError
from .preflight import (
    OneLineParser,
    OnInterrupt,
    check_no_overlap,
    check_output,
    check_seed,
    exit_process,
    file_destination_problem,
    parse_size,
    prog_name,
)

DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
BACKBONE_CHOICES = ("auto", "vicuna", "llama3", "phi3")


def build_parser(prog: str | None = None) -> OneLineParser:
    p = OneLineParser(
        prog=prog or prog_name("convert", "vipllava-convert"),
        description="Convert an original ViP-LLaVA checkpoint into a canonical Hugging Face VipLlava repo. "
        "Exit 0 on success, 1 when --push-to-hub refused to push (a verification check failed), "
        "2 for bad usage or bad input (one line on stderr, nothing written), 130 when interrupted.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s (vipllava-harness) {__version__}")
    p.add_argument(
        "--original",
        "--old_state_dict_id",
        dest="original",
        metavar="PATH|HUB_ID",
        help="folder or weights file of the original checkpoint, or a Hub id (owner/name[@revision])",
    )
    p.add_argument(
        "--text-model",
        "--text_model_id",
        dest="text_model",
        metavar="PATH|HUB_ID",
        help="base text model holding the tokenizer (optional when the original folder has one)",
    )
    p.add_argument(
        "--vision-model",
        "--vision_model_id",
        dest="vision_model",
        metavar="PATH|HUB_ID",
        help="CLIP vision model: its config and image-processor settings (default openai/clip-vit-large-patch14-336)",
    )
    p.add_argument("--output", dest="output", metavar="DIR", help="local folder to write (must not exist or be empty)")
    p.add_argument("--seed", type=int, default=0, help="seed for the new embedding rows, 0 <= SEED < 2**32 (default 0)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="dtype of the written weights: auto keeps the source dtype (default)",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="largest weight shard, e.g. 5GB, 500MB, 2GiB (default 5GB)",
    )
    p.add_argument(
        "--backbone",
        default="auto",
        choices=BACKBONE_CHOICES,
        help="text backbone (default auto: detected from the original config.json and the tokenizer)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace an existing output (only after the new one is complete)"
    )
    p.add_argument(
        "--demo",
        metavar="DIR",
        help="convert the bundled tiny fixture into DIR, offline (with --backbone "
        "llama3|phi3: that backbone's fixture); takes no --original/--output",
    )
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON to FILE")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    hub = p.add_argument_group("publishing (see README, Publishing)")
    hub.add_argument(
        "--push-to-hub",
        "--output_hub_path",
        dest="push_to_hub",
        metavar="REPO_ID",
        help="after converting, run the full verification and, only if every check passes, upload the folder "
        "with a model card (README.md) and the report (verification.json) to REPO_ID in one commit; "
        "exit 1 and send nothing when a check fails (--output_hub_path, the upstream script's name, means "
        "the same; the local copy still goes to --output)",
    )
    hub.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    hub.add_argument(
        "--push-branch",
        metavar="BRANCH",
        help="with --push-to-hub: push to this branch of REPO_ID (created when missing)",
    )
    hub.add_argument("--revision", metavar="REV", help=argparse.SUPPRESS)  # refused: see _main
    return p


def _usage_error(parser: OneLineParser, message: str) -> int:
    """One line, worded like every other error of the converter."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def console() -> None:
    """The ``vipllava-convert`` console script."""
    exit_process(main())


def main(argv: list[str] | None = None, prog: str | None = None, *, hub_api: Any | None = None) -> int:
    """Run the command line; the exit code. ``hub_api``: the Hub client ``--push-to-hub`` talks to
    (``huggingface_hub.HfApi()`` when None; tests and ``bench/push.py`` pass a recording stand-in)."""
    with OnInterrupt("error: interrupted; no output was written") as interrupt:
        try:
            return _main(argv, prog, interrupt, hub_api)
        except KeyboardInterrupt:
            print(interrupt.message, file=sys.stderr)
            return 130


def _on_interrupt(output: Path) -> str | None:
    """Ctrl-C before the conversion returned: remove this run's temporary folder, and say what is at ``output``
    (this run's complete conversion once the rename or swap happened; else nothing of this run)."""
    from .atomic import own_output_in_place, remove_own_temporaries

    remove_own_temporaries(output)
    if own_output_in_place(output):
        return f"error: interrupted; the converted repo is complete at {output}"
    return None


def _flag_combination_problem(args: argparse.Namespace) -> str | None:
    """The usage error for flags that do not go together (or a missing required one), else None."""
    if args.revision is not None:
        return (
            f"--revision {args.revision}: ambiguous here (Hub tools read it as the SOURCE revision); "
            "give a source revision as owner/name@REV, and the branch to push to as --push-branch BRANCH"
        )
    if (args.private or args.push_branch) and not args.push_to_hub:
        return "--private and --push-branch only apply with --push-to-hub REPO_ID"
    if args.demo:
        given = [
            f
            for f, v in (
                ("--original", args.original),
                ("--text-model", args.text_model),
                ("--vision-model", args.vision_model),
                ("--output", args.output),
            )
            if v
        ]
        if given:
            return f"--demo DIR converts the bundled fixture into DIR; drop {', '.join(given)}"
    elif not args.original or not args.output:
        missing = " and ".join(f for f, v in (("--original", args.original), ("--output", args.output)) if not v)
        hint = (
            " (--output_hub_path is where to push; the local copy still needs --output DIR)"
            if args.push_to_hub and not args.output
            else ""
        )
        return f"{missing} required (or --demo DIR){hint}"
    return None


def _main(argv: list[str] | None, prog: str | None, interrupt: OnInterrupt, hub_api: Any | None) -> int:
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (its one line already printed)
        return e.code if isinstance(e.code, int) else 2
    problem = _flag_combination_problem(args)
    if problem:
        return _usage_error(parser, problem)
    try:  # every number and destination, before any heavy import and any work
        check_seed(args.seed)
        max_bytes = parse_size(args.max_shard_size)
        output = Path(args.demo or args.output).expanduser().absolute()
        local = {
            flag: Path(v).expanduser()
            for flag, v in (
                ("--original", args.original),
                ("--text-model", args.text_model),
                ("--vision-model", args.vision_model),
            )
            if v and Path(v).expanduser().exists()
        }
        check_no_overlap(output, local)  # before the non-empty test: --force must never be the suggested way out
        check_output(output, args.force)
        if args.json and output in Path(args.json).expanduser().absolute().parents:
            raise ConversionError(
                f"--json {args.json}: inside the output folder, where it would be a file conversion.json "
                "does not list (verify's files check would fail); write it elsewhere"
            )
        problem = file_destination_problem(args.json, "--json") if args.json else None
        if problem:
            raise ConversionError(problem)
        if args.push_to_hub:
            from publish import preflight

            problem = preflight(args.push_to_hub, api=hub_api)
            if problem:
                raise ConversionError(problem)
    except ConversionError as e:
        return _usage_error(parser, str(e))

    interrupt.cleanup = lambda: _on_interrupt(output)
    from . import faults
    from .pipeline import Options, convert

    fault = faults.from_env()  # the kill/ENOSPC/Ctrl-C test hook, read once per run

    progress = not args.quiet
    try:
        if args.demo:
            from verify.fixtures.build import demo_fixture

            log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else None
            fx = demo_fixture(
                "vicuna" if args.backbone == "auto" else args.backbone, log=log
            )  # --backbone picks the tiny fixture
            sources = {
                "original": str(fx.original),
                "text_model": str(fx.text_model),
                "vision_model": str(fx.vision_model),
            }
        else:
            sources = {"original": args.original, "text_model": args.text_model, "vision_model": args.vision_model}
        opts = Options(
            **sources,
            output=output,
            seed=args.seed,
            dtype=args.dtype,
            max_shard_size=max_bytes,
            backbone=args.backbone,
            force=args.force,
            progress=progress,
        )
        summary = convert(opts, fault=fault)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    interrupt.cleanup = None
    interrupt.message = (
        f"error: interrupted before the push completed; the converted folder stays at {summary.output}"
        if args.push_to_hub
        else f"error: interrupted; the converted repo is complete at {summary.output}"
    )
    fault("converted")
    print(summary.table())
    if args.json:
        data = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(summary).items()}
        try:
            Path(args.json).expanduser().write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        except OSError as e:
            print(
                f"error: --json {args.json}: writing failed ({e.strerror or e}); the converted repo is complete at "
                f"{summary.output}",
                file=sys.stderr,
            )
            return 2
    if args.push_to_hub:
        from publish import run

        return run(
            summary.output,
            args.push_to_hub,
            private=args.private,
            revision=args.push_branch,
            progress=progress,
            api=hub_api,
        )
    return 0
