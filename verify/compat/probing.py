"""Running the probe: the job file for one environment, the probe as a subprocess of that environment's
interpreter (:mod:`verify.compat.probe`, standalone), and what it left (``result.json`` and ``tensors.npz``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .text import tail

NEW_TOKENS = 8  # greedy tokens compared per prompt
PROBE = Path(__file__).with_name("probe.py")  # run by path, never imported there: see its docstring

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


def probe_env() -> dict:
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
    """Run the probe with ``python`` in ``work/<label>`` (its job file, stderr, result and tensors stay there)."""
    out = work / re.sub(r"[^A-Za-z0-9._-]", "_", label)
    out.mkdir(parents=True, exist_ok=True)
    job = probe_job(repo, prompts, image_files, inputs, out, collapse, new_tokens)
    (out / "job.json").write_text(json.dumps(job, indent=1, ensure_ascii=False))
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            [str(python), "-I", str(PROBE), str(out / "job.json")],
            capture_output=True,
            text=True,
            env=probe_env(),
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return Probe(label, error=f"probe timed out after {timeout:.0f} s", seconds=time.perf_counter() - t0)
    except OSError as e:
        return Probe(label, error=f"probe could not start: {e}", seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    (out / "stderr.txt").write_text(p.stderr)
    if p.returncode or not (out / "result.json").is_file():
        return Probe(label, error=f"probe exited {p.returncode}: {tail(p.stderr, 3)}", seconds=seconds)
    return read_probe(label, out, seconds)


def probe_job(
    repo: Path,
    prompts: list[dict],
    image_files: dict,
    inputs: Path | None,
    out: Path,
    collapse: bool,
    new_tokens: int,
) -> dict:
    """The job file's content (its format is in :mod:`verify.compat.probe`'s docstring)."""
    cfg = repo_json(Path(repo), "config.json")
    return {
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


def read_probe(label: str, out: Path, seconds: float = 0.0) -> Probe:
    """What a probe that finished left in ``out``: ``result.json`` and ``tensors.npz``."""
    result = json.loads((out / "result.json").read_text())
    with np.load(out / "tensors.npz") as z:
        tensors = {k: z[k] for k in z.files}
    return Probe(label, result=result, tensors=tensors, seconds=seconds)


def repo_json(repo: Path, name: str) -> dict:
    """A JSON file of the repo as a dict ({} when it is missing, unreadable or not an object)."""
    try:
        obj = json.loads((repo / name).read_text())
        return obj if isinstance(obj, dict) else {}
    except (OSError, ValueError):
        return {}
