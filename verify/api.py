"""The library entry point: :func:`verify_repo` runs every check and returns a :class:`~verify.report.Report`."""

from __future__ import annotations

import time
from pathlib import Path

from .checks import ALL_CHECKS
from .context import Context
from .report import FAIL, Check, Report


def verify_repo(
    repo: str | Path,
    original: str | None = None,
    text_model: str | None = None,
    vision_model: str | None = None,
    prompts: list[dict] | None = None,
    images: dict | None = None,
    dtype: str | None = None,
    max_new_tokens: int = 8,
    only: list[str] | None = None,
    progress: bool = True,
    memory_limit: int | None = None,
) -> Report:
    """Verify a converted repo against the independent reference of the original. Raises
    :class:`~verify.context.VerifyUsageError` for bad usage or unreadable input, and when the run's estimated
    memory exceeds ``memory_limit`` (default: MemAvailable). ``dtype`` None: the checkpoint's own (bf16)."""
    from tqdm.auto import tqdm

    ctx = Context(Path(repo), original=original, text_model=text_model, vision_model=vision_model,
                  prompts=prompts, images=images, dtype=dtype, max_new_tokens=max_new_tokens, only=only,
                  memory_limit=memory_limit)
    report = Report(repo=str(repo), settings={"dtype": ctx.dtype_name, "dtype_source": ctx.dtype_source, "memory_estimate": ctx.memory,
                                              "inputs": {k: str(v) for k, v in vars(ctx.inputs).items()},
                                              "backbone": ctx.backbone, "conv_mode": ctx.conv_mode,
                                              "prompts": [p["name"] for p in ctx.prompts], "max_new_tokens": max_new_tokens})
    report.environment = _environment()
    selected = [(n, f) for n, f in ALL_CHECKS if only is None or n in only]
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bar
    for name, fn in tqdm(selected, desc="verifying", disable=not progress, leave=False):
        t0 = time.perf_counter()
        try:
            result = fn(ctx)
        except Exception as e:  # a check that cannot even run has failed; say why
            result = Check(name, FAIL, f"could not run: {e.__class__.__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        result.seconds = time.perf_counter() - t0
        report.checks.append(result)
    report.settings["phase_seconds"] = {k: round(v, 3) for k, v in sorted(ctx.timings.items())}
    return report


def _environment() -> dict:
    import platform

    import torch
    import transformers

    from convert import __version__

    return {"tool": f"vipllava-harness {__version__}", "transformers": transformers.__version__,
            "torch": torch.__version__.split("+")[0], "python": platform.python_version()}
