"""The library entry point: :func:`verify_repo` runs the checks and returns a :class:`~verify.report.Report`.

Everything the caller passes is checked before any work (check names, numbers, where the repo is, that it is a
VipLlava repo at all), raising :class:`~verify.preflight.VerifyUsageError`; only then is anything loaded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from convert.faults import Fault, no_fault

from .checks import ALL_CHECKS
from .context import Context
from .preflight import check_max_new_tokens, check_only, check_source, check_vipllava_repo, resolve_repo
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
    fault: Fault = no_fault,
) -> Report:
    """Verify a converted repo against the independent reference of the original.

    ``repo`` is a folder or a Hub id ``owner/name[@revision]`` (through huggingface_hub and its cache). A repo
    without ``conversion.json`` (written by another tool) is AUDITED: ``original``, ``text_model`` and
    ``vision_model`` must be given, the checks that need the record report N/A with the reason, and the report
    says it was an audit. ``only``: a non-empty list of check names (``verify.preflight.CHECK_NAMES``).
    ``dtype`` None: the checkpoint's own (bf16 for the released checkpoints). Raises
    :class:`~verify.preflight.VerifyUsageError` for bad usage or unreadable input, and when the run's estimated
    memory exceeds ``memory_limit`` (default: MemAvailable). ``fault``: the test hook of :mod:`convert.faults`,
    called as each check starts (``check:<name>``)."""
    only = check_only(only)
    check_max_new_tokens(max_new_tokens)
    for value, flag in ((original, "--original"), (text_model, "--text-model"), (vision_model, "--vision-model")):
        check_source(value, flag)
    folder, commit = resolve_repo(repo)
    check_vipllava_repo(folder)
    from tqdm.auto import tqdm

    from .compute import return_large_buffers_to_the_system

    heap = return_large_buffers_to_the_system()

    ctx = Context(
        folder,
        original=original,
        text_model=text_model,
        vision_model=vision_model,
        prompts=prompts,
        images=images,
        dtype=dtype,
        max_new_tokens=max_new_tokens,
        only=only,
        memory_limit=memory_limit,
    )
    audit = None
    if ctx.manifest is None:
        audit = f"{repo} has no conversion.json (not written by this tool); the original inputs were given explicitly"
    settings = {
        "dtype": ctx.dtype_name,
        "dtype_source": ctx.dtype_source,
        "memory_estimate": ctx.memory,
        "inputs": {k: str(v) for k, v in vars(ctx.inputs).items()},
        "backbone": ctx.backbone,
        "conv_mode": ctx.conv_mode,
        "prompts": [p["name"] for p in ctx.prompts],
        "max_new_tokens": max_new_tokens,
        "large_buffers_mapped": heap,
    }
    if str(folder) != str(repo):
        settings.update(repo_path=str(folder), repo_revision=commit)
    report = Report(repo=str(repo), settings=settings, audit=audit)
    report.environment = _environment()
    selected = [(n, f) for n, f in ALL_CHECKS if only is None or n in only]
    # The bar names the running check; no time estimate (the checks differ in cost by orders of magnitude).
    with (
        _no_transformers_bars(),
        tqdm(
            total=len(selected),
            disable=not progress,
            leave=False,
            desc=selected[0][0],
            bar_format="verify: {desc} ({n_fmt}/{total_fmt} done, {elapsed})",
        ) as bar,
    ):
        for name, fn in selected:
            bar.set_description_str(name)
            fault(f"check:{name}")
            t0 = time.perf_counter()
            try:
                result = fn(ctx)
            except Exception as e:  # a check that cannot even run has failed; say why
                result = Check(
                    name,
                    FAIL,
                    f"could not run: {e.__class__.__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                )
            result.seconds = time.perf_counter() - t0
            report.checks.append(result)
            bar.update(1)
    report.settings["phase_seconds"] = {k: round(v, 3) for k, v in sorted(ctx.timings.items())}
    if ctx.page_cache:
        report.settings["page_cache"] = ctx.page_cache
    return report


@contextmanager
def _no_transformers_bars() -> Iterator[None]:
    """transformers' own bars (``Loading weights``) would be left above the table: off while verifying."""
    from transformers.utils import logging as tlog

    was = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tlog.enable_progress_bar()


def _environment() -> dict:
    import platform

    import torch
    import transformers

    from convert import __version__

    return {
        "tool": f"vipllava-harness {__version__}",
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
        "python": platform.python_version(),
    }
