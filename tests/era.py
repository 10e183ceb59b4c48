"""Where the tests find a Python running an older transformers release, to measure the reference's tokenizers
and the converted repo against the release itself (never against a copy of its code).

In order: the release's environment variable (``VIPLLAVA_TF437_PYTHON``, ``VIPLLAVA_TF431_PYTHON``) when set, else
the environment ``verify.compat`` keeps for that release, created on first use as ``tests/test_compat.py`` does
(CI makes 4.37.2 and 4.31.0 before pytest, see ``.ci/run``). When it cannot be created (offline, or
``VIPLLAVA_COMPAT_CREATE=0``) the test skips, saying why.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ERA_VARS = {"4.37.2": "VIPLLAVA_TF437_PYTHON", "4.31.0": "VIPLLAVA_TF431_PYTHON"}


def era_python(version: str) -> str:
    """A Python with transformers ``version`` (see the module text): skips the test when there is none, fails it
    when the variable names something that is not a file."""
    var = ERA_VARS[version]
    named = os.environ.get(var)
    if named:
        if not Path(named).is_file():
            pytest.fail(f"{var}={named}: not a file; unset it or name a Python with transformers {version}")
        return named
    from verify.compat.envs import EnvError, default_envs_dir, ensure_env

    try:
        return ensure_env(version, create=os.environ.get("VIPLLAVA_COMPAT_CREATE", "1") != "0").python
    except EnvError as e:
        pytest.skip(
            f"no Python with transformers {version}: {var} is unset, and no environment under {default_envs_dir()} "
            f"can be made ({e}); CI makes it with `python -m verify.compat --setup-only --versions {version}`"
        )
