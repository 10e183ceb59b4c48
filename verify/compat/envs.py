"""The per-version virtual environments: created once, cached, reused while they still match.

``python -m venv --system-site-packages --without-pip`` (torch, numpy, pillow, safetensors, sentencepiece, protobuf
and pip itself come from this interpreter's site-packages), then ``pip install transformers==X`` plus that release's
:data:`~verify.compat.releases.PINS`, with a constraints file pinning this environment's torch (and the other shared
packages, unless pinned) so pip never pulls another torch; what a release needs in another version (tokenizers <
0.20, huggingface_hub < 1.0, ...) is installed INTO the environment and shadows the shared one. An env is reused
while its marker file, pins and live ``transformers`` version match. Default location: ``$VIPLLAVA_COMPAT_ENVS`` or
``~/.cache/vipllava-harness/compat-envs``; pip's cache is shared by all. :func:`setup_envs` is ``--setup-only``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .releases import check_version, pins
from .text import tail

ENVS_VAR = "VIPLLAVA_COMPAT_ENVS"
MARKER = "vipllava-compat.json"
MARKER_FORMAT = 1
# Packages the envs take from this interpreter; pinned in the constraints file so pip keeps them.
SHARED = ("torch", "numpy", "safetensors", "pillow", "sentencepiece", "protobuf")


class EnvError(Exception):
    """An environment could not be created or is not usable."""


def default_envs_dir() -> Path:
    v = os.environ.get(ENVS_VAR)
    return Path(v).expanduser() if v else Path.home() / ".cache" / "vipllava-harness" / "compat-envs"


def env_path(version: str, envs_dir: Path) -> Path:
    return Path(envs_dir) / f"transformers-{version}"


def env_python(path: Path) -> Path:
    return path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _dist_version(name: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _this_interpreter() -> dict:
    return {
        "python": sys.version.split()[0],
        "base_executable": os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
        "torch": _dist_version("torch"),
    }


def _constraints(version: str) -> str:
    lines = []
    pinned = {pin.partition("==")[0] for pin in pins(version)}
    for name in SHARED:
        v = _dist_version(name) if name not in pinned else None
        if v:
            lines.append(f"{name}=={v.split('+')[0]}")  # 2.13.0 matches the installed 2.13.0+cpu
    return "\n".join(lines) + "\n"


def _live_versions(python: Path, timeout: float = 120) -> dict:
    """transformers' version and where torch comes from, as the env's interpreter sees them."""
    code = (
        "import importlib.metadata as m, json\n"
        "def v(n):\n"
        "    try:\n        d = m.distribution(n); return [d.version, str(d.locate_file(''))]\n"
        "    except m.PackageNotFoundError:\n        return None\n"
        "print(json.dumps({n: v(n) for n in ('transformers', 'torch', 'tokenizers', 'huggingface_hub', 'numpy', "
        "'sentencepiece')}))"
    )
    p = subprocess.run([str(python), "-I", "-c", code], capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise EnvError(f"{python}: does not run ({tail(p.stderr, 1)})")
    return json.loads(p.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX: no lock
            pass
        yield


@dataclass
class EnvInfo:
    version: str
    path: str
    python: str
    created: bool  # created now (False: reused)
    create_seconds: float  # how long creating it took (now, or when it was created)
    venv_seconds: float = 0.0
    pip_seconds: float = 0.0
    packages: dict = field(default_factory=dict)


def _read_marker(path: Path) -> dict | None:
    try:
        m = json.loads((path / MARKER).read_text())
        return m if isinstance(m, dict) else None
    except (OSError, ValueError):
        return None


def env_status(version: str, envs_dir: Path) -> tuple[bool, str]:
    """(usable, why not): the marker matches this interpreter and the env really has transformers ``version``."""
    path = env_path(version, envs_dir)
    m = _read_marker(path)
    if m is None:
        return False, f"{path}: no environment (or no {MARKER})"
    me = _this_interpreter()
    if m.get("format") != MARKER_FORMAT or m.get("transformers") != version:
        return False, f"{path}: marker is for transformers {m.get('transformers')!r}"
    if list(m.get("pins") or []) != list(pins(version)):
        return False, f"{path}: made with {m.get('pins') or 'no extra pins'}, wants {list(pins(version)) or 'none'}"
    if m.get("python") != me["python"] or m.get("base_executable") != me["base_executable"]:
        return (
            False,
            f"{path}: made by Python {m.get('python')} at {m.get('base_executable')}, this is {me['python']} at "
            f"{me['base_executable']}",
        )
    if not env_python(path).exists():
        return False, f"{path}: no interpreter"
    try:
        live = _live_versions(env_python(path))
    except (EnvError, OSError, ValueError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    if (live.get("transformers") or [None])[0] != version:
        return False, f"{path}: has transformers {(live.get('transformers') or [None])[0]}, wants {version}"
    if (live.get("torch") or [None])[0] != me["torch"]:
        return False, f"{path}: sees torch {(live.get('torch') or [None])[0]}, this environment has {me['torch']}"
    return True, ""


def ensure_env(version: str, envs_dir: Path | None = None, create: bool = True, log=None) -> EnvInfo:
    """The virtual environment for transformers ``version``: reused when valid, else (re)created. Raises
    :class:`EnvError` when it is missing and ``create`` is False, or when creating it fails."""
    check_version(version)
    envs_dir = Path(envs_dir) if envs_dir else default_envs_dir()
    path = env_path(version, envs_dir)
    log = log or (lambda msg: None)
    with _locked(envs_dir / f".transformers-{version}.lock"):
        ok, why = env_status(version, envs_dir)
        if ok:
            return _reused(version, path)
        if not create:
            raise EnvError(why)
        if _dist_version("torch") is None:
            raise EnvError(
                "torch is not installed in this environment; install it first (pip install torch==2.13.0) "
                "so the compat environments share it instead of downloading another"
            )
        log(f"creating {path} (transformers {version}) ...")
        return _create(version, path, log)


def _reused(version: str, path: Path) -> EnvInfo:
    m = _read_marker(path)
    assert m is not None  # env_status found the marker
    return EnvInfo(
        version,
        str(path),
        str(env_python(path)),
        False,
        m.get("create_seconds", 0.0),
        m.get("venv_seconds", 0.0),
        m.get("pip_seconds", 0.0),
        m.get("packages", {}),
    )


def _create(version: str, path: Path, log) -> EnvInfo:
    """A new environment at ``path`` (any old one removed): venv, pip install, checks, then the marker."""
    if path.exists():
        shutil.rmtree(path)
    t0 = time.perf_counter()
    _make_venv(path)
    t1 = time.perf_counter()
    _pip_install(version, path)
    t2 = time.perf_counter()
    live = _check_installed(version, path)
    seconds = t2 - t0
    marker = {
        "format": MARKER_FORMAT,
        "transformers": version,
        "pins": list(pins(version)),
        **_this_interpreter(),
        "create_seconds": round(seconds, 2),
        "venv_seconds": round(t1 - t0, 2),
        "pip_seconds": round(t2 - t1, 2),
        "packages": {k: (v or [None])[0] for k, v in live.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (path / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    log(f"created {path} in {seconds:.1f} s (venv {t1 - t0:.1f} s, pip {t2 - t1:.1f} s)")
    return EnvInfo(
        version,
        str(path),
        str(env_python(path)),
        True,
        round(seconds, 2),
        round(t1 - t0, 2),
        round(t2 - t1, 2),
        marker["packages"],
    )


def _make_venv(path: Path) -> None:
    # --without-pip: the env runs this interpreter's pip (it sees the system site-packages) and installs into
    # itself; skipping ensurepip saves ~15 s per environment
    p = subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)],
        capture_output=True,
        text=True,
    )
    if p.returncode:
        raise EnvError(f"python -m venv {path} failed: {tail(p.stderr)}")
    if sys.prefix != sys.base_prefix:  # we run inside a venv: share ITS site-packages, not only the base's
        _share_site_packages(path)


def _pip_install(version: str, path: Path) -> None:
    (path / "constraints.txt").write_text(_constraints(version))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # --no-compile: byte-compiling all of transformers doubled pip's CPU time (measured); the probe's first import
    # compiles just the modules it uses
    p = subprocess.run(
        [
            str(env_python(path)),
            "-m",
            "pip",
            "install",
            "--no-input",
            "--no-compile",
            "-c",
            str(path / "constraints.txt"),
            f"transformers=={version}",
            *pins(version),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if p.returncode:
        raise EnvError(
            f"pip install transformers=={version} {' '.join(pins(version))} failed: {tail(p.stdout + p.stderr)}"
        )


def _check_installed(version: str, path: Path) -> dict:
    """What pip left: the pins, transformers ``version`` and this environment's torch (not its own); the live
    versions."""
    for pin in pins(version):
        name, _, want = pin.partition("==")
        have = (_live_versions(env_python(path)).get(name.replace("-", "_")) or [None])[0]
        if want and have != want:
            raise EnvError(f"{path}: pip left {name} {have}, wanted {want}")
    live = _live_versions(env_python(path))
    got = (live.get("transformers") or [None])[0]
    if got != version:
        raise EnvError(f"{path}: pip left transformers {got}, wanted {version}")
    torch_at = (live.get("torch") or [None, ""])[1]
    if torch_at and Path(torch_at).resolve().is_relative_to(path.resolve()):
        raise EnvError(
            f"{path}: pip installed its own torch ({live['torch'][0]}) instead of sharing this environment's"
        )
    return live


def _share_site_packages(path: Path) -> None:
    import site
    import sysconfig

    dirs = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()})
    p = subprocess.run(
        [str(env_python(path)), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
    )
    target = Path(p.stdout.strip())
    lines = [f"import site; site.addsitedir({d!r})" for d in dirs if Path(d).is_dir()]
    (target / "_vipllava_parent_env.pth").write_text("\n".join(lines) + "\n")


def setup_envs(versions, envs_dir: Path | None, create: bool, jobs: int, log=None) -> list[tuple[str, bool]]:
    """``--setup-only``: create or reuse each version's environment, ``jobs`` at once; one line per version (how
    long it took to create, or why it failed) and whether it is usable."""

    def setup(v: str) -> tuple[str, bool]:
        try:
            info = ensure_env(v, envs_dir, create=create, log=log)
            return f"transformers {v:<10} {_how(info)}  {info.path}", True
        except EnvError as e:
            return f"transformers {v:<10} FAILED: {e}", False

    with ThreadPoolExecutor(max_workers=max(1, min(len(versions), jobs))) as pool:
        return list(pool.map(setup, versions))  # pip downloads and unpacks: mostly waiting, so in parallel


def _how(info: EnvInfo) -> str:
    if not info.created:
        return f"cached (created in {info.create_seconds:.1f} s)"
    return f"created in {info.create_seconds:.1f} s (venv {info.venv_seconds:.1f} s, pip {info.pip_seconds:.1f} s)"
