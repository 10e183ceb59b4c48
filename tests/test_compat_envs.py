"""verify/compat/envs.py: when a cached environment is reused and when it is not (no environment is created here;
tests/test_compat.py runs the matrix in the real ones)."""

from __future__ import annotations

import json

import pytest

from verify.compat import envs
from verify.compat.releases import CompatUsageError, pins


def _marker(tmp_path, version: str, **change) -> None:
    path = envs.env_path(version, tmp_path)
    path.mkdir(parents=True)
    marker = {
        "format": envs.MARKER_FORMAT,
        "transformers": version,
        "pins": list(pins(version)),
        **envs._this_interpreter(),
        **change,
    }
    (path / envs.MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize(
    "version, change, why",
    [
        ("4.57.6", {"transformers": "4.51.3"}, "marker is for transformers '4.51.3'"),
        ("4.37.2", {"pins": []}, "made with no extra pins, wants ['tokenizers==0.15.1', 'sentencepiece==0.1.99']"),
        ("4.57.6", {"python": "3.9.0"}, "made by Python 3.9.0"),
        ("4.57.6", {}, "no interpreter"),  # a marker, but no venv around it
    ],
    ids=["other_version", "other_pins", "other_python", "no_interpreter"],
)
def test_a_stale_environment_is_not_reused_and_says_why(tmp_path, version, change, why):
    _marker(tmp_path, version, **change)
    ok, reason = envs.env_status(version, tmp_path)
    assert not ok and why in reason, reason
    with pytest.raises(envs.EnvError, match="^" + str(envs.env_path(version, tmp_path))):
        envs.ensure_env(version, tmp_path, create=False)


def test_setup_envs_reports_each_version(tmp_path):
    done = envs.setup_envs(["4.57.6", "5.24.0"], tmp_path, create=False, jobs=2)
    assert [ok for _, ok in done] == [False, False]
    assert done[0][0].startswith("transformers 4.57.6     FAILED: ") and "no environment" in done[0][0]
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]  # no environment made


def test_a_version_that_is_not_a_release_number_is_refused(tmp_path):
    with pytest.raises(CompatUsageError, match="'latest' is not a transformers release number"):
        envs.ensure_env("latest", tmp_path)
