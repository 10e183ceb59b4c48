"""Named points where the kill, out-of-space and Ctrl-C tests inject faults into a conversion or a verification.

The code takes a ``fault`` callable (default: :func:`no_fault`) and calls it at each point; only the command lines
build a real one, once per run, from the ``VIPLLAVA_FAULT`` environment variable (:func:`from_env`): ``"<point>"``
SIGKILLs the process there, ``"<point>:enospc"`` raises ENOSPC, ``"<point>:sigint"`` sends the process a SIGINT
there (a Ctrl-C at a known moment of the work). The points:
- convert: ``tensor_write`` (each buffer handed to a sink), ``before_fsync``, ``before_rename`` and
  ``after_exchange`` (the atomic folder), ``converted`` (the command line, once the output is in place);
- verify: ``check:<name>`` as each check starts, ``report_json`` with ``--json`` written but not yet renamed into
  place.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable

FAULT_ENV = "VIPLLAVA_FAULT"
KINDS = ("enospc", "sigint")  # after the point's last ":"; none: SIGKILL

Fault = Callable[[str], None]


def no_fault(point: str) -> None:
    """The production fault hook: nothing happens."""


def from_env(environ: dict[str, str] | None = None) -> Fault:
    """The fault hook ``VIPLLAVA_FAULT`` asks for (:func:`no_fault` when it is unset or empty)."""
    want = (os.environ if environ is None else environ).get(FAULT_ENV, "")
    if not want:
        return no_fault
    point, _, kind = want.rpartition(":")
    if kind not in KINDS:  # no kind given: the whole value names the point (points may contain ":")
        point, kind = want, ""

    def fault(at: str) -> None:
        if at != point:
            return
        if kind == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), at)
        os.kill(os.getpid(), signal.SIGINT if kind == "sigint" else signal.SIGKILL)

    return fault
