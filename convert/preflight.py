"""Argument checks that need neither torch nor transformers, so the command line refuses bad options in well
under a second, before any heavy import and before any work: sizes, seeds, the output folder, a file to write.

Each raises :class:`~convert.errors.ConversionError` (one line, exit 2) naming the option, what was expected and
what was found.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

from .errors import ConversionError

TMP_PREFIX = ".vipllava-tmp-"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
SEED_LIMIT = 2**32  # torch's CPU generator keeps 32 bits of the seed: s and s + 2**32 would give the same rows


def parse_size(text: str | int) -> int:
    """'5GB' -> 5 * 10**9 (decimal units as transformers uses them; KiB/MiB/GiB are binary)."""
    if isinstance(text, int):
        if text <= 0:
            raise ConversionError(f"--max-shard-size {text!r}: must be positive")
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m or m.group(2) not in _UNITS:
        raise ConversionError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB")
    size = int(float(m.group(1)) * _UNITS[m.group(2)])
    if size <= 0:
        raise ConversionError(f"--max-shard-size {text!r}: must be positive")
    return size


def check_seed(seed: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
        raise ConversionError(f"--seed {seed!r}: expected an integer with 0 <= seed < 2**32 (torch's generator keeps 32 bits)")


def _probe_writable(folder: Path) -> str | None:
    """None when a file can be created in ``folder`` (a real probe: os.access says yes to root even on a
    read-only mount), else the reason."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}probe-", dir=folder))
    except OSError as e:
        return e.strerror or str(e)
    return None


def check_output(output: Path, force: bool) -> None:
    """Refuse an output that is a file or a non-empty folder (unless ``force``), or whose parent is unwritable."""
    if output.exists() and not output.is_dir():
        raise ConversionError(f"{output}: exists and is a file; pass a folder path for --output")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise ConversionError(f"{output}: exists and is not empty; pass --force to replace it")
    parent = output.parent
    if not parent.is_dir():
        raise ConversionError(f"{parent}: the parent folder of --output does not exist; create it first")
    problem = _probe_writable(parent)
    if problem:
        raise ConversionError(f"{parent}: not writable ({problem}); choose another --output")


def file_destination_problem(path: str | os.PathLike, flag: str) -> str | None:
    """Why ``flag path`` (a file the command will write at the end, e.g. ``--json``) cannot be written, or None.
    Checked before any work, so a long run never ends in a traceback over a typo in a path."""
    p = Path(path).expanduser()
    if str(path) == "" or p.name in ("", ".", ".."):
        return f"{flag} {str(path)!r}: expected a file name"
    if p.is_dir():
        return f"{flag} {path}: is a folder; pass a file name (e.g. {p / 'report.json'})"
    parent = p.absolute().parent
    if not parent.is_dir():
        return f"{flag} {path}: the folder {parent} does not exist; create it first"
    if p.exists() and not os.access(p, os.W_OK):
        return f"{flag} {path}: exists and is not writable"
    problem = _probe_writable(parent)
    if problem:
        return f"{flag} {path}: cannot write in {parent} ({problem})"
    return None


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --- the command lines' shared plumbing (argparse with one-line errors, the program's own name) -------------------


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are ONE line on stderr (``PROG: error: ...; see PROG --help``), exit 2."""

    def error(self, message: str):  # noqa: D102 (argparse's hook)
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def prog_name(module: str, script: str) -> str:
    """The name the user typed: ``vipllava-convert`` for the console script, else ``python -m convert``."""
    base = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return script if base == script else f"python -m {module}"
