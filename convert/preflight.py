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
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

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


def check_no_overlap(output: Path, inputs: dict[str, Path]) -> None:
    """Refuse an --output that is, contains or lies inside any input (compared after following symlinks), with or
    without --force: replacing it would delete or change the inputs."""
    out = Path(os.path.realpath(output))
    for what, p in inputs.items():
        real = Path(os.path.realpath(p))
        folder = real if real.is_dir() else real.parent
        if out == folder or out in folder.parents or folder in out.parents:
            rel = "is" if out == folder else "contains" if out in folder.parents else "lies inside"
            raise ConversionError(
                f"{output}: --output {rel} {what} ({folder}); expected a folder apart from every input, "
                "choose another --output (nothing was written)"
            )


def check_seed(seed: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
        raise ConversionError(
            f"--seed {seed!r}: expected an integer with 0 <= seed < 2**32 (torch's generator keeps 32 bits); "
            "pass a smaller --seed"
        )


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
    """argparse whose usage errors are ONE line on stderr, exit 2, worded like every other error of the tools
    (``error: --dtype 'fp8': expected one of auto, bfloat16, float16, float32; see PROG --help``)."""

    _CHOICE = re.compile(
        r"argument (?P<flag>[^/:]+)(?:/[^:]*)?: invalid choice: (?P<value>.*) \(choose from (?P<choices>.*)\)$"
    )
    _TYPED = re.compile(r"argument (?P<flag>[^/:]+)(?:/[^:]*)?: invalid (?P<type>int|float) value: (?P<value>.*)$")

    def error(self, message: str):  # noqa: D102 (argparse's hook)
        if m := self._CHOICE.match(message):
            message = f"{m['flag']} {m['value']}: expected one of {m['choices'].replace(chr(39), '')}"
        elif m := self._TYPED.match(message):
            message = f"{m['flag']} {m['value']}: expected {'an integer' if m['type'] == 'int' else 'a number'}"
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def prog_name(module: str, script: str) -> str:
    """The name the user typed: ``vipllava-convert`` for the console script, else ``python -m convert``."""
    base = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return script if base == script else f"python -m {module}"


def exit_process(code: int):
    """End the process with ``code`` (the ``python -m`` and console-script entry points call this), streams
    flushed, without the interpreter's teardown.

    The command's outcome is decided, printed and on disk by now (every output file is closed and fsynced before
    its folder appears), so nothing is lost by skipping the teardown: after a full-size conversion it measured
    0.9 s of freeing ~2000 imported modules, and after an early error it would wait for worker threads (a
    tokenizer still importing, an input hash) whose work no longer matters. It also settles Ctrl-C: CPython kills
    itself with SIGINT at exit when a KeyboardInterrupt ever left code run from a string (``exec`` of source text,
    as ``dataclasses`` does while modules import), even if the program caught it later, so 130 must end the
    process here; and a Ctrl-C arriving now is ignored rather than turned into a death by SIGINT."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


class OnInterrupt:
    """Ctrl-C ends the process at once, at any moment: ONE line on stderr, exit 130.

    A KeyboardInterrupt raised inside a third-party import can be turned into another error (a half-initialised numpy
    surfaces as a RecursionError, transformers reports a ModuleNotFoundError), so the command lines do not rely on
    it: while this context is active (main thread only), SIGINT runs ``cleanup()`` (if set), writes ``message`` (or
    the line ``cleanup`` returns, saying what it found on disk) and ends the process like a kill, which the
    converter's output is built to survive (an interrupted run leaves no output, or the previous one, or its own
    complete one; its temporary folder is removed by ``cleanup`` or by the next run). The previous handler is
    restored on exit, so calling ``main()`` in-process leaves the caller's Ctrl-C alone."""

    def __init__(self, message: str):
        self.message = message
        self.cleanup: Callable[[], str | None] | None = None
        self._previous: Callable[[int, FrameType | None], Any] | int | None = None

    def _handler(self, signum, frame):  # noqa: ARG002 (signal handler signature)
        message = self.message
        try:
            if self.cleanup is not None:
                message = self.cleanup() or message
        finally:
            os.write(2, (message + "\n").encode())  # not print(): the main thread may be inside a write to stderr
            os._exit(130)

    def __enter__(self) -> "OnInterrupt":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            import signal

            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
