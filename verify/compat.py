"""``python -m verify.compat REPO``: does a converted repo load and compute the same on every transformers release
since VipLlava exists (4.37.2, the original ViP-LLaVA code's pin) up to 5.x?

For every transformers version in :data:`VERSIONS` an isolated virtual environment is created (or reused) and
:mod:`verify.compat_probe` runs INSIDE it: it loads the repo with ``VipLlavaForConditionalGeneration``,
``AutoTokenizer`` and ``AutoProcessor``, records what that version actually read, runs its processor and the
no-processor recipe on the sample prompts and images, and runs the model (logits and greedy tokens) on the CURRENT
environment's processor output. The current environment runs the same probe first and is the reference. A row
passes when:

- the model loads with 0 missing / 0 unexpected / 0 mismatched keys;
- every setting that version read equals the repo's files (``vision_feature_layers``, ``image_seq_length``, the pad
  and ``<image>`` ids, the processor's ``patch_size`` / ``num_additional_image_tokens`` /
  ``vision_feature_select_strategy``, the image processor's ``do_pad``, sizes, mean and std, ...) and the
  reference's reading of everything else: nothing silently ignored;
- its tokenizer (``AutoTokenizer``, and ``use_fast=False`` where that is a different implementation) gives the
  reference's ids, pieces and decoded text on the probe strings and prompts, with sentencepiece's ``▁`` piece
  right after ``<image>`` (``<image>\\nWhat`` -> ``▁`` ``<0x0A>`` ...; ``<image> What`` -> ``▁`` ``▁What``), and the
  same chat-template text;
- from 4.49 (:data:`PROCESSOR_FROM`): its ``AutoProcessor`` gives the reference's ``input_ids`` and ``pixel_values``
  (max |diff| <= 1e-5) and each ``<image>`` expands to ``image_seq_length`` tokens. Before 4.49 no processor pads
  to square; the row lists why under "cannot" (not a failure) and the recipe carries it;
- the recipe (pad to square with the mean colour, ``CLIPImageProcessor``, one ``<image>`` per image before 4.48, the
  expanded run from 4.48) gives the reference's ``pixel_values`` (<= 1e-5), ``input_ids`` (each ``<image>``
  counted as ``image_seq_length`` where the model expands it) and logits (<= 1e-5). Required before 4.49; from
  4.49 it still runs, and a difference is a note (the processor is the way there);
- max |logits - reference logits| <= 1e-5 (fp32) on every prompt, same inputs (one ``<image>`` per run before
  4.48), and the same :data:`NEW_TOKENS` greedy tokens.

Each row also says what that release cannot do, measured: no pad-to-square processor; its default attention
failing (Phi-3 on 4.41-4.44: load with ``attn_implementation="eager"``); a tokenizer option it drops (Llama-3's
``ignore_merges`` on tokenizers < 0.19). A release that does not know the backbone (Phi-3 before 4.41) gives an
N/A row naming the error, not a failure.

Environments: ``python -m venv --system-site-packages --without-pip`` (torch, numpy, pillow, safetensors,
sentencepiece, protobuf and pip itself come from this interpreter's site-packages), then ``pip install
transformers==X`` plus that release's :data:`PINS`, with a constraints file pinning this environment's torch (and
the other shared packages, unless pinned) so pip never pulls another torch; what a release needs in another
version (tokenizers < 0.20, huggingface_hub < 1.0, ...) is installed INTO the environment and shadows the shared
one. An env is reused while its marker file, pins and live ``transformers`` version match. Default location:
``$VIPLLAVA_COMPAT_ENVS`` or ``~/.cache/vipllava-harness/compat-envs``; pip's cache is shared by all.

Exit 0 when every row passes (N/A rows included), 1 when any fails (an environment that cannot be created fails
its row), 2 for bad usage. ``--setup-only`` creates or reuses the environments (``--jobs`` at once) and runs
nothing else (CI does this before pytest).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .report import first_difference_index, json_safe

# The versions a converted repo is proven on, oldest first:
# - 4.37.2: the release that added VipLlava, and the original ViP-LLaVA code's pin (with tokenizers 0.15.1);
# - 4.41.2: the first line that knows Phi-3 (4.40.2 raises KeyError 'phi3'; measured), newest patch;
# - 4.44.2: the last release on tokenizers 0.19; Phi-3 needs attn_implementation="eager" on 4.41-4.44 (their
#   VipLlava asks Phi3 for sdpa, which Phi3 refuses there);
# - 4.45.2: tokenizers 0.20 (reads merges as pairs too);
# - 4.48.3: the one line whose input_ids carry the expanded <image> run but whose AutoProcessor cannot pad (recipe);
# - 4.49.0: the first with LlavaImageProcessor (do_pad), i.e. the first whose AutoProcessor pads to square;
# - 4.51.3: newest before the VLM refactor (4.52 moved the language model under ``model.``, with a load-time key
#   mapping), the 4.x line most deployed code pins; 4.57.6: the last 4.x; 5.24.0: newest 5.x on PyPI (2026-11-24).
VERSIONS = ("4.37.2", "4.41.2", "4.44.2", "4.45.2", "4.48.3", "4.49.0", "4.51.3", "4.57.6", "5.24.0")
# Packages an environment installs next to its transformers, into the environment (shadowing this interpreter's).
# transformers' own requirements pull the rest (4.37-4.44: tokenizers < 0.20, huggingface_hub < 1.0).
PINS = {
    "4.37.2": ("tokenizers==0.15.1", "sentencepiece==0.1.99"),  # as the original's requirements pin them
    "4.42.4": ("numpy==1.26.4",),  # 4.42.x requires numpy < 2 (the only release line that does)
}
# What each release can do, by version (measured 2026-11-29 on the three tiny conversions, see README):
PROCESSOR_FROM = (4, 49)  # LlavaImageProcessor (do_pad): AutoProcessor pads to square with the mean colour
EXPANDED_IDS_FROM = (4, 48)  # before: one <image> per image in input_ids, the model expands it to the features
BACKBONE_FROM = {"phi3": (4, 41)}  # text_config.model_type -> first release that has it
IGNORE_MERGES_FROM = (0, 19)  # tokenizers: BPE ``ignore_merges`` (Llama-3); older releases drop the option
NEW_TOKENS = 8  # greedy tokens compared per prompt
DEFAULT_JOBS = 2  # probes at once (each runs torch on one thread)
LOGITS_TOL = 1e-5  # fp32, same inputs, same torch: only kernel-order differences are allowed
PIXEL_TOL = 1e-5
ENVS_VAR = "VIPLLAVA_COMPAT_ENVS"
MARKER = "vipllava-compat.json"
MARKER_FORMAT = 1
# Packages the envs take from this interpreter; pinned in the constraints file so pip keeps them.
SHARED = ("torch", "numpy", "safetensors", "pillow", "sentencepiece", "protobuf")
PROBE = Path(__file__).with_name("compat_probe.py")

# Strings every version must tokenize identically (ids, pieces and decoded text); the sample prompts are added.
TOKEN_PROBES = [
    "<image>\nWhat",
    "<image> What",
    "<image>What",
    "USER: <image>\nWhat is this? ASSISTANT:",
    " What",
    "Hello world",
    "a</s>USER: b",
    "  two  spaces  ",
    "line one\nline two",
    "trailing space ",
    "<pad> and <unk>",
    "caf\u00e9 na\u00efve \u4e2d\u6587",
]
# The dummy-prefix checks: (probe, expected pieces right after <image>: "▁" then a piece starting with "▁" ...)
DUMMY_PREFIX = {"<image>\nWhat": ["\u2581", "<0x0A>"], "<image> What": ["\u2581", "\u2581*"]}
CHAT_PROBES = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]}],
    [
        {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A box."}]},
        {"role": "user", "content": [{"type": "text", "text": "What colour?"}]},
    ],
]
TEXT_CHAT_PROBES = [
    [{"role": "user", "content": "Hello?"}],
    [
        {"role": "user", "content": "<image>\nWhat?"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Sure?"},
    ],
]


class CompatUsageError(Exception):
    """Bad usage (exit 2)."""


class EnvError(Exception):
    """An environment could not be created or is not usable."""


# ------------------------------------------------------------------------------------------------------------
# environments
# ------------------------------------------------------------------------------------------------------------
def default_envs_dir() -> Path:
    v = os.environ.get(ENVS_VAR)
    return Path(v).expanduser() if v else Path.home() / ".cache" / "vipllava-harness" / "compat-envs"


def check_version(v: str) -> str:
    if not re.fullmatch(r"\d+\.\d+\.\d+(\.?(a|b|rc|dev|post)\d+)?", v):
        raise CompatUsageError(f"--versions: {v!r} is not a transformers release number (e.g. 4.57.6)")
    return v


def version_tuple(v: str | None) -> tuple[int, ...]:
    if not v:
        return ()
    return tuple(int("".join(ch for ch in part if ch.isdigit()) or 0) for part in v.split(".")[:3])


def pins(version: str) -> tuple[str, ...]:
    return PINS.get(version, ())


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
        raise EnvError(f"{python}: does not run ({_tail(p.stderr, 1)})")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _tail(text: str, n: int = 12) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip() and "is ignored: it is neither" not in ln]
    return " | ".join(lines[-n:])


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
        if not create:
            raise EnvError(why)
        if _dist_version("torch") is None:
            raise EnvError(
                "torch is not installed in this environment; install it first (pip install torch==2.13.0) "
                "so the compat environments share it instead of downloading another"
            )
        log(f"creating {path} (transformers {version}) ...")
        if path.exists():
            shutil.rmtree(path)
        t0 = time.perf_counter()
        # --without-pip: the env runs this interpreter's pip (it sees the system site-packages) and installs into
        # itself; skipping ensurepip saves ~15 s per environment
        p = subprocess.run(
            [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)],
            capture_output=True,
            text=True,
        )
        if p.returncode:
            raise EnvError(f"python -m venv {path} failed: {_tail(p.stderr)}")
        if sys.prefix != sys.base_prefix:  # we run inside a venv: share ITS site-packages, not only the base's
            _share_site_packages(path)
        t1 = time.perf_counter()
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
        t2 = time.perf_counter()
        if p.returncode:
            raise EnvError(
                f"pip install transformers=={version} {' '.join(pins(version))} failed: {_tail(p.stdout + p.stderr)}"
            )
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


# ------------------------------------------------------------------------------------------------------------
# probes
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Probe:
    """What one environment's probe reported: result.json as a dict plus its tensors (``own_ids_<i>``,
    ``own_pixels_<i>``, ``logits_<i>``); ``error`` when the probe could not run at all."""

    label: str
    result: dict = field(default_factory=dict)
    tensors: dict = field(default_factory=dict)
    error: str | None = None
    env: dict = field(default_factory=dict)
    seconds: float = 0.0


def _probe_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "TRANSFORMERS_VERBOSITY": "error",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
            "PYTHONWARNINGS": "ignore",
        }
    )
    return env


def run_probe(
    label: str,
    python: str | Path,
    repo: Path,
    work: Path,
    prompts: list[dict],
    image_files: dict,
    inputs: Path | None,
    timeout: float = 1800,
    collapse: bool = False,
    new_tokens: int = NEW_TOKENS,
) -> Probe:
    cfg = _read(Path(repo), "config.json")
    out = work / re.sub(r"[^A-Za-z0-9._-]", "_", label)
    out.mkdir(parents=True, exist_ok=True)
    job = {
        "repo": str(Path(repo).absolute()),
        "prompts": prompts,
        "images": {k: str(v) for k, v in image_files.items()},
        "token_probes": TOKEN_PROBES + [p["prompt"] for p in prompts],
        "chat_probes": CHAT_PROBES,
        "text_chat_probes": TEXT_CHAT_PROBES,
        "inputs": str(inputs) if inputs else None,
        "out": str(out),
        "collapse_image_tokens": collapse,
        "new_tokens": new_tokens,
        "image_token_id": cfg.get("image_token_index", cfg.get("image_token_id")),
        "image_seq_length": cfg.get("image_seq_length"),
    }
    (out / "job.json").write_text(json.dumps(job, indent=1, ensure_ascii=False))
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            [str(python), "-I", str(PROBE), str(out / "job.json")],
            capture_output=True,
            text=True,
            env=_probe_env(),
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return Probe(label, error=f"probe timed out after {timeout:.0f} s", seconds=time.perf_counter() - t0)
    except OSError as e:
        return Probe(label, error=f"probe could not start: {e}", seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    (out / "stderr.txt").write_text(p.stderr)
    if p.returncode or not (out / "result.json").is_file():
        return Probe(label, error=f"probe exited {p.returncode}: {_tail(p.stderr, 3)}", seconds=seconds)
    result = json.loads((out / "result.json").read_text())
    with np.load(out / "tensors.npz") as z:
        tensors = {k: z[k] for k in z.files}
    return Probe(label, result=result, tensors=tensors, seconds=seconds)


# ------------------------------------------------------------------------------------------------------------
# what the files say, and the verdict
# ------------------------------------------------------------------------------------------------------------
def _read(repo: Path, name: str) -> dict:
    try:
        obj = json.loads((repo / name).read_text())
        return obj if isinstance(obj, dict) else {}
    except (OSError, ValueError):
        return {}


def expected_settings(repo: Path) -> dict:
    """The values each version must read, straight from the repo's files (only keys the files have)."""
    repo = Path(repo)
    cfg, gen, tokc = (
        _read(repo, "config.json"),
        _read(repo, "generation_config.json"),
        _read(repo, "tokenizer_config.json"),
    )
    proc = _read(repo, "processor_config.json")
    pre = _read(repo, "preprocessor_config.json") or proc.get("image_processor") or {}
    tc, vc = cfg.get("text_config") or {}, cfg.get("vision_config") or {}
    want = {
        "config.vision_feature_layers": cfg.get("vision_feature_layers"),
        "config.image_seq_length": cfg.get("image_seq_length"),
        "config.image_token_index": cfg.get("image_token_index", cfg.get("image_token_id")),
        "config.pad_token_id": cfg.get("pad_token_id"),
        "config.projector_hidden_act": cfg.get("projector_hidden_act"),
        "config.projector_layernorm_eps": cfg.get("projector_layernorm_eps"),
        "text_config.pad_token_id": tc.get("pad_token_id"),
        "text_config.vocab_size": tc.get("vocab_size"),
        "text_config.rms_norm_eps": tc.get("rms_norm_eps"),
        "text_config.rope_theta": tc.get("rope_theta", (tc.get("rope_parameters") or {}).get("rope_theta")),
        "text_config.max_position_embeddings": tc.get("max_position_embeddings"),
        "vision_config.image_size": vc.get("image_size"),
        "vision_config.patch_size": vc.get("patch_size"),
        "vision_config.hidden_act": vc.get("hidden_act"),
        "generation_config.bos_token_id": gen.get("bos_token_id"),
        "generation_config.eos_token_id": gen.get("eos_token_id"),
        "generation_config.pad_token_id": gen.get("pad_token_id"),
        "model.dtype": "float32",
        "tokenizer.pad_token_id": cfg.get("pad_token_id"),
        "tokenizer.image_token_id": cfg.get("image_token_index", cfg.get("image_token_id")),
        "tokenizer.bos_token_id": gen.get("bos_token_id") if isinstance(gen.get("bos_token_id"), int) else None,
        "tokenizer.eos_token_id": gen.get("eos_token_id") if isinstance(gen.get("eos_token_id"), int) else None,
        "tokenizer.padding_side": tokc.get("padding_side"),
        "tokenizer.model_max_length": tokc.get("model_max_length"),
    }
    for k in ("patch_size", "num_additional_image_tokens", "vision_feature_select_strategy", "image_token"):
        want[f"processor.{k}"] = proc.get(k)
    for k in (
        "do_pad",
        "do_resize",
        "size",
        "resample",
        "do_center_crop",
        "crop_size",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "do_convert_rgb",
    ):
        want[f"image_processor.{k}"] = pre.get(k)
    try:
        bpe = json.loads((repo / "tokenizer.json").read_text(encoding="utf-8")).get("model") or {}
    except (OSError, ValueError, AttributeError):
        bpe = {}
    want["tokenizer_json.ignore_merges"] = bpe.get("ignore_merges") if isinstance(bpe, dict) else None
    return {k: v for k, v in want.items() if v is not None}


