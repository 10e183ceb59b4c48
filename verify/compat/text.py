"""Long values cut to the one-line forms the matrix's details, notes and errors show."""

from __future__ import annotations

import json

from ..report import first_difference_index


def tail(text: str, n: int = 12) -> str:
    """The last ``n`` non-empty lines of a subprocess's output, on one line (pip's "is ignored" noise dropped)."""
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip() and "is ignored: it is neither" not in ln]
    return " | ".join(lines[-n:])


def short(v, n: int = 80) -> str:
    s = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def first_difference(a, b, context: int = 24) -> str:
    """Where two sequences (token lists or strings) first differ, with a little context, for a detail line."""
    a = a if a is not None else []
    b = b if b is not None else []
    i = first_difference_index(a, b)
    lo = max(0, i - context // 3)
    return f"at {i}: {short(a[lo : i + context])} vs reference {short(b[lo : i + context])}"


def sentence(text, n: int = 200) -> str:
    """The first sentence of an error message, at most ``n`` characters (the full text is in the probe's JSON)."""
    text = str(text)
    cut = text.find(". ")
    text = text[: cut + 1] if 0 < cut else text
    return text if len(text) <= n else text[: n - 3] + "..."


def squash(text) -> str:
    return " ".join(str(text).split())
