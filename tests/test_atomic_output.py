"""Atomic, idempotent output under faults: out of space, and SIGKILL at seeded random moments and at named points.

After any kill the output path holds either nothing (fresh run) or a complete output (the previous one, or with
--force the new one), never a mixture; the next run removes the killed run's temporary folder."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import os
import random
import signal
import time
from pathlib import Path

import pytest

from convert.writer import FAULT_ENV, TMP_PREFIX
from tests.conftest import run_convert


def _digests(repo: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(repo.iterdir())}


def _complete(repo: Path) -> dict:
    """The manifest of a complete output; fails if any file is missing, extra or differs from it."""
    m = json.loads((repo / "conversion.json").read_text())
    files = _digests(repo)
    files.pop("conversion.json")
    assert files == m["outputs"], f"{repo} is not a complete output"
    return m


_CHILD = """
import sys
from convert.cli import main
import convert.pipeline, tokenizers  # the slow imports, before we say ready (transformers imports lazily)
from transformers import AutoTokenizer, LlamaTokenizer, VipLlavaConfig, VipLlavaForConditionalGeneration
print("ready", flush=True)
sys.exit(main(sys.argv[1:]))
"""


def _argv(fx, output: Path, extra: list[str]) -> list[str]:
    return ["--original", str(fx.original), "--text-model", str(fx.text_model), "--vision-model", str(fx.vision_model),
            "--output", str(output), "--quiet", *extra]


def _run_child(fx, output: Path, extra: list[str], fault: str | None = None, kill_after: float | None = None):
    """Run the CLI in a fresh process; with ``kill_after``, SIGKILL it that many seconds after its imports are
    done. Returns (exit code, seconds from ready to exit)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    p = subprocess.Popen([sys.executable, "-c", _CHILD, *_argv(fx, output, extra)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert p.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    if kill_after is not None:
        try:
            p.wait(kill_after)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
    code = p.wait(300)
    return code, time.perf_counter() - t0


def _temporaries(parent: Path) -> list[Path]:
    return sorted(parent.glob(f"{TMP_PREFIX}*"))


@pytest.fixture(scope="module")
def work_seconds(tiny, tmp_path_factory):
    """How long a complete conversion takes after the imports (the window the random kills land in)."""
    code, seconds = _run_child(tiny, tmp_path_factory.mktemp("timing") / "out", [])
    assert code == 0
    return seconds


@pytest.mark.parametrize("point", ["tensor_write", "before_fsync", "before_rename"])
def test_kill_at_named_point_fresh_output(tiny, tmp_path, work_seconds, point):
    out = tmp_path / "out"
    code, _ = _run_child(tiny, out, [], fault=point)
    assert code == -signal.SIGKILL
    assert not out.exists()
    assert _temporaries(tmp_path)  # the killed run's folder is there...
    assert run_convert(tiny, out) == 0  # ...and the next run removes it
    assert _temporaries(tmp_path) == []
    _complete(out)


@pytest.mark.parametrize("point", ["tensor_write", "before_rename", "after_exchange"])
def test_kill_at_named_point_with_force(tiny, converted, tmp_path, work_seconds, point):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(converted, out)
    before = _digests(out)
    code, _ = _run_child(tiny, out, ["--force", "--seed", "1"], fault=point)
    assert code == -signal.SIGKILL
    m = _complete(out)
    if point == "after_exchange":
        assert m["settings"]["seed"] == 1  # the swap happened: the new output is complete
    else:
        assert _digests(out) == before  # the previous output, untouched
    assert run_convert(tiny, out, "--force") == 0 and _temporaries(tmp_path) == []


def test_sigkill_at_20_random_moments(tiny, converted, tmp_path, work_seconds):
    """Seeded random kill times over the conversion's work (after imports); half of the runs replace an existing
    output with --force. Every outcome must be one of: nothing, the previous output, the complete new output."""
    import shutil

    rng = random.Random(20261124)
    outcomes = {"nothing": 0, "previous": 0, "new": 0}
    killed = 0
    for i in range(20):
        out = tmp_path / f"out{i}"
        force = i % 2 == 1
        if force:
            shutil.copytree(converted, out)
            before = _digests(out)
        code, _ = _run_child(tiny, out, ["--force", "--seed", "7"] if force else [], kill_after=rng.uniform(0, 1.2 * work_seconds))
        killed += code == -signal.SIGKILL
        if not out.exists():
            assert not force, "an existing output disappeared"
            outcomes["nothing"] += 1
        else:
            m = _complete(out)
            if force and _digests(out) == before:
                outcomes["previous"] += 1
            else:
                assert m["settings"]["seed"] == (7 if force else 0)
                outcomes["new"] += 1
        assert run_convert(tiny, out, "--force") == 0
        assert not [p for p in _temporaries(tmp_path) if p.name.startswith(f"{TMP_PREFIX}out{i}-")]
    assert killed >= 10, f"only {killed} of 20 runs were killed before finishing: the kill window is wrong"
    print(f"kill outcomes: {outcomes}, killed {killed}/20, work window {work_seconds:.2f} s")


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "force"])
def test_out_of_space_is_a_clean_error(tiny, converted, tmp_path, capsys, existing, monkeypatch):
    import shutil

    out = tmp_path / "out"
    if existing:
        shutil.copytree(converted, out)
        before = _digests(out)
    monkeypatch.setenv(FAULT_ENV, "tensor_write:enospc")
    capsys.readouterr()
    code = run_convert(tiny, out, *(["--force"] if existing else []))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "No space left on device" in err and "\n" not in err, err
    assert _temporaries(tmp_path) == []
    if existing:
        assert _digests(out) == before
    else:
        assert not out.exists()


def test_same_inputs_same_seed_byte_identical_after_a_killed_run(tiny, converted, tmp_path, work_seconds):
    out = tmp_path / "out"
    assert _run_child(tiny, out, [], fault="before_rename")[0] == -signal.SIGKILL
    assert run_convert(tiny, out) == 0
    assert _digests(out) == _digests(converted)
