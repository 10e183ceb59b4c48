"""Named points where the kill and out-of-space tests inject faults into a conversion.

The converter's code takes a ``fault`` callable (default: :func:`no_fault`) and calls it at each point; only the
command line builds a real one, once per run, from the ``VIPLLAVA_FAULT`` environment variable (:func:`from_env`):
``"<point>"`` SIGKILLs the process there, ``"<point>:enospc"`` raises ENOSPC. The points: ``tensor_write`` (each
buffer handed to a sink), ``before_fsync``, ``before_rename`` and ``after_exchange`` (the atomic folder).
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable

FAULT_ENV = "VIPLLAVA_FAULT"

Fault = Callable[[str], None]


def no_fault(point: str) -> None:
    """The production fault hook: nothing happens."""


def from_env(environ: dict[str, str] | None = None) -> Fault:
    """The fault hook ``VIPLLAVA_FAULT`` asks for (:func:`no_fault` when it is unset or empty)."""
    want = (os.environ if environ is None else environ).get(FAULT_ENV, "")
    if not want:
        return no_fault
    point, _, kind = want.partition(":")

    def fault(at: str) -> None:
        if at != point:
            return
        if kind == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), at)
        os.kill(os.getpid(), signal.SIGKILL)

    return fault