@dataclass(frozen=True)
class Capabilities:
    """What a transformers release is expected to do with a converted repo (see the thresholds at the top)."""

    processor: bool  # AutoProcessor pads to square (LlavaImageProcessor): required; else the recipe is the way
    collapse: bool  # input_ids carry one <image> per image and the model expands it
    backbone: bool  # the release knows the text backbone


def capabilities(version: str | None, model_type: str | None = None) -> Capabilities:
    v = version_tuple(version)
    return Capabilities(
        processor=v >= PROCESSOR_FROM,
        collapse=v < EXPANDED_IDS_FROM,
        backbone=v >= BACKBONE_FROM.get(model_type or "", ()),
    )


def same(a, b) -> bool:
    """Equal as settings: numbers numerically (floats to 1e-6 relative), lists and dicts element-wise."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@dataclass
class Row:
    label: str
    transformers: str | None
    env: dict
    load_ok: bool
    missing: int | None
    unexpected: int | None
    mismatched: int | None
    settings_ok: bool
    tokenizer_ok: bool
    processor_ok: bool
    image_tokens: list[int]
    image_tokens_ok: bool
    logits_max_diff: float | None
    logits_ok: bool
    pixel_max_diff: float | None
    passed: bool
    details: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth knowing, not failures
    loading_info: dict = field(default_factory=dict)  # the full missing / unexpected / mismatched key lists
    classes: dict = field(default_factory=dict)
    seconds: float = 0.0
    greedy_ok: bool = False  # the same NEW_TOKENS greedy tokens as the reference on every prompt
    recipe_ok: bool = False  # the recipe gives the reference's ids (expanded), pixel_values and logits
    recipe_logits_max_diff: float | None = None
    recipe_pixel_max_diff: float | None = None
    processor_required: bool = True  # False below 4.49: its processor's failure is a "cannot", not a FAIL
    needs_eager: bool | None = None  # the default attention fails to load or run, eager works
    applicable: bool = True  # False: the release does not know the backbone (the row says so; not a failure)
    cannot: list[str] = field(default_factory=list)  # what this release cannot do, measured (not failures)

    @property
    def verdict(self) -> str:
        return "N/A" if not self.applicable else "PASS" if self.passed else "FAIL"


def _runs(ids: np.ndarray, token: int) -> list[int]:
    runs, n = [], 0
    for t in list(ids) + [None]:
        if t == token:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def _short(v, n: int = 80) -> str:
    s = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _first_difference(a, b, context: int = 24) -> str:
    """Where two sequences (token lists or strings) first differ, with a little context, for a detail line."""
    a = a if a is not None else []
    b = b if b is not None else []
    i = first_difference_index(a, b)
    lo = max(0, i - context // 3)
    return f"at {i}: {_short(a[lo : i + context])} vs reference {_short(b[lo : i + context])}"


def _sentence(text, n: int = 200) -> str:
    """The first sentence of an error message, at most ``n`` characters (the full text is in the probe's JSON)."""
    text = str(text)
    cut = text.find(". ")
    text = text[: cut + 1] if 0 < cut else text
    return text if len(text) <= n else text[: n - 3] + "..."


def _squash(text) -> str:
    return " ".join(str(text).split())


def _check_tokenizer(
    name: str,
    tok: dict | None,
    ref: dict | None,
    details: list[str],
    notes: list[str] | None = None,
    loose_decode: bool = False,
) -> bool:
    """ids and pieces must equal the reference's; decoded text too, except that with ``loose_decode`` (4.x's slow
    LlamaTokenizer, whose legacy decode drops the dummy-prefix space and respaces around special tokens) a
    whitespace-only difference is a note, not a failure."""
    ok = True
    if tok is None:
        return False
    if ref is not None:
        for mine, theirs in zip(tok.get("probes", []), ref.get("probes", []), strict=False):
            for what in ("ids", "tokens", "decoded"):
                if mine.get(what) == theirs.get(what):
                    continue
                if what == "decoded" and loose_decode and _squash(mine.get(what)) == _squash(theirs.get(what)):
                    if notes is not None:
                        notes.append(
                            f"{name}: decoded {mine['text'][:30]!r} differs in whitespace only "
                            f"({_first_difference(mine.get(what), theirs.get(what), 12)})"
                        )
                    continue
                ok = False
                details.append(
                    f"{name}: {what} of {mine['text'][:30]!r} differ "
                    f"{_first_difference(mine.get(what), theirs.get(what))}"
                )
                break
        if len(tok.get("probes", [])) != len(ref.get("probes", [])):
            ok = False
            details.append(
                f"{name}: {len(tok.get('probes', []))} probe strings, reference {len(ref.get('probes', []))}"
            )
        if tok.get("chat") != ref.get("chat"):
            ok = False
            details.append(
                f"{name}: chat template renders {_short(tok.get('chat'))}, reference {_short(ref.get('chat'))}"
            )
    # sentencepiece's dummy prefix after <image> (Llama-style vocabularies only: pieces spelled with "▁")
    probes = {p["text"]: p for p in tok.get("probes", [])}
    spm = any(t.startswith("\u2581") for p in probes.values() for t in p.get("tokens") or [] if isinstance(t, str))
    if spm:
        for text, want in DUMMY_PREFIX.items():
            p = probes.get(text)
            if p is None:
                continue
            toks = p.get("tokens") or []
            after = toks[toks.index("<image>") + 1 :][: len(want)] if "<image>" in toks else []
            good = len(after) == len(want) and all(
                (t.startswith(w[:-1]) and len(t) > 1) if w.endswith("*") else t == w
                for t, w in zip(after, want, strict=True)
            )
            if not good:
                ok = False
                details.append(
                    f"{name}: {text!r} gives {after} after <image>; the original (chunked sentencepiece) gives "
                    f"{[w.replace('*', '...') for w in want]}"
                )
    return ok


def _max_diff(a, b) -> float:
    d = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
    return d if math.isfinite(d) else math.inf


def _expand(ids: np.ndarray, token, n) -> np.ndarray:
    """Each ``token`` in ``ids`` repeated ``n`` times (what the model does with a collapsed <image>)."""
    return np.repeat(ids, np.where(ids == token, int(n), 1)) if token is not None and n else ids


def judge(  # noqa: C901 - one verdict over many independent probe fields
    probe: Probe,
    ref: Probe,
    expected: dict,
    prompts: list[dict],
    tol: float = LOGITS_TOL,
    pixel_tol: float = PIXEL_TOL,
    model_type: str | None = None,
) -> Row:
    """The verdict on one environment's probe, against the files (``expected``) and the reference probe.

    What the release is expected to do comes from :func:`capabilities`: below 4.49 its ``AutoProcessor`` cannot
    pad to square, so a processor failure there is listed under ``cannot`` and the recipe must pass instead; a
    release that does not know the backbone gives an N/A row that says so (when its model load really fails)."""
    r = probe.result or {}
    version = (r.get("versions") or {}).get("transformers") or probe.label
    cap = capabilities(version, model_type)
    cannot: list[str] = []
    details: list[str] = []
    env = probe.env
    if probe.error:
        details.append(probe.error)
    steps, errors = r.get("steps", {}), r.get("errors", {})
    if not cap.backbone and not probe.error and not steps.get("model", {}).get("ok", False):
        return Row(
            label=probe.label,
            transformers=version,
            env=probe.env,
            load_ok=False,
            missing=None,
            unexpected=None,
            mismatched=None,
            settings_ok=False,
            tokenizer_ok=False,
            processor_ok=False,
            image_tokens=[],
            image_tokens_ok=False,
            logits_max_diff=None,
            logits_ok=False,
            pixel_max_diff=None,
            passed=True,
            applicable=False,
            seconds=round(probe.seconds, 2),
            cannot=[
                f"transformers {version} does not know {model_type} "
                f"({errors.get('model', 'the model does not load')}); "
                f"the first release that does is {'.'.join(map(str, BACKBONE_FROM[model_type or '']))}"
            ],
        )
    quiet = set() if cap.processor else {"processor"}  # expected to fail there: reported under "cannot"
    for name, err in sorted(errors.items()):
        if name == "model_default_attention":
            continue
        (cannot if name in quiet else details).append(f"{'AutoProcessor' if name in quiet else name}: {_sentence(err)}")

    # model load
    load_ok = not probe.error and steps.get("model", {}).get("ok", False)
    li = r.get("loading_info") or {}
    counts = {k: (len(li[k]) if k in li else None) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    for k, n in counts.items():
        if n:
            details.append(f"{n} {k.replace('_', ' ')}: {', '.join(li[k][:3])}{' ...' if n > 3 else ''}")
    if li.get("error_msgs"):
        details.append(f"load errors: {'; '.join(li['error_msgs'][:2])}")
    keys_ok = load_ok and all(n == 0 for n in counts.values()) and not li.get("error_msgs")

    # settings: the files, then the reference's reading of everything else
    got, ref_settings = r.get("settings") or {}, (ref.result or {}).get("settings") or {}
    settings_ok = not probe.error
    for k, want in expected.items():
        if k in got and not same(got[k], want):
            settings_ok = False
            details.append(f"reads {k} = {_short(got[k])}, the files say {_short(want)}")
    for k in sorted(set(ref_settings) & set(got) - set(expected)):
        if not same(got[k], ref_settings[k]):
            settings_ok = False
            details.append(f"reads {k} = {_short(got[k])}, reference reads {_short(ref_settings[k])}")

    # tokenizer
    ref_tok = (ref.result or {}).get("tokenizer")
    tokenizer_ok = not probe.error and steps.get("tokenizer", {}).get("ok", False)
    tokenizer_ok = _check_tokenizer("tokenizer", r.get("tokenizer"), ref_tok, details) and tokenizer_ok
    if steps.get("tokenizer_slow", {}).get("ok") is False:
        tokenizer_ok = False
    notes: list[str] = []
    if expected.get("tokenizer_json.ignore_merges") is True and r.get("tokenizer") is not None:
        kept = (r["tokenizer"].get("bpe_options") or {}).get("ignore_merges")
        if kept is not True:
            tv = (r.get("versions") or {}).get("tokenizers")
            cannot.append(
                f"tokenizer: tokenizers {tv} drops the BPE option ignore_merges (tokenizer.json says true; "
                f"it arrived in {'.'.join(map(str, IGNORE_MERGES_FROM))}): a word that is in the vocabulary but "
                "not reachable by merges is split into smaller pieces (588 of the 128000 words of the real "
                "Llama-3 vocabulary, measured); transformers 4.40+ comes with tokenizers 0.19+"
            )
    if r.get("tokenizer_slow") is not None:
        tokenizer_ok = (
            _check_tokenizer(
                "tokenizer(use_fast=False)", r["tokenizer_slow"], ref_tok, details, notes, loose_decode=True
            )
            and tokenizer_ok
        )

    # processor: own ids and pixels against the reference's, chat template, image tokens
    processor_ok = not probe.error and steps.get("processor", {}).get("ok", False)
    image_id = expected.get("config.image_token_index")
    seq = expected.get("config.image_seq_length")
    runs_all: list[int] = []
    image_tokens_ok = processor_ok
    pix_max: float | None = None
    details_before_processor = len(details)
    if processor_ok:
        rp = (ref.result or {}).get("processor") or {}
        if r["processor"].get("chat") != rp.get("chat"):
            processor_ok = False
            details.append(
                f"processor: chat template renders {_short(r['processor'].get('chat'))}, reference "
                f"{_short(rp.get('chat'))}"
            )
        pix_max = 0.0
        for i, p in enumerate(prompts):
            mine, theirs = probe.tensors.get(f"own_ids_{i}"), ref.tensors.get(f"own_ids_{i}")
            if mine is None:
                processor_ok = False
                details.append(f"processor: no input_ids for {p['name']}")
                continue
            if theirs is not None and (mine.shape != theirs.shape or not np.array_equal(mine, theirs)):
                processor_ok = False
                details.append(
                    f"processor: input_ids of {p['name']} differ from the reference ({len(mine)} vs {len(theirs)} "
                    "tokens)"
                )
            n_img = p["prompt"].count("<image>") if p.get("image") else 0
            runs = _runs(mine, image_id) if image_id is not None else []
            runs_all.extend(runs)
            if len(runs) != n_img or (seq is not None and any(x != seq for x in runs)):
                image_tokens_ok = False
                details.append(
                    f"processor: {p['name']}: {n_img} <image> became runs of {runs} image tokens, expected {n_img} x "
                    f"{seq}"
                )
            a, b = probe.tensors.get(f"own_pixels_{i}"), ref.tensors.get(f"own_pixels_{i}")
            if (a is None) != (b is None) or (a is not None and b is not None and a.shape != b.shape):
                processor_ok = False
                details.append(
                    f"processor: pixel_values of {p['name']}: shape {None if a is None else a.shape} vs reference "
                    f"{None if b is None else b.shape}"
                )
            elif a is not None and b is not None:
                d = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
                d = d if math.isfinite(d) else math.inf
                pix_max = max(pix_max, d)
        if pix_max > pixel_tol:
            processor_ok = False
            details.append(f"processor: pixel_values max |diff| {pix_max:.3g} > {pixel_tol:g}")
    if not cap.processor and not (processor_ok and image_tokens_ok):
        # an AutoProcessor that loads but does not pad / expand like the reference is as unusable as one that fails
        cannot.extend(f"AutoProcessor: {d.removeprefix('processor: ')}" for d in details[details_before_processor:])
        del details[details_before_processor:]
        cannot.append(
            f"AutoProcessor with pad-to-square needs transformers {'.'.join(map(str, PROCESSOR_FROM))}+ "
            f"(LlavaImageProcessor); on {version} use the recipe (pad to square with the mean colour, "
            "CLIPImageProcessor, "
            f"{'one <image> per image' if cap.collapse else 'image_seq_length <image> tokens per image'})"
        )
        runs_all = []

    # logits on the reference's inputs
    logits_ok = load_ok and steps.get("forward", {}).get("ok", False)
    max_diff: float | None = None
    if logits_ok:
        max_diff = 0.0
        for i, p in enumerate(prompts):
            a, b = probe.tensors.get(f"logits_{i}"), ref.tensors.get(f"logits_{i}")
            if a is None or b is None or a.shape != b.shape:
                logits_ok = False
                max_diff = math.inf
                details.append(
                    f"logits of {p['name']}: shape {None if a is None else a.shape} vs reference "
                    f"{None if b is None else b.shape}"
                )
                continue
            max_diff = max(max_diff, _max_diff(a, b))
        if max_diff > tol:
            logits_ok = False
            details.append(f"logits max |diff| {max_diff:.3g} > {tol:g}")

    # greedy tokens on the reference's inputs
    greedy_ok = load_ok and steps.get("greedy", {}).get("ok", False)
    if greedy_ok:
        for i, p in enumerate(prompts):
            a, b = probe.tensors.get(f"greedy_{i}"), ref.tensors.get(f"greedy_{i}")
            if a is None or b is None or a.tolist() != b.tolist():
                greedy_ok = False
                details.append(
                    f"greedy tokens of {p['name']}: {None if a is None else a.tolist()}, reference "
                    f"{None if b is None else b.tolist()}"
                )
    elif load_ok and "greedy" not in steps:
        details.append("greedy: not run")

    # the recipe (pad to square, CLIPImageProcessor, <image> collapsed or expanded): the reference's ids (expanded
    # as the model does), pixel_values and logits
    recipe_ok = (
        not probe.error
        and steps.get("recipe", {}).get("ok", False)
        and steps.get("recipe_forward", {}).get("ok", False)
    )
    rec_logits = rec_pix = None
    details_before_recipe = len(details)
    if recipe_ok:
        rec_logits = rec_pix = 0.0
        for i, p in enumerate(prompts):
            ids, want = probe.tensors.get(f"recipe_ids_{i}"), ref.tensors.get(f"own_ids_{i}")
            n_img = p["prompt"].count("<image>") if p.get("image") else 0
            runs = _runs(ids, image_id) if ids is not None and image_id is not None else []
            if len(runs) != n_img or any(x != (1 if cap.collapse else seq) for x in runs):
                recipe_ok = False
                details.append(
                    f"recipe: {p['name']}: {n_img} <image> became runs of {runs}, expected {n_img} x "
                    f"{1 if cap.collapse else seq}"
                )
            if (
                ids is None
                or want is None
                or not np.array_equal(_expand(ids, image_id, seq) if cap.collapse else ids, want)
            ):
                recipe_ok = False
                details.append(
                    f"recipe: input_ids of {p['name']} differ from the reference's"
                    f"{' (each <image> counted as ' + str(seq) + ')' if cap.collapse else ''}"
                )
            a, b = probe.tensors.get(f"recipe_pixels_{i}"), ref.tensors.get(f"own_pixels_{i}")
            if (a is None) != (b is None) or (a is not None and b is not None and a.shape != b.shape):
                recipe_ok = False
                details.append(
                    f"recipe: pixel_values of {p['name']}: shape {None if a is None else a.shape} vs reference "
                    f"{None if b is None else b.shape}"
                )
            elif a is not None and b is not None:
                rec_pix = max(rec_pix, _max_diff(a, b))
            a, b = probe.tensors.get(f"recipe_logits_{i}"), ref.tensors.get(f"logits_{i}")
            if a is None or b is None or a.shape != b.shape:
                recipe_ok = False
                rec_logits = math.inf
                details.append(
                    f"recipe: logits of {p['name']}: shape {None if a is None else a.shape} vs reference "
                    f"{None if b is None else b.shape}"
                )
            else:
                rec_logits = max(rec_logits, _max_diff(a, b))
            if not cap.processor:
                runs_all.extend(runs)  # the row's image tokens are the recipe's where the processor is not used
        if rec_pix > pixel_tol:
            recipe_ok = False
            details.append(f"recipe: pixel_values max |diff| {rec_pix:.3g} > {pixel_tol:g}")
        if rec_logits > tol:
            recipe_ok = False
            details.append(f"recipe: logits max |diff| {rec_logits:.3g} > {tol:g}")
    if cap.processor:  # the processor is the way here: the recipe is run and reported, not required
        notes.extend(f"not needed on {version}: {d}" for d in details[details_before_recipe:])
        del details[details_before_recipe:]
        notes.extend(
            f"not needed on {version}: recipe: {_sentence(errors[k])}"
            for k in ("recipe", "recipe_forward")
            if k in errors
        )
        details[:] = [d for d in details if not d.startswith(("recipe: ", "recipe_forward: "))]

    # the release's default attention
    needs_eager = None
    if "model_default_attention" in steps:
        needs_eager = load_ok and not steps["model_default_attention"].get("ok", False)
        if needs_eager:
            cannot.append(
                f"default attention: {_sentence(errors.get('model_default_attention'))} Load with "
                'attn_implementation="eager"'
            )
        elif not load_ok and not steps["model_default_attention"].get("ok", False):
            details.append(f"model_default_attention: {errors.get('model_default_attention')}")

    processor_pass = (processor_ok and image_tokens_ok) or not cap.processor
    passed = bool(
        keys_ok
        and settings_ok
        and tokenizer_ok
        and processor_pass
        and logits_ok
        and greedy_ok
        and (recipe_ok or cap.processor)
        and not probe.error
    )
    classes = {
        "tokenizer": (r.get("tokenizer") or {}).get("class"),
        "tokenizer_use_fast_false": (r.get("tokenizer_slow") or {}).get("class"),
        "processor": (r.get("processor") or {}).get("class"),
        "image_processor": (r.get("processor") or {}).get("image_processor_class"),
    }
    return Row(
        label=probe.label,
        transformers=(r.get("versions") or {}).get("transformers"),
        env=env,
        load_ok=bool(load_ok),
        missing=counts["missing_keys"],
        unexpected=counts["unexpected_keys"],
        mismatched=counts["mismatched_keys"],
        settings_ok=settings_ok,
        tokenizer_ok=bool(tokenizer_ok),
        processor_ok=bool(processor_ok),
        image_tokens=runs_all,
        image_tokens_ok=bool(image_tokens_ok),
        logits_max_diff=max_diff,
        logits_ok=bool(logits_ok),
        pixel_max_diff=pix_max,
        passed=passed,
        details=details,
        notes=notes,
        loading_info=li,
        classes=classes,
        seconds=round(probe.seconds, 2),
        greedy_ok=bool(greedy_ok),
        recipe_ok=bool(recipe_ok),
        recipe_logits_max_diff=rec_logits,
        recipe_pixel_max_diff=rec_pix,
        processor_required=cap.processor,
        needs_eager=needs_eager,
        cannot=cannot,
    )


# ------------------------------------------------------------------------------------------------------------
# the matrix
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Matrix:
    repo: str
    reference: Row
    rows: list[Row]
    tolerance: float
    seconds: float
    reference_versions: dict = field(default_factory=dict)
    model_type: str | None = None  # text_config.model_type (llama, phi3)

    @property
    def passed(self) -> bool:
        return self.reference.passed and all(r.passed for r in self.rows)

    def table(self) -> str:
        head = [
            "transformers",
            "env",
            "load",
            "keys m/u/x",
            "settings",
            "tokenizer",
            "processor",
            "recipe",
            "image tokens",
            "max|logits diff|",
            "greedy",
            "attention",
            "verdict",
        ]
        lines_ = []
        for row in [self.reference, *self.rows]:
            e = row.env
            if row is self.reference:
                env_s = "this python"
            elif e.get("error"):
                env_s = "unavailable"
            else:
                env_s = f"{'new' if e.get('created') else 'cached'} {e.get('create_seconds', 0):.1f}s"
            uniq = sorted(set(row.image_tokens))
            diff = (
                "-"
                if row.logits_max_diff is None
                else ("0" if row.logits_max_diff == 0 else f"{row.logits_max_diff:.2e}")
            )
            if row is self.reference and row.logits_max_diff is not None:
                diff = "(reference)"
            label = f"{row.transformers} (current)" if row is self.reference else row.label
            if not row.applicable:
                lines_.append([label, env_s, "n/a", "-", "-", "-", "-", "-", "-", "-", "-", "-", row.verdict])
                continue
            processor = (
                _ok(row.processor_ok and row.image_tokens_ok)
                if row.processor_required or row.processor_ok
                else "cannot"
            )
            if not row.recipe_ok:
                recipe = "FAIL" if not row.processor_required else "differs (not needed)"
            else:
                recipe = "ok" if not row.recipe_logits_max_diff else f"ok {row.recipe_logits_max_diff:.1e}"
            tokens = "-" if not uniq else ",".join(map(str, uniq))
            if not row.processor_required:  # the recipe's ids
                tokens += " (recipe, model expands)" if capabilities(row.transformers).collapse else " (recipe)"
            elif not row.image_tokens_ok:
                tokens += " FAIL"
            keys = f"{_n(row.missing)}/{_n(row.unexpected)}/{_n(row.mismatched)}"
            attention = "-" if row.needs_eager is None else "eager only" if row.needs_eager else "default"
            cells = [
                label,
                env_s,
                _ok(row.load_ok),
                keys,
                _ok(row.settings_ok),
                _ok(row.tokenizer_ok),
                processor,
                recipe,
                tokens,
                diff,
                _ok(row.greedy_ok),
                attention,
                row.verdict,
            ]
            lines_.append(cells)
        widths = [max(len(str(c)) for c in col) for col in zip(head, *lines_, strict=True)]
        fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
        out = [
            f"compat {self.repo}  (reference: this environment; logits tolerance {self.tolerance:g} fp32)",
            fmt(head),
            "-" * (sum(widths) + 2 * (len(widths) - 1)),
        ]
        for row, cells in zip([self.reference, *self.rows], lines_, strict=True):
            out.append(fmt(cells))
            for d in row.details[:8]:
                out.append(f"    - {d}")
            if len(row.details) > 8:
                out.append(f"    - ... {len(row.details) - 8} more (see --json)")
            for c in row.cannot:
                out.append(f"    cannot: {c}")
            if row.notes:
                out.append(
                    f"    note: {row.notes[0]}"
                    + (f" (+{len(row.notes) - 1} more such notes in --json)" if len(row.notes) > 1 else "")
                )
        out.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
        failed = [r.label for r in [self.reference, *self.rows] if not r.passed]
        na = [r.label for r in self.rows if not r.applicable]
        out.append(
            (f"ALL VERSIONS PASSED ({self.seconds:.1f} s)" + (f"; not applicable: {', '.join(na)}" if na else ""))
            if not failed
            else f"FAILED: {', '.join(failed)}"
        )
        return "\n".join(out)

    def to_json(self) -> str:
        data = {
            "repo": self.repo,
            "passed": self.passed,
            "tolerance": self.tolerance,
            "seconds": round(self.seconds, 2),
            "reference_versions": self.reference_versions,
            "reference": {**asdict(self.reference), "verdict": self.reference.verdict},
            "model_type": self.model_type,
            "rows": [{**asdict(r), "verdict": r.verdict} for r in self.rows],
        }
        return json.dumps(json_safe(data), indent=2, sort_keys=True) + "\n"


def _n(v) -> str:
    return "-" if v is None else str(v)


def _ok(v: bool) -> str:
    return "ok" if v else "FAIL"


def run_matrix(
    repo: str | Path,
    versions=VERSIONS,
    envs_dir: Path | None = None,
    create: bool = True,
    prompts: list[dict] | None = None,
    images: dict | None = None,
    tol: float = LOGITS_TOL,
    keep: Path | None = None,
    timeout: float = 1800,
    jobs: int | None = None,
    log=None,
) -> Matrix:
    """Probe the current environment (the reference) and each version's environment; judge every row."""
    repo = Path(repo)
    if not repo.is_dir() or not (repo / "config.json").is_file():
        raise CompatUsageError(f"{repo}: not a converted repo (no config.json)")
    versions = [check_version(v) for v in versions]
    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    if prompts is None or images is None:
        from .samples import sample_images, sample_prompts

        prompts = sample_prompts() if prompts is None else prompts
        images = sample_images() if images is None else images
    work = Path(tempfile.mkdtemp(prefix="vipllava-compat-")) if keep is None else Path(keep)
    work.mkdir(parents=True, exist_ok=True)
    try:
        (work / "images").mkdir(exist_ok=True)
        image_files = {}
        for name, im in images.items():
            image_files[name] = work / "images" / f"{name}.png"
            im.save(image_files[name])  # PNG: lossless, the probe reads back the same pixels
        used = {p["image"] for p in prompts if p.get("image")}
        image_files = {k: v for k, v in image_files.items() if k in used}
        expected = expected_settings(repo)
        model_type = (_read(repo, "config.json").get("text_config") or {}).get("model_type")

        log("probing the current environment (reference) ...")
        ref = run_probe("current", sys.executable, repo, work, prompts, image_files, None, timeout)
        ref.env = {"python": sys.executable}
        inputs = work / "current" / "tensors.npz"
        if ref.error is None and not all(f"own_ids_{i}" in ref.tensors for i in range(len(prompts))):
            ref.error = f"the reference processor failed: {(ref.result.get('errors') or {}).get('processor')}"
        ref_row = judge(ref, ref, expected, prompts, tol, model_type=model_type)
        # environments one at a time (creation times stay meaningful), then the probes in parallel
        envs: dict[str, dict | str] = {}
        for v in versions:
            try:
                envs[v] = asdict(ensure_env(v, envs_dir, create=create, log=log))
            except EnvError as e:
                envs[v] = str(e)

        def probe(v: str) -> Row:
            env = envs[v]
            if isinstance(env, str):
                return judge(
                    Probe(v, error=f"environment: {env}", env={"error": env}),
                    ref,
                    expected,
                    prompts,
                    tol,
                    model_type=model_type,
                )
            if ref.error:
                p = Probe(v, error="no reference (the current environment's probe failed)", env=env)
            else:
                log(f"probing transformers {v} ...")
                p = run_probe(
                    v,
                    env["python"],
                    repo,
                    work,
                    prompts,
                    image_files,
                    inputs,
                    timeout,
                    collapse=capabilities(v).collapse,
                )
                p.env = env
            row = judge(p, ref, expected, prompts, tol, model_type=model_type)
            if row.transformers not in (None, v):
                row.passed = False
                row.details.append(f"the environment ran transformers {row.transformers}, not {v}")
            return row

        from concurrent.futures import ThreadPoolExecutor

        workers = max(1, min(len(versions), jobs or DEFAULT_JOBS))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            rows = list(pool.map(probe, versions))
        return Matrix(
            str(repo), ref_row, rows, tol, time.perf_counter() - t0, (ref.result or {}).get("versions", {}), model_type
        )
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m verify.compat",
        description=__doc__.split("\n\n")[0],
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
    args = ap.parse_args(argv)
    log = (
        (lambda msg: None) if args.quiet else (lambda msg: (sys.stderr.write(msg + "\n"), sys.stderr.flush()))
    )  # one write: threads
    try:
        versions = [check_version(v.strip()) for v in args.versions.split(",") if v.strip()]
        if not versions:
            raise CompatUsageError("--versions: no version given")
        envs = Path(args.envs).expanduser() if args.envs else None
        if args.setup_only:
            from concurrent.futures import ThreadPoolExecutor

            def setup(v: str) -> tuple[str, bool]:
                try:
                    info = ensure_env(v, envs, create=not args.no_create, log=log)
                    how = (
                        f"created in {info.create_seconds:.1f} s (venv {info.venv_seconds:.1f} s, pip "
                        f"{info.pip_seconds:.1f} s)"
                        if info.created
                        else f"cached (created in {info.create_seconds:.1f} s)"
                    )
                    return f"transformers {v:<10} {how}  {info.path}", True
                except EnvError as e:
                    return f"transformers {v:<10} FAILED: {e}", False

            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=max(1, min(len(versions), args.jobs or DEFAULT_JOBS))) as pool:
                done = list(pool.map(setup, versions))  # pip downloads and unpacks: mostly waiting, so in parallel
            for line, _ in done:
                print(line)
            print(f"{len(versions)} environments ready in {time.perf_counter() - t0:.1f} s")
            return 0 if all(ok for _, ok in done) else 1
        if not args.repo:
            raise CompatUsageError("give the converted repo (or --setup-only)")
        prompts = images = None
        if args.prompts or args.images:
            from .cli import _load_images, _load_prompts
            from .context import VerifyUsageError

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


if __name__ == "__main__":
    sys.exit(main())
