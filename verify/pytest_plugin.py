"""A pytest plugin so a user's CI can gate a push on the checks, one test per check:

    pytest --pyargs verify.test_converted_repo --vipllava-repo path/to/converted

Options: ``--vipllava-repo`` (required), ``--vipllava-original``, ``--vipllava-text-model``,
``--vipllava-vision-model`` (defaults from the repo's conversion.json), ``--vipllava-dtype``.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("vipllava", "verification of a converted VipLlava repo")
    group.addoption("--vipllava-repo", help="the converted repo to verify")
    group.addoption("--vipllava-original", help="original checkpoint (default: from conversion.json)")
    group.addoption("--vipllava-text-model", help="base text model (default: from conversion.json)")
    group.addoption("--vipllava-vision-model", help="vision model (default: from conversion.json)")
    group.addoption("--vipllava-dtype", default=None, help="bfloat16 or float32 (default: the checkpoint's own dtype)")


@pytest.fixture(scope="session")
def vipllava_context(request):
    """The shared verification context for the repo given with ``--vipllava-repo``."""
    from .context import Context, VerifyUsageError

    opt = request.config.getoption
    repo = opt("--vipllava-repo")
    if not repo:
        raise pytest.UsageError("verify.test_converted_repo needs --vipllava-repo PATH")
    try:
        return Context(
            repo,
            original=opt("--vipllava-original"),
            text_model=opt("--vipllava-text-model"),
            vision_model=opt("--vipllava-vision-model"),
            dtype=opt("--vipllava-dtype"),
        )
    except VerifyUsageError as e:
        raise pytest.UsageError(str(e)) from None
