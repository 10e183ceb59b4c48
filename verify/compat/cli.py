"""The command line: ``python -m verify.compat REPO [--json FILE] ...`` and ``python -m verify.compat
--setup-only``. Exit 0 when every row passes (N/A rows included), 1 when any fails (an environment that cannot be
created fails its row), 2 for bad usage."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import __doc__ as _package_doc
from .envs import ENVS_VAR, setup_envs
from .judges import LOGITS_TOL
from .matrix import DEFAULT_JOBS, run_matrix
from .releases import VERSIONS, CompatUsageError, check_version


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m verify.compat",
        description=(_package_doc or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("repo", nargs="?", help="the converted repo")
    ap.add_argument(
        "--versions",
        default=",".join(VERSIONS),
        help=f"comma-separated transformers versions (default {','.join(VERSIONS)})",
    )
    ap.add_argument(
        "--envs",
        metavar="DIR",
        help=f"where the environments live (default ${ENVS_VAR} or ~/.cache/vipllava-harness/compat-envs)",
    )
    ap.add_argument("--json", metavar="FILE", help="write the matrix as JSON")
    ap.add_argument("--tol", type=float, default=LOGITS_TOL, help=f"max |logits diff| (default {LOGITS_TOL:g}, fp32)")
    ap.add_argument(
        "--no-create", action="store_true", help="use existing environments only; a missing one fails its row"
    )
    ap.add_argument(
        "--setup-only",
        action="store_true",
        help="create or reuse the environments, report their creation times, and stop",
    )
    ap.add_argument("--keep", metavar="DIR", help="keep the probes' job files, tensors and stderr in DIR")
    ap.add_argument(
        "--prompts", metavar="FILE", help="JSON list of {name, prompt, image} (default: the bundled samples)"
    )
    ap.add_argument(
        "--images", metavar="DIR", help="folder of images named by the prompts (default: the bundled samples)"
    )
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per probe (default 1800)")
    ap.add_argument(
        "--jobs",
        type=int,
        default=None,
        help=f"probes (or, with --setup-only, environment creations) run at once (default {DEFAULT_JOBS}; a probe uses "
        "one CPU)",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log = (
        (lambda msg: None) if args.quiet else (lambda msg: (sys.stderr.write(msg + "\n"), sys.stderr.flush()))
    )  # one write: threads
    try:
        versions = [check_version(v.strip()) for v in args.versions.split(",") if v.strip()]
        if not versions:
            raise CompatUsageError("--versions: no version given")
        envs = Path(args.envs).expanduser() if args.envs else None
        if args.setup_only:
            t0 = time.perf_counter()
            done = setup_envs(versions, envs, not args.no_create, args.jobs or DEFAULT_JOBS, log)
            for line, _ in done:
                print(line)
            print(f"{len(versions)} environments ready in {time.perf_counter() - t0:.1f} s")
            return 0 if all(ok for _, ok in done) else 1
        if not args.repo:
            raise CompatUsageError("give the converted repo (or --setup-only)")
        prompts = images = None
        if args.prompts or args.images:
            from ..cli import _load_images, _load_prompts
            from ..context import VerifyUsageError

            try:
                prompts = _load_prompts(args.prompts) if args.prompts else None
                images = _load_images(args.images) if args.images else None
            except VerifyUsageError as e:
                raise CompatUsageError(str(e)) from None
        m = run_matrix(
            args.repo,
            versions,
            envs,
            create=not args.no_create,
            prompts=prompts,
            images=images,
            tol=args.tol,
            keep=Path(args.keep) if args.keep else None,
            timeout=args.timeout,
            jobs=args.jobs,
            log=log,
        )
    except CompatUsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(m.table())
    if args.json:
        Path(args.json).write_text(m.to_json())
    return 0 if m.passed else 1
