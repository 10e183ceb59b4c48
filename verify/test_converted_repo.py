"""One test per verification check, for ``pytest --pyargs verify.test_converted_repo --vipllava-repo PATH``
(the options and the ``vipllava_context`` fixture come from the ``verify.pytest_plugin`` plugin)."""

from __future__ import annotations

import pytest

from verify.checks import ALL_CHECKS
from verify.report import FAIL


@pytest.mark.parametrize("check", [fn for _, fn in ALL_CHECKS], ids=[name for name, _ in ALL_CHECKS])
def test_check(check, vipllava_context):
    result = check(vipllava_context)
    assert result.status != FAIL, "\n".join([f"{result.name}: {result.summary}", *result.details])
