"""Check results and the report: a readable table on stdout and JSON for machines."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from convert.safejson import clean as _printable  # names from files: no newline or escape code reaches the table

PASS, FAIL, WARN = "PASS", "FAIL", "WARN"
NA = "N/A"  # not applicable: the check needs something this repo does not have (an audit has no conversion.json)


@dataclass
class Check:
    name: str
    status: str  # PASS | FAIL | WARN (passed, with something worth a look) | N/A (not applicable; the summary says why)
    summary: str  # one line, with the measured numbers
    numbers: dict = field(default_factory=dict)
    details: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    @property
    def applicable(self) -> bool:
        return self.status != NA


def json_safe(obj):
    """``obj`` for strict JSON: every non-finite float as its string ("nan", "inf", "-inf"), keys as strings, tuples
    as lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def first_difference_index(a, b) -> int:
    """The first index at which two sequences (token lists, strings) differ; the shorter length when one is a
    prefix of the other (their common length when they are equal)."""
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@dataclass
class Report:
    repo: str
    checks: list[Check] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)  # tool, transformers, torch, python that produced the report
    audit: str | None = None  # why this is an audit (no conversion.json), or None for a repo this tool wrote

    @property
    def passed(self) -> bool:
        """Every applicable check passed, and at least one ran: N/A is never evidence, zero checks prove nothing."""
        return any(c.applicable for c in self.checks) and not any(c.failed for c in self.checks)

    @property
    def not_applicable(self) -> list[str]:
        return [c.name for c in self.checks if not c.applicable]

    @property
    def failed_checks(self) -> list[str]:
        return [c.name for c in self.checks if c.failed]

    def get(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def table(self) -> str:
        w = max([len(c.name) for c in self.checks] + [5])
        head = f"verify {_printable(self.repo)}"
        if self.settings.get("backbone"):
            head += f"  (backbone {self.settings['backbone']}, original prompt mode {self.settings.get('conv_mode')})"
        lines = [head]
        if self.audit:
            lines.append(f"AUDIT: {self.audit}; checks that need its record are N/A")
        lines += [f"{'check':<{w}}  result  {'seconds':>7}  numbers", "-" * (w + 60)]
        for c in self.checks:
            lines.append(f"{c.name:<{w}}  {c.status:<6}  {c.seconds:>7.2f}  {_printable(c.summary)}")
            for d in c.details[:8]:
                lines.append(f"{'':<{w}}          {'':>7}    - {_printable(d, 300)}")
            if len(c.details) > 8:
                lines.append(f"{'':<{w}}          {'':>7}    - ... {len(c.details) - 8} more (see --json)")
        parts = (["audit"] if self.audit else []) + (
            [f"not applicable: {', '.join(self.not_applicable)}"] if self.not_applicable else []
        )
        na = f" ({'; '.join(parts)})" if parts else ""  # "audit" only for a repo without conversion.json
        if self.failed_checks:
            verdict = f"FAILED: {', '.join(self.failed_checks)}{na}"
        elif not self.passed:
            verdict = f"NOT PASSED: no applicable check ran{na}"
        else:
            verdict = f"ALL {'APPLICABLE ' if self.not_applicable else ''}CHECKS PASSED{na}"
        lines.append("-" * (w + 60))
        lines.append(verdict)
        return "\n".join(lines)

    def to_json(self) -> str:
        data = {
            "repo": self.repo,
            "passed": self.passed,
            "failed_checks": self.failed_checks,
            "audit": self.audit is not None,
            "audit_reason": self.audit,
            "not_applicable": self.not_applicable,
            "settings": self.settings,
            "environment": self.environment,
            "checks": [asdict(c) for c in self.checks],
        }
        return json.dumps(json_safe(data), indent=2, sort_keys=True) + "\n"
