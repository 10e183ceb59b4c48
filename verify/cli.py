"""``python -m verify REPO`` (``vipllava-verify``): exit 0 when every applicable check ran and passed, 1 when any
failed (or none could run), 2 for bad usage or input (one line), 130 when interrupted.

Every option, the repo's location and its kind (a VipLlava repo) are checked before torch or transformers is
imported and before any weight is read."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from convert import __version__
from convert.preflight import OneLineParser, OnInterrupt, exit_process, file_destination_problem, prog_name

from .preflight import (
    CHECK_NAMES,
    VerifyUsageError,
    audit_inputs_problem,
    check_max_new_tokens,
    check_source,
    check_vipllava_repo,
    resolve_repo,
)

DTYPE_CHOICES = ("float32-blocks", "bfloat16", "float32")


def _load_prompts(path: str) -> list[dict]:
    """A JSON list of ``{name, prompt, image}`` (a prompt string as the original saw it) or ``{name, turns, image}``
    (a conversation, rendered in the backbone's original mode once the backbone is known)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VerifyUsageError(f"--prompts {path}: unreadable ({e})") from None
    if not isinstance(data, list) or not all(isinstance(p, dict) and ("prompt" in p or "turns" in p) for p in data):
        raise VerifyUsageError(
            f'--prompts {path}: expected a JSON list of {{"name", "prompt", "image"}} or {{"name", "turns", "image"}} '
            "objects"
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


def build_parser(prog: str | None = None) -> OneLineParser:
    p = OneLineParser(
        prog=prog or prog_name("verify", "vipllava-verify"),
        description="Prove a converted VipLlava repo right against an independent re-implementation of the "
        "original ViP-LLaVA. Exit 0 when every applicable check ran and passed, 1 when one failed, "
        "2 for bad usage or input, 130 when interrupted.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s (vipllava-harness) {__version__}")
    p.add_argument(
        "repo",
        help="the repo to verify: a folder (written by python -m convert, or by any other tool: an audit) "
        "or a Hub id owner/name[@revision] (through the Hugging Face cache)",
    )
    p.add_argument(
        "--original",
        metavar="PATH|HUB_ID",
        help="original checkpoint (default: from conversion.json; required for an audit)",
    )
    p.add_argument(
        "--text-model",
        metavar="PATH|HUB_ID",
        help="base text model with the tokenizer (default: from conversion.json; required for an audit)",
    )
    p.add_argument(
        "--vision-model",
        metavar="PATH|HUB_ID",
        help="CLIP vision model (default: from conversion.json; required for an audit)",
    )
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="JSON list of {name, prompt, image} or {name, turns, image} (default: the bundled samples for the "
        "backbone)",
    )
    p.add_argument(
        "--images", metavar="DIR", help="folder of images named by the prompts (default: the bundled samples)"
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=DTYPE_CHOICES,
        help="how both models compute. float32-blocks (default for a bf16 checkpoint, i.e. every released one): "
        "weights stay as stored (bf16, read from the files), each prompt forward runs in float32 one block "
        "(layer, vision tower, head) at a time, greedy steps in bf16; logits tolerance 1e-4. bfloat16: all "
        "in bf16, tolerance 0.05. float32: weights copied to float32 (runs only if its estimated memory "
        "fits), tolerance 1e-4",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=8,
        metavar="N",
        help="tokens of greedy generation to compare, N >= 1 (default 8)",
    )
    p.add_argument(
        "--only",
        action="append",
        choices=CHECK_NAMES,
        metavar="CHECK",
        help=f"run only this check (repeatable); one of {', '.join(CHECK_NAMES)}",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def console() -> None:
    """The ``vipllava-verify`` console script."""
    exit_process(main())


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    with OnInterrupt("error: interrupted; nothing was written") as interrupt:
        try:
            return _main(argv, prog, interrupt)
        except KeyboardInterrupt:
            print(interrupt.message, file=sys.stderr)
            return 130


def _write_json(path: Path, text: str, interrupt: OnInterrupt, fault) -> None:
    """``--json``: written beside its destination, then renamed over it, so an interrupted or failed write leaves
    no partial report (a Ctrl-C meanwhile removes the temporary file). A destination that is a symlink or not a
    regular file (``/dev/stdout``, a pipe) is written through instead: renaming over it would replace it."""
    import tempfile

    from convert.preflight import current_umask

    if path.is_symlink() or (path.exists() and not path.is_file()):  # a link, /dev/stdout, a pipe: write through
        path.write_text(text)
        return
    fd, name = tempfile.mkstemp(prefix=".vipllava-report-", suffix=".tmp", dir=path.parent)
    tmp = Path(name)

    def remove_tmp() -> None:
        tmp.unlink(missing_ok=True)

    interrupt.cleanup = remove_tmp
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~current_umask())  # as a plain write would make it (mkstemp makes 0600)
        fault("report_json")
        os.replace(tmp, path)
        interrupt.message = f"error: interrupted; the report is complete at {path}"
    finally:
        remove_tmp()
        interrupt.cleanup = None


def _main(argv: list[str] | None, prog: str | None, interrupt: OnInterrupt) -> int:
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (its one line already printed)
        return e.code if isinstance(e.code, int) else 2
    try:  # before any heavy import and any work
        check_max_new_tokens(args.max_new_tokens)
        problem = file_destination_problem(args.json, "--json") if args.json else None
        if problem:
            raise VerifyUsageError(problem)
        for value, flag in (
            (args.original, "--original"),
            (args.text_model, "--text-model"),
            (args.vision_model, "--vision-model"),
        ):
            check_source(value, flag)
        prompts = _load_prompts(args.prompts) if args.prompts else None
        images = _load_images(args.images) if args.images else None
        folder, _ = resolve_repo(args.repo)
        check_vipllava_repo(folder)
        problem = audit_inputs_problem(folder, args.original, args.text_model, args.vision_model)
        if problem:
            raise VerifyUsageError(problem)
    except VerifyUsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from convert import faults

    from .api import verify_repo

    fault = faults.from_env()  # the Ctrl-C test hook (convert/faults.py), read once per run
    try:
        report = verify_repo(
            args.repo,
            original=args.original,
            text_model=args.text_model,
            vision_model=args.vision_model,
            prompts=prompts,
            images=images,
            dtype=args.dtype,
            max_new_tokens=args.max_new_tokens,
            only=args.only,
            progress=not args.quiet,
            fault=fault,
        )
    except VerifyUsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.table())
    if args.json:
        try:
            _write_json(Path(args.json).expanduser(), report.to_json(), interrupt, fault)
        except OSError as e:
            print(f"error: --json {args.json}: writing failed ({e.strerror or e})", file=sys.stderr)
            return 2
    return 0 if report.passed else 1
