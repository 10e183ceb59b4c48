"""Atomic, idempotent output under faults: out of space, and SIGKILL at seeded random moments and at named points.

After any kill the output path holds either nothing (fresh run) or a complete output (the previous one, or with
--force the new one), never a mixture; the next run removes the killed run's temporary folder."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convert.faults import FAULT_ENV
from convert.preflight import TMP_PREFIX
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


_ZYGOTE = r"""
import json, os, sys
from convert.cli import main
import convert.pipeline, tokenizers  # the slow imports, once (no torch op has run: no thread pool to break fork)
from transformers import AutoTokenizer, LlamaTokenizer, VipLlavaConfig, VipLlavaForConditionalGeneration
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1), os.dup2(null, 2)
        if job["fault"]:
            os.environ[job["fault_env"]] = job["fault"]
        os._exit(main(job["argv"]))
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status), flush=True)
"""


class Zygote:
    """One process that has imported the converter; it forks a child per run, so a kill costs a fork, not an
    interpreter start. Children run the real CLI with the real file system."""

    def __init__(self):
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        env.pop(FAULT_ENV, None)
        self.p = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.p.stdout.readline().strip() == "ready"

    def run(self, argv: list[str], fault: str | None = None, kill_after: float | None = None) -> tuple[int, float]:
        """Returns (exit code, negative signal number when killed; seconds the child lived)."""
        self.p.stdin.write(json.dumps({"argv": argv, "fault": fault, "fault_env": FAULT_ENV}) + "\n")
        self.p.stdin.flush()
        pid = int(self.p.stdout.readline())
        t0 = time.perf_counter()
        if kill_after is not None:
            time.sleep(kill_after)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it had finished; the zygote reaps it
        code = int(self.p.stdout.readline())
        return code, time.perf_counter() - t0

    def close(self):
        self.p.stdin.close()
        self.p.wait(60)


def _argv(fx, output: Path, extra: list[str]) -> list[str]:
    return [
        "--original",
        str(fx.original),
        "--text-model",
        str(fx.text_model),
        "--vision-model",
        str(fx.vision_model),
        "--output",
        str(output),
        "--quiet",
        *extra,
    ]


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope="module")
def work_seconds(tiny, zygote, tmp_path_factory):
    """How long a complete conversion takes in a forked child (the window the random kills land in)."""
    times = []
    for i in range(3):  # the first run is cold; the window is the fastest complete run
        code, seconds = zygote.run(_argv(tiny, tmp_path_factory.mktemp("timing") / f"out{i}", []))
        assert code == 0
        times.append(seconds)
    return min(times)


def _run_child(
    fx, output: Path, extra: list[str], zygote: Zygote, fault: str | None = None, kill_after: float | None = None
):
    return zygote.run(_argv(fx, output, extra), fault=fault, kill_after=kill_after)


def _temporaries(parent: Path) -> list[Path]:
    return sorted(parent.glob(f"{TMP_PREFIX}*"))


@pytest.mark.slow  # SIGKILLs converter runs (CI runs the slow tier)
@pytest.mark.parametrize("point", ["tensor_write", "before_fsync", "before_rename"])
def test_kill_at_named_point_fresh_output(tiny, tmp_path, zygote, work_seconds, point):
    out = tmp_path / "out"
    code, _ = _run_child(tiny, out, [], zygote, fault=point)
    assert code == -signal.SIGKILL
    assert not out.exists()
    assert _temporaries(tmp_path)  # the killed run's folder is there...
    assert run_convert(tiny, out) == 0  # ...and the next run removes it
    assert _temporaries(tmp_path) == []
    _complete(out)


@pytest.mark.slow  # SIGKILLs converter runs (CI runs the slow tier)
@pytest.mark.parametrize("point", ["tensor_write", "before_rename", "after_exchange"])
def test_kill_at_named_point_with_force(tiny, converted, tmp_path, zygote, work_seconds, point):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(converted, out)
    before = _digests(out)
    code, _ = _run_child(tiny, out, ["--force", "--seed", "1"], zygote, fault=point)
    assert code == -signal.SIGKILL
    m = _complete(out)
    if point == "after_exchange":
        assert m["settings"]["seed"] == 1  # the swap happened: the new output is complete
    else:
        assert _digests(out) == before  # the previous output, untouched
    assert run_convert(tiny, out, "--force") == 0 and _temporaries(tmp_path) == []


@pytest.mark.slow  # SIGKILLs converter runs (CI runs the slow tier)
def test_sigkill_at_20_random_moments(tiny, converted, tmp_path, zygote, work_seconds):
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
        code, _ = _run_child(
            tiny, out, ["--force", "--seed", "7"] if force else [], zygote, kill_after=rng.uniform(0, work_seconds)
        )
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


@pytest.mark.slow  # SIGKILLs converter runs (CI runs the slow tier)
def test_same_inputs_same_seed_byte_identical_after_a_killed_run(tiny, converted, tmp_path, zygote, work_seconds):
    out = tmp_path / "out"
    assert _run_child(tiny, out, [], zygote, fault="before_rename")[0] == -signal.SIGKILL
    assert run_convert(tiny, out) == 0
    assert _digests(out) == _digests(converted)
